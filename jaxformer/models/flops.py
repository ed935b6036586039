"""Model FLOPs of one training step: the one count behind every MFU the project reports (the
Trainer's logged `mfu`, `--compile-only`, `python -m jaxformer.bench` and its planner).

The convention is PaLM's (Chowdhery et al. 2022, appendix B), also nanoGPT's `estimate_mfu`:

    FLOPs per token = 6 N + attention

- **6 N**: a parameter multiplies each token once forward (2 FLOPs: multiply and add) and twice
  backward (activation and weight gradients). N counts only the parameters that take part in a
  matmul with every token: a tied token embedding counts once (it is the LM head); an untied input
  embedding, position and token-type tables and T5's relative-bias tables are gathered, not
  multiplied, and do not count; nor do heads off the pretraining path (BERT's pooler and
  classifier). Norm scales and biases count (a rounding error).
- **attention**: per layer and token, Q·Kᵀ and A·V are 2·2·T·d FLOPs forward (d = heads ×
  head_dim of the queries, T the keys attended), 3× that with the backward pass: 12·T·d. Causal
  attention is counted once, i.e. half (T/2 keys on average: what a kernel that skips the
  masked half does); nanoGPT counts it whole, so its MFU for the same step is higher by up to
  6·L·T·d / (6 N + 12·L·T·d). A sliding window of w keys counts min(position + 1, w) keys per
  query. An encoder-decoder counts encoder tokens (S positions) against the encoder's parameters
  and full self-attention, decoder tokens (T targets) against the decoder's parameters with
  causal self-attention plus full cross-attention over S.

Tokens are what the step trains on (targets: batch × length, batch × target length for an
encoder-decoder), so `model_flops_per_token` × tokens/s is the achieved FLOP/s. Recomputation
(remat) is not counted: this is model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np
from flax import nnx

from jaxformer.models.config import ModelConfig

# Parameters that are looked up rather than multiplied with every token, by path piece.
_GATHERED = ("position_embed", "type_embed", "encoder_bias", "decoder_bias", "relative_bias")
# Heads that the pretraining loss does not run (BERT's sentence classifier).
_OFF_PATH = ("pooler", "classifier")


@dataclasses.dataclass(frozen=True)
class MatmulParams:
    """Parameter counts of an abstract model, split the way the FLOP count needs them."""

    total: int
    """Every trainable parameter (what `models.count_params` says)."""
    encoder: int
    """Multiplied with every encoder token (encoder-decoder) or every token (other families)."""
    decoder: int
    """Multiplied with every decoder token (encoder-decoder only, else 0)."""


def matmul_params(cfg: ModelConfig, model: Any) -> MatmulParams:
    """Splits the parameters of `model` (real or from `nnx.eval_shape`) as the docstring says."""
    total = encoder = decoder = 0
    for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = [str(p) for p in path]
        size = int(np.prod(getattr(leaf, "shape", None) or np.shape(leaf.get_value())))
        total += size
        if any(n in _GATHERED or n in _OFF_PATH for n in names):
            continue
        if names[:2] == ["embed", "token_embed"]:
            if not cfg.tie_embeddings:
                continue  # an untied input table is a gather; the separate head counts instead
            if cfg.family == "encoder_decoder":
                decoder += size  # the tied table is the decoder's LM head
                continue
        if cfg.family == "encoder_decoder" and names[0].startswith("decoder"):
            decoder += size
        else:
            encoder += size
    return MatmulParams(total, encoder, decoder)


def _mean_keys(length: int, causal: bool, window: Optional[int]) -> float:
    """Average keys one query attends to."""
    if not causal:
        return float(length if window is None else min(length, window))
    if window is None or window >= length:
        return length / 2.0  # the convention: causal attention counted once, i.e. half
    w = window  # min(i + 1, w) summed over positions i
    return (w * (w + 1) / 2 + (length - w) * w) / length


def _attention_flops(cfg: ModelConfig, depth: int, tokens: int, keys: float) -> float:
    return 12.0 * depth * tokens * keys * cfg.num_heads * cfg.dims_per_head


def _self_attention(cfg: ModelConfig, depth: int, length: int, causal: bool) -> float:
    """12·T·d per token summed over layers (per-layer windows where set)."""
    windows = cfg.layer_windows(depth) or (cfg.sliding_window,) * depth
    return sum(_attention_flops(cfg, 1, length, _mean_keys(length, causal, w)) for w in windows)


def step_flops(
    cfg: ModelConfig, params: MatmulParams, batch: int, length: int, target_len: int = 0
) -> float:
    """Model FLOPs of one training step on `batch` rows of `length` tokens (an encoder-decoder's
    encoder length; its decoder length is `target_len`)."""
    if cfg.family == "encoder_decoder":
        enc = 6.0 * params.encoder * length + _self_attention(cfg, cfg.num_layers, length, False)
        dec = 6.0 * params.decoder * target_len
        dec += _self_attention(cfg, cfg.decoder_layers, target_len, True)
        dec += _attention_flops(cfg, cfg.decoder_layers, target_len, float(length))
        return batch * (enc + dec)
    causal = cfg.family == "decoder"
    per_row = 6.0 * params.encoder * length + _self_attention(cfg, cfg.num_layers, length, causal)
    return batch * per_row


def abstract_model(cfg: ModelConfig) -> Any:
    """The model as shapes only: nothing the size of the model is allocated."""
    from jaxformer import models

    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: models.create(cfg, rngs=nnx.Rngs(0)))


def flops_per_token(cfg: ModelConfig, length: int, target_len: int = 0) -> float:
    """Model FLOPs per trained token (see the module docstring), from shapes only."""
    params = matmul_params(cfg, abstract_model(cfg))
    tokens = target_len if cfg.family == "encoder_decoder" else length
    return step_flops(cfg, params, 1, length, target_len) / tokens


def model_flops_per_step(cfg: ModelConfig, batch: int, length: int, target_len: int = 0) -> float:
    """Model FLOPs of one training step on `batch` rows (see `step_flops`), from shapes only."""
    params = matmul_params(cfg, abstract_model(cfg))
    return step_flops(cfg, params, batch, length, target_len)
