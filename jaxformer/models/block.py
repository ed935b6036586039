"""Pieces every family shares, built from a ModelConfig: embeddings, the residual block, the LM head.

The layer stack itself (stacked parameters, scan, remat, stacked KV cache) is `models.stack`.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer import attention as attn_lib
from jaxformer import dense, layers, positional
from jaxformer.attention_layer import Attention, AttentionInputs
from jaxformer.logical import constrain
from jaxformer.models.config import TABLE_POSITIONS, ModelConfig

Array = jax.Array
HIDDEN = ("batch", "length", "embed")


def dtypes(cfg: ModelConfig) -> dict[str, Any]:
    """The compute and parameter dtypes of a config as jnp dtypes."""
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def make_attention(cfg: ModelConfig, rngs: nnx.Rngs) -> Attention:
    """An attention layer shaped by the config."""
    return Attention(
        cfg.d_model,
        cfg.num_heads,
        cfg.kv_heads,
        cfg.dims_per_head,
        use_bias=cfg.use_bias,
        qkv_bias=cfg.qkv_bias,
        scale_logits=cfg.scale_attention,
        logit_scale=(
            None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5
        ),
        logit_softcap=cfg.attn_logit_softcap,
        rope_theta=cfg.rope_theta if cfg.position == "rope" else None,
        rope_scaling=cfg.rope_scaling_spec,
        qk_norm=cfg.norm if cfg.qk_norm else None,
        norm_eps=cfg.norm_eps,
        norm_unit_offset=cfg.norm_unit_offset,
        implementation=cfg.attention_impl,
        std=cfg.init_std,
        rngs=rngs,
        **dtypes(cfg),
    )


def make_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The config's norm over d_model."""
    return layers.norm(
        cfg.norm,
        cfg.d_model,
        eps=cfg.norm_eps,
        unit_offset=cfg.norm_unit_offset,
        rngs=rngs,
        **dtypes(cfg),
    )


