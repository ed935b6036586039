"""Decoder-only (GPT-style) language model: causal, with packed-sequence support."""

from __future__ import annotations

from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer import attention as attn_lib
from jaxformer.attention_layer import AttentionInputs
from jaxformer.batches import Batch, TokenBatch
from jaxformer.loss_inputs import TokenLossInputs
from jaxformer.models.block import Embeddings, LmHead, make_norm
from jaxformer.models.config import ModelConfig
from jaxformer.models.stack import decode_blocks, init_cache, make_blocks, run_blocks

Array = jax.Array


class DecoderLM(nnx.Module):
    """Token embedding, causal blocks, final norm, LM head."""

    objective: ClassVar[str] = "causal_lm"
    """What the family pretrains on (data.objective=auto)."""
    task_kinds: ClassVar[tuple[str, ...]] = ("completion", "chat")
    """The fine-tuning task kinds it trains on."""
    generates: ClassVar[bool] = True
    """Whether it decodes text (a KV-cached `decode_step`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = Embeddings(cfg, rngs=rngs)
        self.blocks = make_blocks(cfg, cfg.num_layers, rngs=rngs)
        self.final_norm = make_norm(cfg, rngs) if cfg.norm_position == "pre" else None
        self.head = LmHead(cfg, rngs=rngs)

    def __call__(
        self,
        tokens_BxL: Array,
        *,
        segment_ids: Optional[Array] = None,
        positions: Optional[Array] = None,
    ) -> Array:
        """Logits [B, L, V]; with segment_ids, packed documents do not attend to each other."""
        return self.logits(self.hidden(tokens_BxL, segment_ids=segment_ids, positions=positions))

    def hidden(
        self,
        tokens_BxL: Array,
        *,
        segment_ids: Optional[Array] = None,
        positions: Optional[Array] = None,
    ) -> Array:
        """Final hidden states [B, L, D], before the LM head (see `logits`)."""
        cfg = self.config
        x_BxLxD = self.embed(tokens_BxL, positions)
        inputs = AttentionInputs(
            is_causal=True,
            segment_ids=segment_ids,
            positions=positions,
            sliding_window=cfg.sliding_window,
        )
        return run_blocks(
            self.blocks,
            x_BxLxD,
            inputs,
            remat=cfg.remat,
            scan=cfg.scan_layers,
            windows=cfg.layer_windows(cfg.num_layers),
        )

    def logits(self, x_BxLxD: Array, head_DxV: Optional[Array] = None) -> Array:
        """Float32 logits [B, L, V] of hidden states (any length: the loss calls it per chunk)."""
        if self.final_norm is not None:
            x_BxLxD = self.final_norm(x_BxLxD)
        return self.head(x_BxLxD, self.embed, head_DxV)

    def loss_inputs(self, batch: Batch) -> TokenLossInputs:
        """Next-token loss inputs of a token batch: hidden states [B, L, D] and `logits`."""
        if not isinstance(batch, TokenBatch):
            raise TypeError(
                f"a decoder-only model trains on a TokenBatch, got {type(batch).__name__}"
            )
        hidden_BxLxD = self.hidden(
            batch.inputs, segment_ids=batch.segment_ids, positions=batch.positions
        )
        return TokenLossInputs(hidden_BxLxD, self.logits, batch.targets, batch.loss_weights)

    def init_cache(self, batch: int, length: int) -> dict:
        """An empty K/V cache of `length` slots per row: {k, v}, each [layers, B, K, length, H]."""
        return init_cache(self.config, self.config.num_layers, batch, length)

    def decode_step(
        self,
        tokens_BxT: Array,
        cache: dict,
        *,
        index: Array,
        positions: Optional[Array] = None,
        kv_valid: Optional[Array] = None,
        last_only: bool = False,
        layers: Optional[list] = None,
        head_DxV: Optional[Array] = None,
    ) -> tuple[Array, dict]:
        """Logits [B, T, V] of T new tokens written to cache slots index..index+T-1, and the cache.

        `positions` [B, T] defaults to index + arange(T); `kv_valid` [B, M] marks the cache slots
        holding real tokens (False for left padding), so rows of different lengths share a slot
        index while keeping their own positions. `last_only`: the logits of the last token only,
        [B, 1, V] (a prefill needs no others; the head over a whole prompt costs more than the
        blocks: [B, P, V] for a 50k vocabulary), and the last layer runs its queries, output
        projection and MLP for that token alone. `layers`: `stack.split_layers(self.blocks)`;
        `head_DxV`: `self.head.decode_table(self.embed)`; both made once before a token loop.
        """
        b, t = tokens_BxT.shape
        if positions is None:
            positions = jnp.broadcast_to(index + jnp.arange(t)[None, :], (b, t))
        x_BxTxD = self.embed(tokens_BxT, positions)
        mask = None if kv_valid is None else attn_lib.padding_mask(kv_valid)
        inputs = AttentionInputs(
            positions=positions, mask=mask, sliding_window=self.config.sliding_window
        )
        x_BxTxD, cache = decode_blocks(
            self.blocks,
            x_BxTxD,
            cache,
            index=index,
            self_inputs=inputs,
            scan=self.config.scan_layers,
            windows=self.config.layer_windows(self.config.num_layers),
            layers=layers,
            last_only=last_only,
        )
        return self.logits(x_BxTxD, head_DxV), cache
