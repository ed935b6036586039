"""Typed batches: one frozen pytree per batch shape, and the one function that reads the dicts.

The data producers (`jaxformer.data.objectives`, `jaxformer.data.tasks`) emit dicts of arrays;
`from_rows` is the only place that knows those key sets. Models take the typed values
(`model.loss_inputs(batch)`), so no model or loss code looks a key up by name.

Extra keys that no loss reads (`example_weight` of LM-style task rows, `prompt_lengths`,
`encoder_positions` / `decoder_positions`) are kept as Optional fields rather than dropped: a
typed batch then holds everything its producer wrote (host-side metrics read some of them), and
an unused field costs nothing in the compiled step (an unread input is not computed on).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Union

import jax
from flax import struct

Array = jax.Array


@struct.dataclass
class TokenBatch:
    """One token sequence per row with a per-token target: causal LM, masked LM, completion (SFT)."""

    inputs: Array  # [B, L] int32 input token ids (masked-LM: with [MASK]/random replacements)
    targets: Array  # [B, L] int32 token to predict at each position
    loss_weights: Array  # [B, L] float32 weight of each position's loss (0 = padding / not scored)
    segment_ids: Array  # [B, L] int32 packed document index, 0 = padding
    positions: Array  # [B, L] int32 position within its document
    # [B] float32 row weight of task rows (already folded into loss_weights; host metrics read it)
    example_weight: Optional[Array] = None
    prompt_lengths: Optional[Array] = None  # [B] int32 kept prompt tokens of completion rows


@struct.dataclass
class Seq2SeqBatch:
    """Encoder tokens and decoder tokens with per-token targets: span corruption, text2text."""

    encoder_inputs: Array  # [B, S] int32 encoder token ids
    encoder_segment_ids: Array  # [B, S] int32, 0 = padding
    decoder_inputs: Array  # [B, T] int32 decoder input ids (targets shifted right)
    decoder_segment_ids: Array  # [B, T] int32, 0 = padding
    targets: Array  # [B, T] int32 token to predict at each decoder position
    loss_weights: Array  # [B, T] float32 weight of each decoder position's loss
    encoder_positions: Optional[Array] = None  # [B, S] int32 (relative-position models ignore it)
    decoder_positions: Optional[Array] = None  # [B, T] int32 (relative-position models ignore it)
    example_weight: Optional[Array] = None  # [B] float32 row weight (folded into loss_weights)


@struct.dataclass
class ClassificationBatch:
    """One token sequence and one class label per row."""

    inputs: Array  # [B, L] int32 token ids
    segment_ids: Array  # [B, L] int32, 0 = padding
    labels: Array  # [B] int32 class index in [0, num_labels)
    example_weight: Array  # [B] float32 weight of each row's loss (0 = eval padding row)
    positions: Optional[Array] = None  # [B, L] int32 (the classifier uses its own positions)


@struct.dataclass
class TokenClassificationBatch:
    """One token sequence per row with a class label per token (NER, POS tagging)."""

    inputs: Array  # [B, L] int32 token ids
    segment_ids: Array  # [B, L] int32, 0 = padding
    token_labels: Array  # [B, L] int32 label index of each token (0 where not scored)
    label_weights: Array  # [B, L] float32 1 on a word's first token, 0 elsewhere (x row weight)
    example_weight: Array  # [B] float32 row weight (already folded into label_weights)
    positions: Optional[Array] = None  # [B, L] int32 (the encoder uses its own positions)


@struct.dataclass
class SpanBatch:
    """A question and a context per row, with the answer's first and last context token."""

    inputs: Array  # [B, L] int32 token ids: bos, question, eos (separator), context
    segment_ids: Array  # [B, L] int32, 0 = padding
    token_types: Array  # [B, L] int32 0 on the question, 1 on the context
    start_positions: Array  # [B] int32 index of the answer's first token (0 = not in the window)
    end_positions: Array  # [B] int32 index of the answer's last token (0 = not in the window)
    example_weight: Array  # [B] float32 weight of each row's loss (0 = eval padding row)
    positions: Optional[Array] = None  # [B, L] int32 (the encoder uses its own positions)


# One name per objective, for readers of a producer's signature; the shape is what matters.
CausalLMBatch = TokenBatch
MaskedLMBatch = TokenBatch
CompletionBatch = TokenBatch
SpanCorruptionBatch = Seq2SeqBatch
Text2TextBatch = Seq2SeqBatch

Batch = Union[TokenBatch, Seq2SeqBatch, ClassificationBatch, TokenClassificationBatch, SpanBatch]
BATCH_TYPES = (TokenBatch, Seq2SeqBatch, ClassificationBatch, TokenClassificationBatch, SpanBatch)


def _keys(cls: type) -> tuple[frozenset[str], frozenset[str]]:
    """(required, optional) field names of a batch type: optional ones default to None."""
    fields = cls.__dataclass_fields__.values()
    required = frozenset(f.name for f in fields if f.default is not None)
    optional = frozenset(f.name for f in fields if f.default is None)
    return required, optional


def from_rows(rows: Union[Mapping[str, Array], Batch]) -> Batch:
    """The typed batch of a producer's dict, chosen by its exact key set; typed batches pass."""
    if isinstance(rows, BATCH_TYPES):
        return rows
    keys = set(rows)
    best = None
    for cls in BATCH_TYPES:
        required, optional = _keys(cls)
        missing, unknown = required - keys, keys - required - optional
        if not missing and not unknown:
            return cls(**rows)
        # The nearest shape names what is wrong (a classification dict without labels is still
        # reported as a classification batch missing "labels").
        cost = len(missing) + len(unknown)
        if best is None or cost < best[0]:
            best = (cost, cls, missing, unknown)
    _, cls, missing, unknown = best
    raise ValueError(
        f"batch keys {sorted(keys)} match no batch type; nearest is {cls.__name__}, "
        f"missing {sorted(missing)}, unknown {sorted(unknown)}"
    )
