"""Flax NNX building blocks: embeddings, dense layers, attention, MLPs and norms.

Every parameter carries logical axis names (`vocab`, `embed`, `mlp`, `heads`, `kv_heads`,
`position`, `relpos`) that `jaxformer.sharding` maps onto the device mesh. The modules take plain
arguments rather than a config object, so other projects can use them on their own.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer import attention as attn_lib
from jaxformer import positional

Array = jax.Array
Dtype = Any


def normal_init(std: float, axes: tuple[Optional[str], ...]) -> Callable:
    """A normal initializer whose parameter is annotated with logical axis names."""
    return nnx.with_partitioning(nnx.initializers.normal(std), axes)


def zeros_init(axes: tuple[Optional[str], ...]) -> Callable:
    """A zeros initializer annotated with logical axis names."""
    return nnx.with_partitioning(nnx.initializers.zeros_init(), axes)


def ones_init(axes: tuple[Optional[str], ...]) -> Callable:
    """A ones initializer annotated with logical axis names."""
    return nnx.with_partitioning(nnx.initializers.ones_init(), axes)


def dense(in_features: int, out_features: int, axes: tuple[str, str], *, use_bias: bool,
          std: float, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """nnx.Linear with a kernel annotated `axes` and a bias annotated with the output axis."""
    return nnx.Linear(in_features, out_features, use_bias=use_bias,
                      kernel_init=normal_init(std, axes), bias_init=zeros_init((axes[1],)),
                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def embedding(num: int, features: int, axes: tuple[str, str], *, std: float, dtype: Dtype,
              param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.Embed:
    """nnx.Embed whose table is annotated with logical axis names."""
    return nnx.Embed(num, features, embedding_init=normal_init(std, axes), dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)


def norm(kind: str, features: int, *, eps: float, dtype: Dtype, param_dtype: Dtype,
         rngs: nnx.Rngs) -> nnx.Module:
    """LayerNorm ('layernorm') or RMSNorm ('rmsnorm') over the embedding axis."""
    if kind == "rmsnorm":
        return nnx.RMSNorm(features, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                           scale_init=ones_init(("embed",)), rngs=rngs)
    if kind == "layernorm":
        return nnx.LayerNorm(features, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                             scale_init=ones_init(("embed",)), bias_init=zeros_init(("embed",)),
                             rngs=rngs)
    raise ValueError(f"unknown norm {kind!r}; valid: layernorm, rmsnorm")


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "swiglu": jax.nn.silu,
    "geglu": lambda x: jax.nn.gelu(x, approximate=True),
}
GATED = ("swiglu", "geglu")


class Mlp(nnx.Module):
    """Position-wise feed-forward: act(x W_in) W_out, or act(x W_gate) * (x W_in) W_out when gated."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str, use_bias: bool,
                 dropout_rate: float, std: float, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        kw = dict(use_bias=use_bias, std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.activation = activation
        self.gate = dense(d_model, d_ff, ("embed", "mlp"), **kw) if activation in GATED else None
        self.up = dense(d_model, d_ff, ("embed", "mlp"), **kw)
        self.down = dense(d_ff, d_model, ("mlp", "embed"), **kw)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(self, x_BxLxD: Array) -> Array:
        act = ACTIVATIONS[self.activation]
        if self.gate is not None:
            h_BxLxF = act(self.gate(x_BxLxD)) * self.up(x_BxLxD)
        else:
            h_BxLxF = act(self.up(x_BxLxD))
        return self.down(self.dropout(h_BxLxF))


class Attention(nnx.Module):
    """Multi-head self- or cross-attention with GQA, optional RoPE and a choice of kernels.

    `decode` is the incremental form for generation: it writes the new tokens' keys/values into a
    functional K/V cache (a pair of arrays passed in and returned) and attends over it.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 use_bias: bool, scale_logits: bool = True, rope_theta: Optional[float] = None,
                 implementation: str = "plain", std: float = 0.02, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        kw = dict(use_bias=use_bias, std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.query = dense(d_model, num_heads * head_dim, ("embed", "heads"), **kw)
        self.key = dense(d_model, num_kv_heads * head_dim, ("embed", "kv_heads"), **kw)
        self.value = dense(d_model, num_kv_heads * head_dim, ("embed", "kv_heads"), **kw)
        self.out = dense(num_heads * head_dim, d_model, ("heads", "embed"), **kw)
        self.scale = head_dim ** -0.5 if scale_logits else 1.0
        self.rope_theta = rope_theta
        self.implementation = implementation

    def project_kv(self, context_BxSxD: Array,
                   kv_positions_BxS: Optional[Array] = None) -> tuple[Array, Array]:
        """Keys and values [B, S, K, H] of a context (computed once for cross-attention caches)."""
        b, s, _ = context_BxSxD.shape
        k = self.key(context_BxSxD).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.value(context_BxSxD).reshape(b, s, self.num_kv_heads, self.head_dim)
        if self.rope_theta is not None:
            k = positional.apply_rope(k, _positions(kv_positions_BxS, b, s), theta=self.rope_theta)
        return k, v

    def __call__(self, x_BxTxD: Array, context_BxSxD: Optional[Array] = None, *,
                 kv: Optional[tuple[Array, Array]] = None, mask: Optional[Array] = None,
                 bias: Optional[Array] = None, is_causal: bool = False,
                 segment_ids: Optional[Array] = None, kv_segment_ids: Optional[Array] = None,
                 sliding_window: Optional[int] = None, positions: Optional[Array] = None,
                 kv_positions: Optional[Array] = None) -> Array:
        """Attends from x to the context (x itself when None) or to precomputed `kv`."""
        b, t, _ = x_BxTxD.shape
        q_BxTxNxH = self._query(x_BxTxD, positions)
        if kv is None:
            source = x_BxTxD if context_BxSxD is None else context_BxSxD
            kv = self.project_kv(source, positions if context_BxSxD is None else kv_positions)
        k_BxSxKxH, v_BxSxKxH = kv
        out_BxTxNxH = attn_lib.dot_product_attention(
            q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, bias=bias, mask=mask, is_causal=is_causal,
            segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, sliding_window=sliding_window,
            scale=self.scale, implementation=self.implementation)
        return self.out(out_BxTxNxH.reshape(b, t, self.num_heads * self.head_dim))

    def decode(self, x_BxTxD: Array, cache: tuple[Array, Array], *, index: Array,
               positions: Optional[Array] = None, mask: Optional[Array] = None,
               bias: Optional[Array] = None,
               sliding_window: Optional[int] = None) -> tuple[Array, tuple[Array, Array]]:
        """Causal self-attention of T new tokens against a preallocated K/V cache.

        `cache` is (keys, values), each [B, M, K, H]; the new tokens occupy slots index..index+T-1
        (written with dynamic_update_slice) and query i sees the slots <= index + i, so slots not
        yet written are masked out. `mask` ([B, 1, 1 or T, M]) can hide more slots, e.g. left
        padding. Returns the output [B, T, D] and the updated cache.
        """
        b, t, _ = x_BxTxD.shape
        k_cache, v_cache = cache
        max_len = k_cache.shape[1]
        if positions is None:
            positions = jnp.broadcast_to(index + jnp.arange(t)[None, :], (b, t))
        k_new, v_new = self.project_kv(x_BxTxD, positions)
        start = (0, index, 0, 0)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k_new.astype(k_cache.dtype), start)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v_new.astype(v_cache.dtype), start)
        written = (attn_lib.causal_mask(t, max_len, offset=index) if sliding_window is None else
                   attn_lib.sliding_window_mask(t, max_len, window=sliding_window, offset=index))
        out_BxTxNxH = attn_lib.dot_product_attention(
            self._query(x_BxTxD, positions), k_cache, v_cache, bias=bias,
            mask=attn_lib.combine_masks(written, mask), scale=self.scale,
            implementation="plain" if self.implementation == "cudnn" else self.implementation)
        out = self.out(out_BxTxNxH.reshape(b, t, self.num_heads * self.head_dim))
        return out, (k_cache, v_cache)

    def _query(self, x_BxTxD: Array, positions: Optional[Array]) -> Array:
        b, t, _ = x_BxTxD.shape
        q_BxTxNxH = self.query(x_BxTxD).reshape(b, t, self.num_heads, self.head_dim)
        if self.rope_theta is not None:
            q_BxTxNxH = positional.apply_rope(q_BxTxNxH, _positions(positions, b, t),
                                              theta=self.rope_theta)
        return q_BxTxNxH


def _positions(positions: Optional[Array], batch: int, length: int) -> Array:
    if positions is not None:
        return positions
    return jnp.broadcast_to(jnp.arange(length)[None, :], (batch, length))


class RelativePositionBias(nnx.Module):
    """T5's learned per-head bias indexed by bucketed relative position."""

    def __init__(self, num_heads: int, *, bidirectional: bool, num_buckets: int,
                 max_distance: int, std: float, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.embedding = nnx.Param(normal_init(std, ("relpos", "heads"))(
            rngs.params(), (num_buckets, num_heads), param_dtype))
        self.bidirectional, self.num_buckets, self.max_distance = (
            bidirectional, num_buckets, max_distance)

    def __call__(self, q_positions_T: Array, kv_positions_S: Array) -> Array:
        """[1, N, T, S] float32 bias."""
        relative = kv_positions_S[None, :] - q_positions_T[:, None]
        buckets_TxS = attn_lib.relative_position_buckets(
            relative, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
            max_distance=self.max_distance)
        bias_TxSxN = jnp.asarray(self.embedding[...], jnp.float32)[buckets_TxS]
        return jnp.transpose(bias_TxSxN, (2, 0, 1))[None]