class Embeddings(nnx.Module):
    """Token embedding plus whatever absolute position and token-type embeddings the config asks for."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        kw = dict(std=cfg.init_std, rngs=rngs, **dtypes(cfg))
        self.max_len, self.position, self.dtype = cfg.max_len, cfg.position, jnp.dtype(cfg.dtype)
        self.multiplier = cfg.d_model**0.5 if cfg.embed_scale else None
        self.token_embed = layers.embedding(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), **kw)
        self.position_embed = (
            layers.embedding(cfg.max_len, cfg.d_model, ("position", "embed"), **kw)
            if cfg.position == "learned"
            else None
        )
        self.type_embed = (
            layers.embedding(cfg.type_vocab_size, cfg.d_model, ("types", "embed"), **kw)
            if cfg.type_vocab_size
            else None
        )
        self.norm = make_norm(cfg, rngs) if cfg.embedding_norm else None
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

    def __call__(
        self,
        tokens_BxL: Array,
        positions_BxL: Optional[Array] = None,
        token_types_BxL: Optional[Array] = None,
    ) -> Array:
        """[B, L, D] input representations."""
        length = tokens_BxL.shape[1]
        if self.position in TABLE_POSITIONS and length > self.max_len:
            raise ValueError(
                f"sequence of {length} tokens is longer than the model's max_len={self.max_len}"
            )
        x_BxLxD = self.token_embed(tokens_BxL)
        if self.multiplier is not None:  # Gemma rounds the multiplier to the compute dtype first
            x_BxLxD = x_BxLxD * jnp.asarray(self.multiplier, x_BxLxD.dtype)
        if positions_BxL is None:
            positions_BxL = jnp.arange(length)[None, :]
        if self.position_embed is not None:
            x_BxLxD = x_BxLxD + self.position_embed(positions_BxL)
        elif self.position == "sinusoidal":
            table = jnp.asarray(positional.sinusoidal_table(self.max_len, x_BxLxD.shape[-1]))
            x_BxLxD = x_BxLxD + table[positions_BxL].astype(x_BxLxD.dtype)
        if self.type_embed is not None:
            types = jnp.zeros_like(tokens_BxL) if token_types_BxL is None else token_types_BxL
            x_BxLxD = x_BxLxD + self.type_embed(types)
        if self.norm is not None:
            x_BxLxD = self.norm(x_BxLxD)
        return constrain(self.dropout(x_BxLxD.astype(self.dtype)), HIDDEN)


class Block(nnx.Module):
    """One residual block: self-attention, optional cross-attention, MLP; pre- or post-norm,
    optionally with each sub-block's output normalised too (`post_norms`, Gemma 2)."""

    def __init__(self, cfg: ModelConfig, *, cross_attention: bool = False, rngs: nnx.Rngs):
        self.pre_norm = cfg.norm_position == "pre"
        self.self_attn = make_attention(cfg, rngs)
        self.self_attn_norm = make_norm(cfg, rngs)
        self.cross_attn = make_attention(cfg, rngs) if cross_attention else None
        self.cross_attn_norm = make_norm(cfg, rngs) if cross_attention else None
        self.mlp = layers.Mlp(
            cfg.d_model,
            cfg.d_ff,
            activation=cfg.mlp,
            use_bias=cfg.use_bias,
            dropout_rate=cfg.dropout_rate,
            std=cfg.init_std,
            rngs=rngs,
            **dtypes(cfg),
        )
        self.mlp_norm = make_norm(cfg, rngs)
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)
        # Created last, so configs without them draw the same initial values.
        post = cfg.post_norms
        self.post_self_attn_norm = make_norm(cfg, rngs) if post else None
        self.post_cross_attn_norm = make_norm(cfg, rngs) if post and cross_attention else None
        self.post_mlp_norm = make_norm(cfg, rngs) if post else None

    def _residual(
        self, x: Array, norm: nnx.Module, fn, post_norm=None, kept: Optional[slice] = None
    ) -> Array:
        """x + fn(norm(x)) (pre-norm) or norm(x + fn(x)); `kept`: the positions (axis 1) that
        `fn` returns, of x's."""
        residual = x if kept is None else x[:, kept]
        if self.pre_norm:
            out = fn(norm(x))
            return residual + self.dropout(out if post_norm is None else post_norm(out))
        return norm(residual + self.dropout(fn(x)))

    def __call__(
        self,
        x_BxLxD: Array,
        self_inputs: AttentionInputs,
        context_BxSxD: Optional[Array] = None,
        cross_inputs: AttentionInputs = AttentionInputs(),
    ) -> Array:
        x = self._residual(
            constrain(x_BxLxD, HIDDEN),
            self.self_attn_norm,
            lambda h: self.self_attn(h, inputs=self_inputs),
            self.post_self_attn_norm,
        )
        if self.cross_attn is not None:
            x = self._residual(
                x,
                self.cross_attn_norm,
                lambda h: self.cross_attn(h, context_BxSxD, cross_inputs),
                self.post_cross_attn_norm,
            )
        return constrain(self._residual(x, self.mlp_norm, self.mlp, self.post_mlp_norm), HIDDEN)

    def decode(
        self,
        x_BxTxD: Array,
        cache: dict,
        *,
        index: Array,
        self_inputs: AttentionInputs,
        cross_inputs: AttentionInputs = AttentionInputs(),
        layer: Optional[Array] = None,
        last_only: bool = False,
    ) -> tuple[Array, dict]:
        """The block on T new tokens with a layer cache {k, v[, cross_k, cross_v]}, or with
        `layer`, the cache of all layers stacked (see Attention.decode), of which it uses that
        layer's. `last_only`: every token's keys and values are written, the output is the last
        token's alone, [B, 1, D]."""
        new_cache = dict(cache)

        def self_attend(h):
            out, (new_cache["k"], new_cache["v"]) = self.self_attn.decode(
                h,
                (cache["k"], cache["v"]),
                index=index,
                inputs=self_inputs,
                layer=layer,
                last_only=last_only,
            )
            return out

        x = self._residual(
            x_BxTxD,
            self.self_attn_norm,
            self_attend,
            self.post_self_attn_norm,
            kept=slice(-1, None) if last_only else None,
        )
        if self.cross_attn is not None:
            cross_kv = (cache["cross_k"], cache["cross_v"])
            if layer is not None:
                cross_kv = tuple(jax.lax.dynamic_index_in_dim(a, layer, 0, False) for a in cross_kv)
            x = self._residual(
                x,
                self.cross_attn_norm,
                lambda h: self.cross_attn(h, None, cross_inputs, kv=cross_kv),
                self.post_cross_attn_norm,
            )
        return self._residual(x, self.mlp_norm, self.mlp, self.post_mlp_norm), new_cache


@jax.custom_vjp
def tied_logits(x_BxLxD: Array, table_VxD: Array) -> Array:
    """x @ table.T, the tied LM head; its gradient never writes the [V, B*L] transposed logits.

    Differentiated as is, XLA's CPU backend computes the table's gradient as
    dlogits.T [V, B*L] @ x and writes that transpose whole (with the softmax recomputed into it):
    the costliest single op of the default run's step. Here it is (x.T @ dlogits).T instead:
    the transposes are of x [B*L, D] and of the [D, V] result, both D/V times smaller.
    With bfloat16 on a CPU the logits come out in float32 and every matmul is
    bf16 x bf16 -> float32 (see jaxformer.dense: XLA upcasts bfloat16-output dots there).
    """
    return jnp.einsum(
        "bld,vd->blv", x_BxLxD, table_VxD, preferred_element_type=_accumulation(x_BxLxD)
    )


