"""Dense and per-head projections, with bfloat16 matmuls that stay bfloat16 on CPUs.

`Dense` and `Projection` are `nnx.Linear` and `nnx.Einsum` (same parameters, same call, same
results) except for bfloat16 compute on a CPU. XLA's CPU backend runs a bf16 x bf16 -> float32
dot on the CPU's bfloat16 units (1.4-1.9x a float32 dot on the AVX-512 BF16 machine of
benchmarks/RESULTS.md), but it rewrites a dot whose *output* is bfloat16, the kind a bfloat16
model asks for, into a float32 dot with converts around it, and autodiff's backward dots take the
float32 cotangent of a float32-accumulated forward. So there, the projections run `mixed_einsum`:
bf16 operands, float32 accumulation, a bfloat16 result, and a custom VJP whose two backward
matmuls are bf16 x bf16 -> float32 too. The numbers are the ones the upcast dots gave (each
product is accumulated in float32 and rounded to bfloat16 once); only the speed differs. Biases
get their gradient from a matrix-vector product (`add_bias`): XLA's CPU backend reduced a
[batch, length, features] bfloat16 cotangent through a slow reduce-window instead.
On TPUs and GPUs, whose compilers keep bfloat16 dots native, nothing changes.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention_kernels import current_platform

Array = jax.Array
Dtype = Any


def cpu_bfloat16(dtype: Dtype) -> bool:
    """Whether `dtype` is bfloat16 compute on a CPU: projections take `mixed_einsum` there."""
    return dtype is not None and jnp.dtype(dtype) == jnp.bfloat16 and current_platform() == "cpu"


def _operands(spec: str) -> tuple[str, str, str]:
    inputs, out = spec.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    return lhs, rhs, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mixed_einsum(spec: str, x: Array, w: Array) -> Array:
    """einsum(spec, x, w) accumulated in float32 and returned in x's dtype; its gradients are
    bf16 x bf16 -> float32 matmuls too. Every index of x must be in w or the output, and every
    index of w in x or the output (true of projections: nothing is summed within one operand)."""
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _mixed_einsum_fwd(spec: str, x: Array, w: Array):
    return mixed_einsum(spec, x, w), (x, w)


def _mixed_einsum_bwd(spec: str, residuals, dy: Array):
    x, w = residuals
    lhs, rhs, out = _operands(spec)
    dy = dy.astype(x.dtype)
    dx = jnp.einsum(f"{out},{rhs}->{lhs}", dy, w, preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{lhs},{out}->{rhs}", x, dy, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


@jax.custom_vjp
def add_bias(y: Array, bias: Array) -> Array:
    """y + bias, bias broadcast over y's leading axes; its gradient is ones @ dy [rows, bias]."""
    return y + bias


def _add_bias_fwd(y: Array, bias: Array):
    return y + bias, bias


def _add_bias_bwd(bias: Array, dy: Array):
    dy_RxN = dy.reshape(-1, bias.size)
    ones_R = jnp.ones((dy_RxN.shape[0],), dy.dtype)
    dbias = jnp.dot(ones_R, dy_RxN, preferred_element_type=jnp.float32)
    return dy, dbias.reshape(bias.shape).astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def _bias_on_last_axes(y: Array, bias: Array) -> bool:
    return bias.ndim <= y.ndim and y.shape[y.ndim - bias.ndim :] == bias.shape


class Dense(nnx.Linear):
    """nnx.Linear whose bfloat16 matmuls on CPUs run as `mixed_einsum` (see the module doc)."""

    def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
        """inputs [..., in] -> [..., out], as nnx.Linear."""
        if not self._mixed(out_sharding):
            return super().__call__(inputs, out_sharding=out_sharding)
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
        lead = "abcdefghijklmnopqrstuvw"[: x.ndim - 1]
        y = mixed_einsum(f"{lead}y,yz->{lead}z", x, kernel)
        return y if bias is None else add_bias(y, bias)

    def _mixed(self, out_sharding: Any) -> bool:
        return (
            out_sharding is None
            and self.preferred_element_type is None
            and self.dot_general is jax.lax.dot_general
            and cpu_bfloat16(self.dtype)
        )


class Projection(nnx.Einsum):
    """nnx.Einsum whose bfloat16 matmuls on CPUs run as `mixed_einsum` (see the module doc)."""

    def __call__(
        self, inputs: Array, einsum_str: Optional[str] = None, out_sharding: Any = None
    ) -> Array:
        """einsum(spec, inputs, kernel) (+ bias), as nnx.Einsum."""
        spec = einsum_str or self.einsum_str
        if not self._mixed(out_sharding) or spec is None:
            return super().__call__(inputs, einsum_str, out_sharding=out_sharding)
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
        y = mixed_einsum(spec.replace(" ", ""), x, kernel)
        if bias is None:
            return y
        if not _bias_on_last_axes(y, bias):  # not one of ours: as nnx.Einsum computes it
            return super().__call__(inputs, einsum_str, out_sharding=out_sharding)
        return add_bias(y, bias)

    def _mixed(self, out_sharding: Any) -> bool:
        return (
            out_sharding is None
            and self.preferred_element_type is None
            and self.einsum_op is jnp.einsum
            and cpu_bfloat16(self.dtype)
        )

    def merged_heads(self, inputs_BxTxNxH: Array) -> Array:
        """A "BTNH,NHD->BTD" projection as one [B, T, N*H] x [N*H, D] matmul (the same sums).

        Inside a decode loop, XLA's CPU backend computed the per-head form by transposing the
        [N, H, D] kernel on every token (a copy per layer and token)."""
        if self.einsum_str.replace(" ", "") != "BTNH,NHD->BTD" or self.einsum_op is not jnp.einsum:
            return self(inputs_BxTxNxH)
        b, t, n, h = inputs_BxTxNxH.shape
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype(
            (inputs_BxTxNxH, self.kernel[...], bias), dtype=self.dtype
        )
        x_BxTxK, kernel_KxD = x.reshape(b, t, n * h), kernel.reshape(n * h, -1)
        if self._mixed(None):
            y = mixed_einsum("BTK,KD->BTD", x_BxTxK, kernel_KxD)
        else:
            y = jnp.einsum(
                "BTK,KD->BTD",
                x_BxTxK,
                kernel_KxD,
                precision=self.precision,
                preferred_element_type=self.preferred_element_type,
            )
        return y if bias is None else y + bias
