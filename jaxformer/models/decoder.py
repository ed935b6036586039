"""Decoder-only (GPT-style) language model: causal, with packed-sequence support."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer import attention as attn_lib
from jaxformer.models.block import (Embeddings, LmHead, decode_blocks, init_cache, make_blocks,
                                    make_norm, run_blocks)
from jaxformer.models.config import ModelConfig

Array = jax.Array


class DecoderLM(nnx.Module):
    """Token embedding, causal blocks, final norm, LM head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = Embeddings(cfg, rngs=rngs)
        self.blocks = make_blocks(cfg, cfg.num_layers, rngs=rngs)
        self.final_norm = make_norm(cfg, rngs) if cfg.norm_position == "pre" else None
        self.head = LmHead(cfg, rngs=rngs)

    def __call__(self, tokens_BxL: Array, *, segment_ids: Optional[Array] = None,
                 positions: Optional[Array] = None) -> Array:
        """Logits [B, L, V]; with segment_ids, packed documents do not attend to each other."""
        x_BxLxD = self.embed(tokens_BxL, positions)
        self_kwargs = dict(is_causal=True, segment_ids=segment_ids, positions=positions,
                           sliding_window=self.config.sliding_window)
        x_BxLxD = run_blocks(self.blocks, x_BxLxD, self.config.remat, self_kwargs=self_kwargs)
        return self._logits(x_BxLxD)

    def _logits(self, x_BxLxD: Array) -> Array:
        if self.final_norm is not None:
            x_BxLxD = self.final_norm(x_BxLxD)
        return self.head(x_BxLxD, self.embed)

    def init_cache(self, batch: int, length: int) -> list[dict]:
        """An empty K/V cache of `length` slots per row: one {k, v} dict per layer."""
        return [init_cache(self.config, batch, length) for _ in self.blocks]

    def decode_step(self, tokens_BxT: Array, cache: list[dict], *, index: Array,
                    positions: Optional[Array] = None,
                    kv_valid: Optional[Array] = None) -> tuple[Array, list[dict]]:
        """Logits [B, T, V] of T new tokens written to cache slots index..index+T-1, and the cache.

        `positions` [B, T] defaults to index + arange(T); `kv_valid` [B, M] marks the cache slots
        holding real tokens (False for left padding), so rows of different lengths share a slot
        index while keeping their own positions.
        """
        b, t = tokens_BxT.shape
        if positions is None:
            positions = jnp.broadcast_to(index + jnp.arange(t)[None, :], (b, t))
        x_BxTxD = self.embed(tokens_BxT, positions)
        mask = None if kv_valid is None else attn_lib.padding_mask(kv_valid)
        self_kwargs = dict(index=index, positions=positions, mask=mask,
                           sliding_window=self.config.sliding_window)
        x_BxTxD, cache = decode_blocks(self.blocks, x_BxTxD, cache, self_kwargs=self_kwargs)
        return self._logits(x_BxTxD), cache
