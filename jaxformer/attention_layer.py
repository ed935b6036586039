"""Multi-head attention as an NNX module: per-head projections, GQA, RoPE, q/k norms, soft-cap,
and the incremental form over a K/V cache for generation.

The math is `jaxformer.attention.dot_product_attention`; this module owns the parameters (with
logical axis names, as every `jaxformer.layers` module) and what surrounds the kernel: the
projections, positions, norms and the cache's reads and writes. It takes plain arguments rather
than a config object and needs no mesh.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer import attention as attn_lib
from jaxformer import positional
from jaxformer.dense import Projection
from jaxformer.layers import norm, projection
from jaxformer.logical import constrain

Array = jax.Array
Dtype = Any


class AttentionInputs(NamedTuple):
    """Everything an attention call reads besides hidden states; masks are True where allowed."""

    mask: Optional[Array] = None
    """Boolean, broadcastable to [B, N, T, S] (e.g. padding)."""
    bias: Optional[Array] = None
    """Additive float bias broadcastable to [B, N, T, S] (T5 relative positions)."""
    is_causal: bool = False
    segment_ids: Optional[Array] = None
    """[B, T] packed-document ids: tokens attend only within their document."""
    kv_segment_ids: Optional[Array] = None
    sliding_window: Optional[attn_lib.Window] = None
    """Keys within this distance (an int, or a traced per-layer scalar; see attention.Window)."""
    positions: Optional[Array] = None
    """[B, T] query positions for RoPE (default arange)."""
    kv_positions: Optional[Array] = None
    """[B, S] context positions for RoPE in cross-attention."""


def _first_slots(x: Optional[Array], span: int) -> Optional[Array]:
    """A mask or bias over cache slots (last axis; size 1: broadcast) cut to the first `span`."""
    return x if x is None or x.shape[-1] == 1 else x[..., :span]


def _last_rows(x: Optional[Array], rows: int) -> Optional[Array]:
    """A [..., T, S] mask or bias (a size-1 T: broadcast) cut to its last `rows` query rows."""
    return x if x is None or x.ndim < 2 or x.shape[-2] in (1, rows) else x[..., -rows:, :]


class Attention(nnx.Module):
    """Multi-head self- or cross-attention with GQA, optional RoPE and a choice of kernels.

    Projections are per head: query/key/value kernels [embed, heads, head_dim] and the output
    kernel [heads, head_dim, embed], so tensor parallelism splits whole heads. Options: biases on
    q/k/v only (`qkv_bias`), per-head query/key norms before RoPE (`qk_norm`, a norm kind),
    a logit scale other than head_dim**-0.5 (`logit_scale`), soft-capped logits (`logit_softcap`)
    and scaled RoPE frequencies (`rope_scaling`). `decode` is the
    incremental form for generation: it writes the new tokens' keys/values into a functional K/V
    cache (a pair of arrays passed in and returned) and attends over it.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        use_bias: bool,
        qkv_bias: Optional[bool] = None,
        scale_logits: bool = True,
        logit_scale: Optional[float] = None,
        logit_softcap: Optional[float] = None,
        rope_theta: Optional[float] = None,
        rope_scaling: Optional[positional.RopeScaling] = None,
        qk_norm: Optional[str] = None,
        norm_eps: float = 1e-6,
        norm_unit_offset: bool = False,
        implementation: str = "plain",
        std: float = 0.02,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}"
            )
        kw = dict(std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        in_bias = use_bias if qkv_bias is None else qkv_bias

        def in_proj(heads: int, name: str) -> Projection:
            return projection(
                "BTD,DNH->BTNH",
                (d_model, heads, head_dim),
                ("embed", name, "head_dim"),
                (heads, head_dim) if in_bias else None,
                (name, "head_dim"),
                **kw,
            )

        self.query = in_proj(num_heads, "heads")
        self.key = in_proj(num_kv_heads, "kv_heads")
        self.value = in_proj(num_kv_heads, "kv_heads")
        self.out = projection(
            "BTNH,NHD->BTD",
            (num_heads, head_dim, d_model),
            ("heads", "head_dim", "embed"),
            (d_model,) if use_bias else None,
            ("embed",),
            **kw,
        )
        # Created after the projections, so configs without them draw the same initial values.
        norm_kw = dict(
            eps=norm_eps,
            axis="head_dim",
            unit_offset=norm_unit_offset,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.query_norm = None if qk_norm is None else norm(qk_norm, head_dim, **norm_kw)
        self.key_norm = None if qk_norm is None else norm(qk_norm, head_dim, **norm_kw)
        if logit_scale is not None:
            self.scale = logit_scale
        else:
            self.scale = head_dim**-0.5 if scale_logits else 1.0
        self.logit_softcap = logit_softcap
        self.rope_theta, self.rope_scaling = rope_theta, rope_scaling
        self.implementation = implementation

    def project_kv(
        self, context_BxSxD: Array, kv_positions_BxS: Optional[Array] = None
    ) -> tuple[Array, Array]:
        """Keys and values [B, S, K, H] of a context (computed once for cross-attention caches)."""
        k_BxSxKxH, v_BxSxKxH = self.key(context_BxSxD), self.value(context_BxSxD)
        if self.key_norm is not None:
            k_BxSxKxH = self.key_norm(k_BxSxKxH)
        k_BxSxKxH = self._rotated(k_BxSxKxH, kv_positions_BxS)
        names = ("batch", "length", "kv_heads", "head_dim")
        return constrain(k_BxSxKxH, names), constrain(v_BxSxKxH, names)

    def __call__(
        self,
        x_BxTxD: Array,
        context_BxSxD: Optional[Array] = None,
        inputs: AttentionInputs = AttentionInputs(),
        *,
        kv: Optional[tuple[Array, Array]] = None,
    ) -> Array:
        """Attends from x to the context (x itself when None) or to precomputed `kv`."""
        q_BxTxNxH = self._query(x_BxTxD, inputs.positions)
        if kv is None:
            source = x_BxTxD if context_BxSxD is None else context_BxSxD
            kv = self.project_kv(
                source, inputs.positions if context_BxSxD is None else inputs.kv_positions
            )
        k_BxSxKxH, v_BxSxKxH = kv
        out_BxTxNxH = attn_lib.dot_product_attention(
            q_BxTxNxH,
            k_BxSxKxH,
            v_BxSxKxH,
            bias=inputs.bias,
            mask=inputs.mask,
            is_causal=inputs.is_causal,
            segment_ids=inputs.segment_ids,
            kv_segment_ids=inputs.kv_segment_ids,
            sliding_window=inputs.sliding_window,
            scale=self.scale,
            logit_softcap=self.logit_softcap,
            implementation=self.implementation,
        )
        return self.out(constrain(out_BxTxNxH, ("batch", "length", "heads", "head_dim")))

    def decode(
        self,
        x_BxTxD: Array,
        cache: tuple[Array, Array],
        *,
        index: Array,
        inputs: AttentionInputs = AttentionInputs(),
        layer: Optional[Array] = None,
        last_only: bool = False,
    ) -> tuple[Array, tuple[Array, Array]]:
        """Causal self-attention of T new tokens against a preallocated K/V cache.

        `cache` is (keys, values), each [B, K, M, H] (kv heads before slots, as Hugging Face's
        caches: one head's slots are contiguous, the layout the attention's batched matmuls read,
        so a step does not transpose the whole cache), or for one row without the batch axis,
        keys [K, H, M] and values [K, M, H] (`stack.without_batch_axis`: there XLA's CPU backend
        runs q @ k as a matrix-vector product that wants the keys so), or with `layer` each
        stacked over layers,
        [layers, B, K, M, H], of which this attention reads and writes layer `layer`. The new
        tokens occupy slots index..index+T-1 (written with dynamic_update_slice) and query i sees
        the slots <= index + i, so slots not yet written are masked out. `inputs.mask`
        ([B, 1, 1 or T, M]) can hide more slots, e.g. left padding; `inputs.positions` default to
        index + arange(T). Returns the output [B, T, D] and the updated cache, shaped as given;
        with `last_only`, all T tokens' keys and values are written but only the last one
        queries: the output is [B, 1, D].
        """
        b, t, _ = x_BxTxD.shape
        k_cache, v_cache = cache
        max_len = v_cache.shape[-2]  # keys may be [K, H, M]
        positions = inputs.positions
        if positions is None:
            positions = jnp.broadcast_to(index + jnp.arange(t)[None, :], (b, t))
        k_new, v_new = self.project_kv(x_BxTxD, positions)
        new_BxKxTxH = [jnp.swapaxes(new, 1, 2).astype(k_cache.dtype) for new in (k_new, v_new)]
        if layer is None and k_cache.ndim == 3:  # one row: keys [K, H, M], values [K, M, H]
            if b != 1:
                raise ValueError(f"a [K, H, M] cache has no batch axis: it is for one row, not {b}")
            new_k_KxHxT, new_v_KxTxH = jnp.swapaxes(new_BxKxTxH[0][0], 1, 2), new_BxKxTxH[1][0]
            k_cache = jax.lax.dynamic_update_slice(k_cache, new_k_KxHxT, (0, 0, index))
            v_cache = jax.lax.dynamic_update_slice(v_cache, new_v_KxTxH, (0, index, 0))
            k_read, v_read = jnp.swapaxes(k_cache, 1, 2)[None], v_cache[None]
        elif layer is None:  # one layer's own buffers, updated in place and read whole
            k_cache, v_cache = (
                jax.lax.dynamic_update_slice(c, new, (0, 0, index, 0))
                for c, new in zip((k_cache, v_cache), new_BxKxTxH)
            )
            k_read, v_read = k_cache, v_cache
        else:
            # Written into the stacked arrays themselves, then the layer read back out: in a scan
            # over layers that carries the stack, the write is in place. Updating a slice of the
            # layer instead costs copies of its whole cache.
            k_cache, v_cache = (
                jax.lax.dynamic_update_slice(c, new[None], (layer, 0, 0, index, 0))
                for c, new in zip((k_cache, v_cache), new_BxKxTxH)
            )
            k_read, v_read = (
                jax.lax.dynamic_index_in_dim(c, layer, keepdims=False) for c in (k_cache, v_cache)
            )
        # A prefill (a Python int index) attends over the slots up to its last token only: the
        # later ones are masked for every query (causal) and would cost logits for nothing.
        span = index + t if isinstance(index, int) else max_len
        k_BxSxKxH, v_BxSxKxH = (jnp.swapaxes(c[:, :, :span], 1, 2) for c in (k_read, v_read))
        window = inputs.sliding_window
        x_q, positions_q, rows, first_query = x_BxTxD, positions, t, index
        if last_only:  # every token's keys and values are written above; the last one queries
            x_q, positions_q = x_BxTxD[:, -1:], positions[:, -1:]
            rows, first_query = 1, index + t - 1
        if isinstance(index, int) and index == 0 and not last_only:
            # A prefill from slot 0 is causal self-attention over its own tokens: said so, the
            # kernels skip the masked keys instead of masking them (plain: blocks of query rows
            # against the keys up to their last row; chunked: whole chunks).
            written, structure = None, dict(is_causal=True, sliding_window=window)
        else:
            written = (
                attn_lib.causal_mask(rows, span, offset=first_query)
                if window is None
                else attn_lib.sliding_window_mask(rows, span, window=window, offset=first_query)
            )
            structure = {}
        # The cache's validity is an arbitrary mask, which the fused kernels do not all take:
        # chunked for a long prefill (linear memory), plain for the one-token steps.
        long = rows * span >= attn_lib.CHUNKED_MIN_LOGITS
        impl = (
            "chunked"
            if self.implementation == "chunked" or (self.implementation == "auto" and long)
            else "plain"
        )
        out_BxTxNxH = attn_lib.dot_product_attention(
            self._query(x_q, positions_q),
            k_BxSxKxH,
            v_BxSxKxH,
            bias=_last_rows(_first_slots(inputs.bias, span), rows),
            mask=attn_lib.combine_masks(written, _last_rows(_first_slots(inputs.mask, span), rows)),
            scale=self.scale,
            logit_softcap=self.logit_softcap,
            implementation=impl,
            **structure,
        )
        out = self.out  # LoRA or int8 wrappers keep their own call
        merged = isinstance(out, Projection)
        out_BxTxD = out.merged_heads(out_BxTxNxH) if merged else out(out_BxTxNxH)
        return out_BxTxD, (k_cache, v_cache)

    def _query(self, x_BxTxD: Array, positions: Optional[Array]) -> Array:
        q_BxTxNxH = self.query(x_BxTxD)
        if self.query_norm is not None:
            q_BxTxNxH = self.query_norm(q_BxTxNxH)
        q_BxTxNxH = self._rotated(q_BxTxNxH, positions)
        return constrain(q_BxTxNxH, ("batch", "length", "heads", "head_dim"))

    def _rotated(self, x_BxLxNxH: Array, positions_BxL: Optional[Array]) -> Array:
        """Queries or keys with this layer's RoPE at `positions_BxL` (default arange(L)); as they
        are without RoPE."""
        if self.rope_theta is None:
            return x_BxLxNxH
        b, length = x_BxLxNxH.shape[:2]
        return positional.apply_rope(
            x_BxLxNxH,
            _positions(positions_BxL, b, length),
            theta=self.rope_theta,
            scaling=self.rope_scaling,
        )


def _positions(positions: Optional[Array], batch: int, length: int) -> Array:
    if positions is not None:
        return positions
    return jnp.broadcast_to(jnp.arange(length)[None, :], (batch, length))
