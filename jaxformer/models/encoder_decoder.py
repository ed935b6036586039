"""Encoder-decoder (T5-style) model: relative-position bias, causal decoder with cross-attention."""

from __future__ import annotations

from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer import attention as attn_lib
from jaxformer import layers
from jaxformer.attention_layer import AttentionInputs
from jaxformer.batches import Batch, Seq2SeqBatch
from jaxformer.loss_inputs import TokenLossInputs
from jaxformer.models.block import Embeddings, LmHead, make_norm
from jaxformer.models.config import ModelConfig
from jaxformer.models.stack import cache_length, decode_blocks, init_cache, make_blocks, run_blocks

Array = jax.Array


def _relative_bias(cfg: ModelConfig, *, bidirectional: bool, rngs: nnx.Rngs):
    if cfg.position != "relative":
        return None
    return layers.RelativePositionBias(
        cfg.num_heads,
        bidirectional=bidirectional,
        num_buckets=cfg.relative_buckets,
        max_distance=cfg.relative_max_distance,
        std=cfg.init_std,
        param_dtype=jnp.dtype(cfg.param_dtype),
        rngs=rngs,
    )


class EncoderDecoderLM(nnx.Module):
    """Shared embedding, bidirectional encoder, causal decoder attending to the whole encoder."""

    objective: ClassVar[str] = "span_corruption"
    task_kinds: ClassVar[tuple[str, ...]] = ("text2text",)
    generates: ClassVar[bool] = True

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = Embeddings(cfg, rngs=rngs)
        self.encoder_blocks = make_blocks(cfg, cfg.num_layers, rngs=rngs)
        self.encoder_norm = make_norm(cfg, rngs)
        self.encoder_bias = _relative_bias(cfg, bidirectional=True, rngs=rngs)
        self.decoder_blocks = make_blocks(cfg, cfg.decoder_layers, cross_attention=True, rngs=rngs)
        self.decoder_norm = make_norm(cfg, rngs)
        self.decoder_bias = _relative_bias(cfg, bidirectional=False, rngs=rngs)
        self.head = LmHead(cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

    def _position_bias(self, bias_module, q_len: int, kv_len: int, offset: int = 0):
        if bias_module is None:
            return None
        return bias_module(jnp.arange(q_len) + offset, jnp.arange(kv_len))

    def encode(self, encoder_tokens_BxS: Array, *, encoder_mask: Optional[Array] = None) -> Array:
        """Encoder hidden states [B, S, D]."""
        s = encoder_tokens_BxS.shape[1]
        x = self.embed(encoder_tokens_BxS)
        mask = None if encoder_mask is None else attn_lib.padding_mask(encoder_mask)
        cfg = self.config
        inputs = AttentionInputs(
            mask=mask,
            bias=self._position_bias(self.encoder_bias, s, s),
            sliding_window=cfg.sliding_window,
        )
        x = run_blocks(
            self.encoder_blocks,
            x,
            inputs,
            remat=cfg.remat,
            scan=cfg.scan_layers,
            windows=cfg.layer_windows(cfg.num_layers),
        )
        return self.dropout(self.encoder_norm(x))

    def decoder_logits(
        self,
        decoder_tokens_BxT: Array,
        encoded_BxSxD: Array,
        *,
        encoder_mask: Optional[Array] = None,
        decoder_mask: Optional[Array] = None,
    ) -> Array:
        """Decoder logits [B, T, V] of a full uncached pass over the decoder tokens, given the
        encoder's hidden states (one cached step at a time: `decode_step`)."""
        return self.logits(
            self.decoder_hidden(
                decoder_tokens_BxT,
                encoded_BxSxD,
                encoder_mask=encoder_mask,
                decoder_mask=decoder_mask,
            )
        )

    def decoder_hidden(
        self,
        decoder_tokens_BxT: Array,
        encoded_BxSxD: Array,
        *,
        encoder_mask: Optional[Array] = None,
        decoder_mask: Optional[Array] = None,
    ) -> Array:
        """Final decoder hidden states [B, T, D] (normed), before the LM head (see `logits`)."""
        t = decoder_tokens_BxT.shape[1]
        x = self.embed(decoder_tokens_BxT)
        self_mask = None if decoder_mask is None else attn_lib.padding_mask(decoder_mask)
        self_inputs = AttentionInputs(
            mask=self_mask,
            is_causal=True,
            bias=self._position_bias(self.decoder_bias, t, t),
            sliding_window=self.config.sliding_window,
        )
        cross_mask = None if encoder_mask is None else attn_lib.padding_mask(encoder_mask)
        x = run_blocks(
            self.decoder_blocks,
            x,
            self_inputs,
            remat=self.config.remat,
            scan=self.config.scan_layers,
            context_BxSxD=encoded_BxSxD,
            cross_inputs=AttentionInputs(mask=cross_mask),
            windows=self.config.layer_windows(self.config.decoder_layers),
        )
        return self._final(x)

    def _final(self, x_BxTxD: Array) -> Array:
        # Dropout lives here, not in `logits`, so the chunked loss can call `logits` under scan.
        return self.dropout(self.decoder_norm(x_BxTxD))

    def logits(self, x_BxTxD: Array, head_DxV: Optional[Array] = None) -> Array:
        """Float32 logits [B, T, V] of decoder hidden states (the loss calls it per chunk)."""
        return self.head(x_BxTxD, self.embed, head_DxV)

    def init_cache(self, encoded_BxSxD: Array, length: int) -> dict:
        """Stacked over decoder layers: an empty self-attention K/V cache of `length` slots and
        the cross-attention keys/values of the encoder output, projected once."""
        graphdef, state = nnx.split(self.decoder_blocks)

        def project(layer_state):
            return nnx.merge(graphdef, layer_state).cross_attn.project_kv(encoded_BxSxD)

        cross_k, cross_v = jax.lax.map(project, state)
        cache = init_cache(self.config, self.config.decoder_layers, encoded_BxSxD.shape[0], length)
        return dict(cache, cross_k=cross_k, cross_v=cross_v)

    def decode_step(
        self,
        decoder_tokens_BxT: Array,
        cache: dict,
        *,
        index: Array,
        encoder_mask: Optional[Array] = None,
        layers: Optional[list] = None,
        head_DxV: Optional[Array] = None,
    ) -> tuple[Array, dict]:
        """Logits [B, T, V] of T new decoder tokens at positions index..index+T-1, and the cache.

        `layers`: `stack.split_layers(self.decoder_blocks)`; `head_DxV`:
        `self.head.decode_table(self.embed)`; both made once before a token loop."""
        b, t = decoder_tokens_BxT.shape
        length = cache_length(cache)
        positions = jnp.broadcast_to(index + jnp.arange(t)[None, :], (b, t))
        x = self.embed(decoder_tokens_BxT, positions)
        self_inputs = AttentionInputs(
            positions=positions,
            bias=self._position_bias(self.decoder_bias, t, length, offset=index),
            sliding_window=self.config.sliding_window,
        )
        cross_mask = None if encoder_mask is None else attn_lib.padding_mask(encoder_mask)
        x, cache = decode_blocks(
            self.decoder_blocks,
            x,
            cache,
            index=index,
            self_inputs=self_inputs,
            scan=self.config.scan_layers,
            cross_inputs=AttentionInputs(mask=cross_mask, positions=positions),
            windows=self.config.layer_windows(self.config.decoder_layers),
            layers=layers,
        )
        return self.logits(self._final(x), head_DxV), cache

    def hidden(
        self,
        encoder_tokens_BxS: Array,
        decoder_tokens_BxT: Array,
        *,
        encoder_mask: Optional[Array] = None,
        decoder_mask: Optional[Array] = None,
    ) -> Array:
        """Decoder hidden states [B, T, D] for the whole model (the loss's view; see `logits`)."""
        encoded = self.encode(encoder_tokens_BxS, encoder_mask=encoder_mask)
        return self.decoder_hidden(
            decoder_tokens_BxT, encoded, encoder_mask=encoder_mask, decoder_mask=decoder_mask
        )

    def loss_inputs(self, batch: Batch) -> TokenLossInputs:
        """Decoder-token loss inputs of a Seq2SeqBatch: decoder hidden states [B, T, D]."""
        if not isinstance(batch, Seq2SeqBatch):
            raise TypeError(
                f"an encoder-decoder model trains on a Seq2SeqBatch, got {type(batch).__name__}"
            )
        hidden_BxTxD = self.hidden(
            batch.encoder_inputs,
            batch.decoder_inputs,
            encoder_mask=batch.encoder_segment_ids > 0,
            decoder_mask=batch.decoder_segment_ids > 0,
        )
        return TokenLossInputs(hidden_BxTxD, self.logits, batch.targets, batch.loss_weights)

    def __call__(
        self,
        encoder_tokens_BxS: Array,
        decoder_tokens_BxT: Array,
        *,
        encoder_mask: Optional[Array] = None,
        decoder_mask: Optional[Array] = None,
    ) -> Array:
        """Logits [B, T, V] of the decoder tokens' successors."""
        return self.logits(
            self.hidden(
                encoder_tokens_BxS,
                decoder_tokens_BxT,
                encoder_mask=encoder_mask,
                decoder_mask=decoder_mask,
            )
        )
