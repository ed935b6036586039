"""Flax NNX building blocks: embeddings, dense layers, MLPs, norms, T5's relative bias (the
attention module, built from these, is `jaxformer.attention_layer`).

Every parameter carries logical axis names (`vocab`, `embed`, `mlp`, `heads`, `kv_heads`,
`head_dim`, `position`, `relpos`) and activations are constrained by logical names too
(`jaxformer.logical`); a rule table maps both onto a device mesh. The modules take plain arguments
rather than a config object and need no mesh, so other projects can use them on their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer import attention as attn_lib
from jaxformer import dense as dense_lib
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


def __getattr__(name: str) -> Any:
    # Attention and AttentionInputs moved to jaxformer.attention_layer (which imports this
    # module); `jaxformer.layers.Attention` keeps working for code written against it.
    if name in ("Attention", "AttentionInputs"):
        from jaxformer import attention_layer

        return getattr(attention_layer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
