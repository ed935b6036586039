"""Flax NNX building blocks: embeddings, dense layers, attention, MLPs and norms.

Every parameter carries logical axis names (`vocab`, `embed`, `mlp`, `heads`, `kv_heads`,
`head_dim`, `position`, `relpos`) and activations are constrained by logical names too
(`jaxformer.logical`); a rule table maps both onto a device mesh. The modules take plain arguments
rather than a config object and need no mesh, so other projects can use them on their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer import attention as attn_lib
from jaxformer import dense as dense_lib
from jaxformer import positional
from jaxformer.dense import Dense, Projection
from jaxformer.logical import constrain

Array = jax.Array
Dtype = Any


def annotated(init: Callable, axes: tuple[Optional[str], ...]) -> Callable:
    """`init` whose parameter records logical axis names without being placed on any mesh.

    Eager sharding would need a mesh whose axes are our logical names; instead the names stay
    metadata, and `jaxformer.sharding` (or a user's own rules) turns them into shardings.
    """
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def normal_init(std: float, axes: tuple[Optional[str], ...]) -> Callable:
    """A normal initializer whose parameter is annotated with logical axis names."""
    return annotated(nnx.initializers.normal(std), axes)


def zeros_init(axes: tuple[Optional[str], ...]) -> Callable:
    """A zeros initializer annotated with logical axis names."""
    return annotated(nnx.initializers.zeros_init(), axes)


def ones_init(axes: tuple[Optional[str], ...]) -> Callable:
    """A ones initializer annotated with logical axis names."""
    return annotated(nnx.initializers.ones_init(), axes)


def dense(
    in_features: int,
    out_features: int,
    axes: tuple[str, str],
    *,
    use_bias: bool,
    std: float,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
) -> Dense:
    """A Dense (nnx.Linear) layer with a kernel annotated `axes` and a bias annotated with the
    output axis."""
    return Dense(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=normal_init(std, axes),
        bias_init=zeros_init((axes[1],)),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def projection(
    einsum: str,
    kernel_shape: tuple[int, ...],
    kernel_axes: tuple[str, ...],
    bias_shape: Optional[tuple[int, ...]],
    bias_axes: tuple[str, ...],
    *,
    std: float,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
) -> Projection:
    """A Projection (nnx.Einsum) with annotated kernel (and optional bias): the per-head
    attention projections."""
    return Projection(
        einsum,
        kernel_shape,
        bias_shape,
        kernel_init=normal_init(std, kernel_axes),
        bias_init=zeros_init(bias_axes),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def embedding(
    num: int,
    features: int,
    axes: tuple[str, str],
    *,
    std: float,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
) -> nnx.Embed:
    """nnx.Embed whose table is annotated with logical axis names."""
    return nnx.Embed(
        num,
        features,
        embedding_init=normal_init(std, axes),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


NORMS: dict[str, type[nnx.Module]] = {"layernorm": nnx.LayerNorm, "rmsnorm": nnx.RMSNorm}
"""The norm kinds ModelConfig.norm accepts."""


class UnitOffsetNorm(nnx.Module):
    """RMSNorm or LayerNorm whose `scale` is stored as (scale - 1), zero-initialised, and applied
    as (1 + scale), computed in float32 (Gemma's convention: small stored values keep their
    precision in bfloat16 parameters)."""

    def __init__(
        self,
        kind: str,
        features: int,
        *,
        eps: float,
        axis: str,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        self.kind, self.eps, self.dtype = kind, eps, dtype
        self.scale = nnx.Param(zeros_init((axis,))(rngs.params(), (features,), param_dtype))
        self.bias = (
            nnx.Param(zeros_init((axis,))(rngs.params(), (features,), param_dtype))
            if kind == "layernorm"
            else None
        )

    def __call__(self, x: Array) -> Array:
        x_f32 = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x_f32 = x_f32 - x_f32.mean(axis=-1, keepdims=True)
        y = x_f32 * jax.lax.rsqrt(jnp.mean(jnp.square(x_f32), axis=-1, keepdims=True) + self.eps)
        y = y * (1.0 + self.scale[...].astype(jnp.float32))
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def norm(
    kind: str,
    features: int,
    *,
    eps: float,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
    axis: str = "embed",
    unit_offset: bool = False,
) -> nnx.Module:
    """LayerNorm ('layernorm') or RMSNorm ('rmsnorm') over the last axis (logical name `axis`);
    `unit_offset` stores the scale as (scale - 1) (see UnitOffsetNorm)."""
    if kind not in NORMS:
        raise ValueError(f"unknown norm {kind!r}; valid: {', '.join(NORMS)}")
    if unit_offset:
        return UnitOffsetNorm(
            kind, features, eps=eps, axis=axis, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
    # RMSNorm has a scale only; LayerNorm also has a bias.
    bias = dict(bias_init=zeros_init((axis,))) if kind == "layernorm" else {}
    return NORMS[kind](
        features,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=ones_init((axis,)),
        rngs=rngs,
        **bias,
    )


def _gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


def _gelu_exact(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu_tanh,  # GPT-2's gelu_new
    "gelu_exact": _gelu_exact,  # BERT's erf GELU
    "relu": jax.nn.relu,
    "swiglu": jax.nn.silu,
    "geglu": _gelu_tanh,
}
"""The MLP kinds ModelConfig.mlp accepts, by the activation each applies."""
GATED = ("swiglu", "geglu")


class Mlp(nnx.Module):
    """Position-wise feed-forward: act(x W_in) W_out, or act(x W_gate) * (x W_in) W_out when gated."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        activation: str,
        use_bias: bool,
        dropout_rate: float,
        std: float,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
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
        up_BxLxF = self.up(x_BxLxD)
        # On CPUs XLA runs a bfloat16 GELU as a chain of separately rounded bf16 loops (3x the
        # float32 GELU's time at d_ff 1536); in float32 it is one fused loop.
        wide = jnp.float32 if dense_lib.cpu_bfloat16(up_BxLxF.dtype) else up_BxLxF.dtype
        if self.gate is not None:
            h_BxLxF = act(self.gate(x_BxLxD).astype(wide)) * up_BxLxF.astype(wide)
        else:
            h_BxLxF = act(up_BxLxF.astype(wide))
        h_BxLxF = h_BxLxF.astype(up_BxLxF.dtype)
        h_BxLxF = constrain(h_BxLxF, ("batch", "length", "mlp"))
        return self.down(self.dropout(h_BxLxF))


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
        b, s, _ = context_BxSxD.shape
        k_BxSxKxH, v_BxSxKxH = self.key(context_BxSxD), self.value(context_BxSxD)
        if self.key_norm is not None:
            k_BxSxKxH = self.key_norm(k_BxSxKxH)
        if self.rope_theta is not None:
            k_BxSxKxH = positional.apply_rope(
                k_BxSxKxH,
                _positions(kv_positions_BxS, b, s),
                theta=self.rope_theta,
                scaling=self.rope_scaling,
            )
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
    ) -> tuple[Array, tuple[Array, Array]]:
        """Causal self-attention of T new tokens against a preallocated K/V cache.

        `cache` is (keys, values), each [B, K, M, H] (kv heads before slots, as Hugging Face's
        caches: one head's slots are contiguous, the layout the attention's batched matmuls read,
        so a step does not transpose the whole cache), or with `layer` each stacked over layers,
        [layers, B, K, M, H], of which this attention reads and writes layer `layer`. The new
        tokens occupy slots index..index+T-1 (written with dynamic_update_slice) and query i sees
        the slots <= index + i, so slots not yet written are masked out. `inputs.mask`
        ([B, 1, 1 or T, M]) can hide more slots, e.g. left padding; `inputs.positions` default to
        index + arange(T). Returns the output [B, T, D] and the updated cache, shaped as given.
        """
        b, t, _ = x_BxTxD.shape
        k_cache, v_cache = cache
        max_len = k_cache.shape[-2]
        positions = inputs.positions
        if positions is None:
            positions = jnp.broadcast_to(index + jnp.arange(t)[None, :], (b, t))
        k_new, v_new = self.project_kv(x_BxTxD, positions)
        new_BxKxTxH = [jnp.swapaxes(new, 1, 2).astype(k_cache.dtype) for new in (k_new, v_new)]
        if layer is None:  # one layer's own buffers, updated in place and read whole
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
        if isinstance(index, int) and index == 0:
            # A prefill from slot 0 is causal self-attention over its own tokens: said so, the
            # kernels skip the masked keys instead of masking them (plain: blocks of query rows
            # against the keys up to their last row; chunked: whole chunks).
            written, structure = None, dict(is_causal=True, sliding_window=window)
        else:
            written = (
                attn_lib.causal_mask(t, span, offset=index)
                if window is None
                else attn_lib.sliding_window_mask(t, span, window=window, offset=index)
            )
            structure = {}
        # The cache's validity is an arbitrary mask, which the fused kernels do not all take:
        # chunked for a long prefill (linear memory), plain for the one-token steps.
        long = t * span >= attn_lib.CHUNKED_MIN_LOGITS
        impl = (
            "chunked"
            if self.implementation == "chunked" or (self.implementation == "auto" and long)
            else "plain"
        )
        out_BxTxNxH = attn_lib.dot_product_attention(
            self._query(x_BxTxD, positions),
            k_BxSxKxH,
            v_BxSxKxH,
            bias=_first_slots(inputs.bias, span),
            mask=attn_lib.combine_masks(written, _first_slots(inputs.mask, span)),
            scale=self.scale,
            logit_softcap=self.logit_softcap,
            implementation=impl,
            **structure,
        )
        return self.out(out_BxTxNxH), (k_cache, v_cache)

    def _query(self, x_BxTxD: Array, positions: Optional[Array]) -> Array:
        b, t, _ = x_BxTxD.shape
        q_BxTxNxH = self.query(x_BxTxD)
        if self.query_norm is not None:
            q_BxTxNxH = self.query_norm(q_BxTxNxH)
        if self.rope_theta is not None:
            q_BxTxNxH = positional.apply_rope(
                q_BxTxNxH,
                _positions(positions, b, t),
                theta=self.rope_theta,
                scaling=self.rope_scaling,
            )
        return constrain(q_BxTxNxH, ("batch", "length", "heads", "head_dim"))


def _positions(positions: Optional[Array], batch: int, length: int) -> Array:
    if positions is not None:
        return positions
    return jnp.broadcast_to(jnp.arange(length)[None, :], (batch, length))


class RelativePositionBias(nnx.Module):
    """T5's learned per-head bias indexed by bucketed relative position."""

    def __init__(
        self,
        num_heads: int,
        *,
        bidirectional: bool,
        num_buckets: int,
        max_distance: int,
        std: float,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.embedding = nnx.Param(
            normal_init(std, ("relpos", "heads"))(
                rngs.params(), (num_buckets, num_heads), param_dtype
            )
        )
        self.bidirectional, self.num_buckets, self.max_distance = (
            bidirectional,
            num_buckets,
            max_distance,
        )

    def __call__(self, q_positions_T: Array, kv_positions_S: Array) -> Array:
        """[1, N, T, S] float32 bias."""
        relative = kv_positions_S[None, :] - q_positions_T[:, None]
        buckets_TxS = attn_lib.relative_position_buckets(
            relative,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        bias_TxSxN = jnp.asarray(self.embedding[...], jnp.float32)[buckets_TxS]
        return jnp.transpose(bias_TxSxN, (2, 0, 1))[None]
