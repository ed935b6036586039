"""Plain attention (whole [T, S] logits per head) with a FlashAttention-style backward pass.

The tensors are head-major ([B, K, G, T, H] queries, [B, K, S, H] keys and values), so every
product is a batched matmul over leading axes, and `attend` has a custom VJP: the backward pass
takes the softmax's row term from the output (rowsum(dO * O), [B, K, G, T]) instead of reducing
the [T, S] product dP * P, as FlashAttention does. On CPUs, autodiff of the [B, T, K, G, H]
einsums transposed [T, S]-sized tensors and fused that reduction into a slow matmul: the default
run's step spent about 55 of its 180 ms in attention (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def softcap(x: Array, cap: Optional[float]) -> Array:
    """cap * tanh(x / cap): squashes logits smoothly into (-cap, cap); identity when cap is None."""
    if cap is None:
        return x
    return cap * jnp.tanh(x / cap)


def _logits(
    q: Array, k: Array, bias: Optional[Array], mask: Optional[Array], scale, cap, mask_value
) -> Array:
    """softcap(scale q k^T) + bias, masked, in float32: [B, K, G, T, S]."""
    logits = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = softcap(logits * scale, cap)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, mask_value)
    return logits


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def attend(
    q_BxKxGxTxH: Array,
    k_BxKxSxH: Array,
    v_BxKxSxH: Array,
    bias: Optional[Array],
    mask: Optional[Array],
    scale: float,
    cap: Optional[float],
    mask_value: float,
    matmul_dtype: Any = None,
) -> Array:
    """Attention output [B, K, G, T, H] in float32; `bias` (additive) and `mask` (True = may
    attend) broadcast to [B, K, G, T, S]; `cap` soft-caps the scaled logits before the bias.

    `matmul_dtype`: float32 q, k and v are cast to it for the matmuls, and their gradients
    come back in float32. Blocks of one bfloat16 attention that pass their inputs so have
    their partial dk and dv summed in float32 and rounded once, not rounded per block and
    summed in bfloat16."""
    q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH = _cast((q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH), matmul_dtype)
    # Forward only (generation, evaluation): the softmax's division comes after the matmul, on
    # [T, H] rather than [T, S]. XLA's CPU backend fuses whatever makes the matmul's operand into
    # the matmul, so the less that is, the faster (a 896-token prefill: 5% faster this way).
    logits = _logits(q_BxKxGxTxH, k_BxKxSxH, bias, mask, scale, cap, mask_value)
    e_BxKxGxTxS = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    out_BxKxGxTxH = jnp.einsum(
        "bkgts,bksh->bkgth",
        e_BxKxGxTxS.astype(v_BxKxSxH.dtype),
        v_BxKxSxH,
        preferred_element_type=jnp.float32,
    )
    return out_BxKxGxTxH / jnp.sum(e_BxKxGxTxS, axis=-1, keepdims=True)


def _cast(qkv: tuple[Array, ...], matmul_dtype: Any) -> tuple[Array, ...]:
    """q, k, v as the matmuls take them (see `attend`)."""
    if matmul_dtype is None:
        return qkv
    if any(x.dtype != jnp.float32 for x in qkv):
        raise ValueError(f"matmul_dtype takes float32 q, k, v, not {[x.dtype for x in qkv]}")
    return tuple(x.astype(matmul_dtype) for x in qkv)


def _forward(q, k, v, bias, mask, scale, cap, mask_value, matmul_dtype):
    q, k, v = _cast((q, k, v), matmul_dtype)
    logits = _logits(q, k, bias, mask, scale, cap, mask_value)
    p_BxKxGxTxS = jax.nn.softmax(logits, axis=-1)
    out_BxKxGxTxH = jnp.einsum(
        "bkgts,bksh->bkgth", p_BxKxGxTxS.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return out_BxKxGxTxH, (q, k, v, bias, mask, p_BxKxGxTxS, out_BxKxGxTxH)


def _sum_to(x: Array, shape: tuple[int, ...]) -> Array:
    """x summed over the axes that `shape` broadcasts (size 1 there, or missing in front)."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1
    )
    return jnp.sum(x, axis=axes).reshape(shape) if axes else x


def _backward(scale, cap, mask_value, matmul_dtype, residuals, d_out_BxKxGxTxH):
    q, k, v, bias, mask, p, out = residuals
    d_out = d_out_BxKxGxTxH.astype(jnp.float32)
    dv = jnp.einsum(
        "bkgts,bkgth->bksh",
        p.astype(v.dtype),
        d_out.astype(v.dtype),
        preferred_element_type=jnp.float32,
    )
    dp = jnp.einsum(
        "bkgth,bksh->bkgts", d_out.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    # d softmax: P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O).
    d_logits = p * (dp - jnp.sum(d_out * out, axis=-1, keepdims=True))
    if mask is not None:  # masked logits are constants: none of the gradient reaches q, k or bias
        d_logits = jnp.where(mask, d_logits, 0.0)
    d_bias = None if bias is None else _sum_to(d_logits, bias.shape).astype(bias.dtype)
    if cap is not None:  # d/dx cap tanh(x / cap) = 1 - tanh^2, recomputed rather than kept
        tanh = jnp.tanh(
            jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32)
            * (scale / cap)
        )
        d_logits = d_logits * (1.0 - tanh * tanh)
    d_logits = (d_logits * scale).astype(q.dtype)
    dq = jnp.einsum("bkgts,bksh->bkgth", d_logits, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bkgts,bkgth->bksh", d_logits, q, preferred_element_type=jnp.float32)
    if matmul_dtype is None:  # else the inputs were float32, as the gradients are
        dq, dk, dv = dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
    return dq, dk, dv, d_bias, None


attend.defvjp(_forward, _backward)
