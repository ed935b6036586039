"""Int8 weight-only quantization for serving: per-output-channel symmetric scales.

Every `nnx.Linear` kernel [in, out] and per-head `nnx.Einsum` kernel ([embed, heads, head_dim] or
[heads, head_dim, embed]) becomes int8 values and one float32 scale per output channel, w ~= q *
scale with scale = max |w| over the contracted axes / 127. Kernels stacked over layers keep one
scale per layer and channel. With `embeddings=True`, every `nnx.Embed` table
[V, D] gets one scale per row (a row is both what a lookup returns and an output channel of the
tied LM head's `attend`). The matmul runs in the layer's compute dtype on the int8 values cast up,
and the scale multiplies its output: (x @ q) * scale == x @ (q * scale). Norms, biases and the T5
relative-position tables stay in float. The quantized model keeps the float model's call API.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


class QuantizedWeight(nnx.Variable):
    """Int8 weight values (not a Param: an optimizer over nnx.Param leaves them alone)."""


class QuantizationScale(nnx.Variable):
    """Float32 per-channel scale of a QuantizedWeight."""


def quantize_int8(w: Array, *, reduce_axis: int | tuple[int, ...]) -> tuple[Array, Array]:
    """Symmetric int8 values of w and the scale per channel (max |w| over reduce_axis / 127)."""
    w = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=reduce_axis, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return q, jnp.squeeze(scale, reduce_axis)


def _sharding(var: nnx.Variable, reduced: tuple[int, ...] = ()) -> dict:
    """The variable's logical-axis metadata, without the `reduced` axes (for its scale)."""
    meta = dict(var.get_metadata())
    names = meta.get("out_sharding")
    if names is not None and reduced:
        meta["out_sharding"] = tuple(n for i, n in enumerate(names) if i not in reduced)
    return meta


class Int8Linear(nnx.Module):
    """Drop-in replacement of an nnx.Linear with an int8 kernel and per-output-channel scales."""

    def __init__(self, linear: nnx.Linear):
        kernel = linear.kernel
        reduced = (kernel[...].ndim - 2,)  # the input axis, after any stacked layers axis
        q, scale = quantize_int8(kernel[...], reduce_axis=reduced)
        self.kernel = QuantizedWeight(q, **_sharding(kernel))
        self.scale = QuantizationScale(scale, **_sharding(kernel, reduced))
        self.bias = linear.bias
        self.dtype = linear.dtype or kernel[...].dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def __call__(self, x_BxLxI: Array) -> Array:
        x = x_BxLxI.astype(self.dtype)
        y = jnp.dot(x, self.kernel[...].astype(self.dtype)) * self.scale[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Int8Embed(nnx.Module):
    """Drop-in replacement of an nnx.Embed (lookup and `attend`) with an int8 table, row scales."""

    def __init__(self, embed: nnx.Embed):
        table = embed.embedding
        q, scale = quantize_int8(table[...], reduce_axis=1)
        self.embedding = QuantizedWeight(q, **_sharding(table))
        self.scale = QuantizationScale(scale, **_sharding(table, (1,)))
        self.dtype = embed.dtype or table[...].dtype
        self.num_embeddings, self.features = embed.num_embeddings, embed.features

    def __call__(self, ids: Array) -> Array:
        rows = jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)
        return rows * jnp.take(self.scale[...], ids, axis=0)[..., None].astype(self.dtype)

    def attend(self, query: Array) -> Array:
        query = query.astype(self.dtype)
        return jnp.dot(query, self.embedding[...].T.astype(self.dtype)) * self.scale[...].astype(
            self.dtype
        )


class Int8Einsum(nnx.Module):
    """Drop-in replacement of an nnx.Einsum with an int8 kernel, one scale per output channel."""

    def __init__(self, einsum: nnx.Einsum):
        kernel = einsum.kernel
        operands, out_letters = einsum.einsum_str.replace(" ", "").split("->")
        kernel_letters = operands.split(",")[1]
        stacked = kernel[...].ndim - len(kernel_letters)  # leading layers axis of a stacked block
        reduced = tuple(stacked + i for i, c in enumerate(kernel_letters) if c not in out_letters)
        q, scale = quantize_int8(kernel[...], reduce_axis=reduced)
        self.kernel = QuantizedWeight(q, **_sharding(kernel))
        self.scale = QuantizationScale(scale, **_sharding(kernel, reduced))
        self.bias = einsum.bias
        self.einsum_str = einsum.einsum_str
        self.dtype = einsum.dtype or kernel[...].dtype

    def __call__(self, x: Array) -> Array:
        # The scale covers the output's trailing (channel) axes, so it broadcasts onto them.
        y = jnp.einsum(self.einsum_str, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        y = y * self.scale[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def quantize_model(model: nnx.Module, *, embeddings: bool = True) -> nnx.Module:
    """A copy of the model whose Linear kernels (and Embed tables) are int8; same call API."""
    model = nnx.merge(*nnx.split(model))  # a new module tree; the input model is left untouched
    targets = (nnx.Linear, nnx.Einsum, nnx.Embed) if embeddings else (nnx.Linear, nnx.Einsum)
    swaps = []
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.List):
            swaps += [
                (node, i, child) for i, child in enumerate(node) if isinstance(child, targets)
            ]
        elif isinstance(node, nnx.Module):
            swaps += [
                (node, name, child)
                for name, child in vars(node).items()
                if isinstance(child, targets)
            ]
    for parent, key, child in swaps:
        new = (
            Int8Linear(child)
            if isinstance(child, nnx.Linear)
            else Int8Einsum(child)
            if isinstance(child, nnx.Einsum)
            else Int8Embed(child)
        )
        if isinstance(parent, nnx.List):
            parent[key] = new
        else:
            setattr(parent, key, new)
    return model


def param_bytes(model: nnx.Module) -> int:
    """Bytes of the model's weights (parameters, int8 values and scales; not RNG state)."""
    state = nnx.state(model, nnx.Not(nnx.RngState))
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))
