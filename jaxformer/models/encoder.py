"""Encoder-only (BERT-style) model: bidirectional, padding mask, masked-LM and classifier heads.

One `classifier` ([embed, num_labels]) serves three task kinds, as the matching Hugging Face
heads are each one linear layer of that shape: over the tanh-pooled first token (classification,
BertForSequenceClassification's `classifier`), over every token (token_classification,
BertForTokenClassification's `classifier`) and over every token with num_labels = 2 (start and
end logits: question_answering, BertForQuestionAnswering's `qa_outputs`). The task kind picks how
it is applied, so no head adds parameters or moves a path.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer import attention as attn_lib
from jaxformer import layers
from jaxformer.attention_layer import AttentionInputs
from jaxformer.batches import (
    Batch,
    ClassificationBatch,
    SpanBatch,
    TokenBatch,
    TokenClassificationBatch,
)
from jaxformer.logical import constrain
from jaxformer.loss_inputs import (
    ClassificationLossInputs,
    LossInputs,
    TokenLossInputs,
    span_loss_inputs,
)
from jaxformer.models.block import Embeddings, dtypes, make_norm
from jaxformer.models.config import ModelConfig
from jaxformer.models.stack import make_blocks, run_blocks

Array = jax.Array


class EncoderLM(nnx.Module):
    """Bidirectional encoder with a masked-LM head (the call) and a classifier: pooled
    (`classify`), per token (`token_logits`) or as answer-span logits (`span_logits`)."""

    objective: ClassVar[str] = "masked_lm"
    task_kinds: ClassVar[tuple[str, ...]] = (
        "classification",
        "token_classification",
        "question_answering",
    )
    generates: ClassVar[bool] = False

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        kw = dict(use_bias=True, std=cfg.init_std, rngs=rngs, **dtypes(cfg))
        self.embed = Embeddings(cfg, rngs=rngs)
        self.blocks = make_blocks(cfg, cfg.num_layers, rngs=rngs)
        self.final_norm = make_norm(cfg, rngs) if cfg.norm_position == "pre" else None
        # Masked-LM head: transform, norm, then the tied (or own) vocabulary projection plus a bias.
        self.mlm_dense = layers.dense(cfg.d_model, cfg.d_model, ("embed", "mlp"), **kw)
        self.mlm_norm = make_norm(cfg, rngs)
        self.mlm_out = (
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
        self.mlm_bias = nnx.Param(
            layers.zeros_init(("vocab",))(
                rngs.params(), (cfg.vocab_size,), jnp.dtype(cfg.param_dtype)
            )
        )
        # Classification head: tanh pooler over the first token, then a linear classifier.
        self.pooler = layers.dense(cfg.d_model, cfg.d_model, ("embed", "mlp"), **kw)
        self.classifier = layers.dense(cfg.d_model, cfg.num_labels, ("embed", None), **kw)
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

    def encode(
        self,
        tokens_BxL: Array,
        *,
        attention_mask: Optional[Array] = None,
        segment_ids: Optional[Array] = None,
        positions: Optional[Array] = None,
        token_types: Optional[Array] = None,
    ) -> Array:
        """Hidden states [B, L, D]; padded positions (attention_mask == 0) are never attended to."""
        x_BxLxD = self.embed(tokens_BxL, positions, token_types)
        mask = None if attention_mask is None else attn_lib.padding_mask(attention_mask)
        inputs = AttentionInputs(
            mask=mask,
            segment_ids=segment_ids,
            positions=positions,
            sliding_window=self.config.sliding_window,
        )
        cfg = self.config
        x_BxLxD = run_blocks(
            self.blocks,
            x_BxLxD,
            inputs,
            remat=cfg.remat,
            scan=cfg.scan_layers,
            windows=cfg.layer_windows(cfg.num_layers),
        )
        if self.final_norm is not None:
            x_BxLxD = self.final_norm(x_BxLxD)
        return x_BxLxD

    def mlm_logits(self, hidden_BxLxD: Array) -> Array:
        """Masked-LM logits [B, L, V] (float32) from hidden states."""
        act = layers.ACTIVATIONS[self.config.mlp]
        h = self.mlm_norm(act(self.mlm_dense(hidden_BxLxD)))
        if self.mlm_out is not None:
            logits = self.mlm_out(h)
        else:
            logits = self.embed.token_embed.attend(h)
        logits = logits.astype(jnp.float32) + self.mlm_bias[...].astype(jnp.float32)
        logits = attn_lib.softcap(logits, self.config.final_logit_softcap)
        return constrain(logits, ("batch", "length", "vocab"))

    def hidden(self, tokens_BxL: Array, **kwargs) -> Array:
        """The loss's view of `encode`: hidden states [B, L, D] that `logits` projects."""
        return self.encode(tokens_BxL, **kwargs)

    def logits(self, hidden_BxLxD: Array) -> Array:
        """The loss's view of `mlm_logits` (called per chunk of positions)."""
        return self.mlm_logits(hidden_BxLxD)

    def __call__(
        self,
        tokens_BxL: Array,
        *,
        attention_mask: Optional[Array] = None,
        segment_ids: Optional[Array] = None,
        positions: Optional[Array] = None,
        token_types: Optional[Array] = None,
    ) -> Array:
        """Masked-LM logits [B, L, V]."""
        hidden = self.encode(
            tokens_BxL,
            attention_mask=attention_mask,
            segment_ids=segment_ids,
            positions=positions,
            token_types=token_types,
        )
        return self.mlm_logits(hidden)

    def classify(
        self,
        tokens_BxL: Array,
        *,
        attention_mask: Optional[Array] = None,
        token_types: Optional[Array] = None,
    ) -> Array:
        """Class logits [B, num_labels] from the pooled sequence (see ModelConfig.pooling)."""
        hidden = self.encode(tokens_BxL, attention_mask=attention_mask, token_types=token_types)
        if self.config.pooling == "mean":
            valid = (
                jnp.ones(tokens_BxL.shape)
                if attention_mask is None
                else attention_mask.astype(jnp.float32)
            )[..., None]
            pooled_BxD = (hidden * valid).sum(1) / jnp.maximum(valid.sum(1), 1.0)
        else:
            pooled_BxD = jnp.tanh(self.pooler(hidden[:, 0]))
        return self.classifier(self.dropout(pooled_BxD)).astype(jnp.float32)

    def label_logits(self, hidden_BxLxD: Array) -> Array:
        """Per-token classifier logits [B, L, num_labels] (float32) from hidden states."""
        logits_BxLxC = self.classifier(hidden_BxLxD).astype(jnp.float32)
        return constrain(logits_BxLxC, ("batch", "length", None))

    def token_logits(
        self,
        tokens_BxL: Array,
        *,
        attention_mask: Optional[Array] = None,
        token_types: Optional[Array] = None,
    ) -> Array:
        """Per-token label logits [B, L, num_labels] (BertForTokenClassification's)."""
        hidden = self.encode(tokens_BxL, attention_mask=attention_mask, token_types=token_types)
        return self.label_logits(self.dropout(hidden))

    def span_logits(
        self,
        tokens_BxL: Array,
        *,
        attention_mask: Optional[Array] = None,
        token_types: Optional[Array] = None,
    ) -> tuple[Array, Array]:
        """Answer start and end logits, each [B, L] (BertForQuestionAnswering's; num_labels 2)."""
        if self.config.num_labels != 2:
            raise ValueError(
                f"span logits need num_labels == 2 (start, end), got {self.config.num_labels}"
            )
        logits_BxLx2 = self.token_logits(
            tokens_BxL, attention_mask=attention_mask, token_types=token_types
        )
        return logits_BxLx2[..., 0], logits_BxLx2[..., 1]

    def _token_types(self, token_types_BxL: Array) -> Optional[Array]:
        # A model without a token-type table reads the context's place from positions alone.
        return token_types_BxL if self.config.type_vocab_size > 0 else None

    def loss_inputs(self, batch: Batch) -> LossInputs:
        """Classifier inputs of a ClassificationBatch, per-token label inputs of a
        TokenClassificationBatch, answer-span inputs of a SpanBatch, masked-LM inputs of a
        TokenBatch."""
        if isinstance(batch, ClassificationBatch):
            logits_BxC = self.classify(batch.inputs, attention_mask=batch.segment_ids > 0)
            return ClassificationLossInputs(logits_BxC, batch.labels, batch.example_weight)
        if isinstance(batch, TokenClassificationBatch):
            hidden_BxLxD = self.encode(batch.inputs, attention_mask=batch.segment_ids > 0)
            # Dropout here, not in the loss's logits_fn: that runs inside scan and remat.
            return TokenLossInputs(
                self.dropout(hidden_BxLxD),
                self.label_logits,
                batch.token_labels,
                batch.label_weights,
            )
        if isinstance(batch, SpanBatch):
            real_BxL = batch.segment_ids > 0
            start_BxL, end_BxL = self.span_logits(
                batch.inputs,
                attention_mask=real_BxL,
                token_types=self._token_types(batch.token_types),
            )
            return span_loss_inputs(
                start_BxL,
                end_BxL,
                real_BxL,
                batch.start_positions,
                batch.end_positions,
                batch.example_weight,
            )
        if not isinstance(batch, TokenBatch):
            raise TypeError(
                "an encoder trains on a TokenBatch (masked LM), a ClassificationBatch, a "
                f"TokenClassificationBatch or a SpanBatch, got {type(batch).__name__}"
            )
        hidden_BxLxD = self.hidden(
            batch.inputs,
            attention_mask=batch.segment_ids > 0,
            segment_ids=batch.segment_ids,
            positions=batch.positions,
        )
        return TokenLossInputs(hidden_BxLxD, self.logits, batch.targets, batch.loss_weights)
