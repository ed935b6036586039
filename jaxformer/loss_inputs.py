"""What a model hands the loss: `model.loss_inputs(batch)` returns one of these.

Auxiliary losses (`aux_losses`, name -> float32 scalar) are per-token-scale values: the train
step adds `aux * max(weight_sum, 1)` to the summed loss before its division by the target-weight
total, so each contributes exactly its own value to the reported loss and to the gradient. With
gradient accumulation each micro-batch's aux is weighted by its own target weight, i.e. the step
sees the weight-averaged aux. The step logs each as metrics[f"aux_{name}"]; eval sums report it
as `aux_{name}_sum`, weighted like `loss_sum`. Models without aux losses return an empty dict and
their step compiles to the same program as before the seam existed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Optional, Union

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TokenLossInputs:
    """Per-token cross-entropy inputs; the loss calls `logits_fn` chunk by chunk."""

    hidden_BxLxD: Array  # final hidden states the LM head reads
    logits_fn: Callable[[Array], Array]  # [B, C, D] -> float32 [B, C, V] (e.g. model.logits)
    targets_BxL: Array  # int32 token to predict
    weights_BxL: Array  # float32 loss weight per position
    aux_losses: dict[str, Array] = dataclasses.field(default_factory=dict)  # name -> scalar
    # What the eval step returns as predictions instead of the per-position argmax (extractive
    # QA: the [B, 2, L] start/end logits, decoded into the best valid span on the host).
    predictions: Optional[Array] = None


@dataclasses.dataclass(frozen=True)
class ClassificationLossInputs:
    """Per-row cross-entropy inputs; [B, C] logits are small enough to exist whole."""

    logits_BxC: Array  # float32 class logits
    labels_B: Array  # int32 class index
    weights_B: Array  # float32 loss weight per row
    aux_losses: dict[str, Array] = dataclasses.field(default_factory=dict)  # name -> scalar


LossInputs = Union[TokenLossInputs, ClassificationLossInputs]

# Masked-out answer positions: finite, so a row whose window holds no context still has a finite
# loss, yet far below any real logit.
_NOT_A_POSITION = -1e9


def span_loss_inputs(
    start_logits_BxL: Array,
    end_logits_BxL: Array,
    valid_BxL: Array,
    starts_B: Array,
    ends_B: Array,
    weights_B: Array,
) -> TokenLossInputs:
    """Extractive-QA loss as per-token inputs: two "tokens" per row (start, end) whose
    "vocabulary" is the L positions, so the step's cross-entropy averages the start and end losses
    (as BertForQuestionAnswering does). Its predictions are the masked [B, 2, L] start/end logits
    themselves: the answer is the best valid span (start <= end, in the context, not too long),
    which independent argmaxes need not give (jaxformer.training.task_metrics.best_spans)."""
    logits_Bx2xL = jnp.stack([start_logits_BxL, end_logits_BxL], axis=1).astype(jnp.float32)
    logits_Bx2xL = jnp.where(valid_BxL[:, None, :], logits_Bx2xL, _NOT_A_POSITION)
    targets_Bx2 = jnp.stack([starts_B, ends_B], axis=1).astype(jnp.int32)
    weights_Bx2 = jnp.broadcast_to(weights_B.astype(jnp.float32)[:, None], targets_Bx2.shape)
    return TokenLossInputs(
        logits_Bx2xL, lambda logits: logits, targets_Bx2, weights_Bx2, predictions=logits_Bx2xL
    )