def _accumulation(x: Array) -> Optional[Any]:
    return jnp.float32 if dense.cpu_bfloat16(x.dtype) else None


def _tied_logits_fwd(x_BxLxD: Array, table_VxD: Array):
    return tied_logits(x_BxLxD, table_VxD), (x_BxLxD, table_VxD)


def _tied_logits_bwd(residuals, dlogits_BxLxV: Array):
    x_BxLxD, table_VxD = residuals
    if _accumulation(x_BxLxD) is not None:
        # (x.T @ dlogits).T here would have XLA fold the transpose into a bf16 x bf16 -> f32 dot
        # after it picked the dots it upcasts, leaving one its CPU runtime cannot execute.
        dlogits_BxLxV = dlogits_BxLxV.astype(x_BxLxD.dtype)
        f32 = jnp.float32
        dx_BxLxD = jnp.einsum("blv,vd->bld", dlogits_BxLxV, table_VxD, preferred_element_type=f32)
        dtable_VxD = jnp.einsum("blv,bld->vd", dlogits_BxLxV, x_BxLxD, preferred_element_type=f32)
        return dx_BxLxD.astype(x_BxLxD.dtype), dtable_VxD.astype(table_VxD.dtype)
    dx_BxLxD = jnp.einsum("blv,vd->bld", dlogits_BxLxV, table_VxD)
    dtable_DxV = jnp.einsum("bld,blv->dv", x_BxLxD, dlogits_BxLxV)
    return dx_BxLxD.astype(x_BxLxD.dtype), dtable_DxV.T.astype(table_VxD.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


class LmHead(nnx.Module):
    """Output projection to the vocabulary: the transposed token embedding or its own matrix."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.proj = (
            None
            if cfg.tie_embeddings
            else layers.dense(
                cfg.d_model,
                cfg.vocab_size,
                ("embed", "vocab"),
                use_bias=False,
                std=cfg.init_std,
                rngs=rngs,
                **dtypes(cfg),
            )
        )
        self.scale = cfg.d_model**-0.5 if (cfg.tie_embeddings and cfg.scale_tied_logits) else None
        self.softcap = cfg.final_logit_softcap

    def decode_table(self, embeddings: Embeddings) -> Optional[Array]:
        """The tied table transposed, [D, V], for `table_DxV` (None for an untied or quantized
        head). Made once before a token loop, each step's logits read it in the layout a matmul
        wants: x @ table.T reads the [V, D] table across its rows (3.8 vs 3.0 ms per batch-16
        GPT-2 step on CPUs). The barrier keeps XLA from folding the transpose back into the loop.
        """
        embed = embeddings.token_embed
        if self.proj is not None or not isinstance(embed, nnx.Embed):
            return None
        table_VxD = embed.embedding[...]
        if embed.dtype is not None:
            table_VxD = table_VxD.astype(embed.dtype)
        return jax.lax.optimization_barrier(table_VxD.T)

    def __call__(
        self, x_BxLxD: Array, embeddings: Embeddings, table_DxV: Optional[Array] = None
    ) -> Array:
        """[B, L, V] float32 logits (soft-capped in float32 if the config says so); `table_DxV`:
        `decode_table(embeddings)`, in place of the table (inference only)."""
        if self.proj is not None:
            logits_BxLxV = self.proj(x_BxLxD)
        else:
            if self.scale is not None:
                x_BxLxD = x_BxLxD * self.scale
            embed = embeddings.token_embed
            if table_DxV is not None:
                query = x_BxLxD.astype(table_DxV.dtype)
                logits_BxLxV = jnp.einsum(
                    "bld,dv->blv", query, table_DxV, preferred_element_type=_accumulation(query)
                )
            elif isinstance(embed, nnx.Embed):
                query, table_VxD = embed.promote_dtype(
                    (x_BxLxD, embed.embedding[...]), dtype=embed.dtype
                )
                logits_BxLxV = tied_logits(query, table_VxD)
            else:  # a replacement with its own `attend` (inference.quantize's int8 table)
                logits_BxLxV = embed.attend(x_BxLxD)
        logits_BxLxV = attn_lib.softcap(logits_BxLxV.astype(jnp.float32), self.softcap)
        return constrain(logits_BxLxV, ("batch", "length", "vocab"))
