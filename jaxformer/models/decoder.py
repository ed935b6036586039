"""Decoder-only (GPT-style) language model: causal, with packed-sequence support."""

from __future__ import annotations

from typing import Optional

import jax
from flax import nnx

from jaxformer.models.block import Embeddings, LmHead, make_blocks, make_norm, run_blocks
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
        if self.final_norm is not None:
            x_BxLxD = self.final_norm(x_BxLxD)
        return self.head(x_BxLxD, self.embed)
