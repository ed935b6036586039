"""Cross-entropy sums over a vocabulary without ever holding [B, L, V] logits at once.

`cross_entropy_sums` tiles the sequence axis into chunks, projects one chunk of hidden states to
logits at a time inside `jax.lax.scan`, and rematerialises each chunk in the backward pass, so
memory for logits is [B, chunk, V] instead of [B, L, V]. The batch axis is never reshaped, so
its sharding survives. Pure JAX: no Flax, no config, so any JAX code can call it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
LogitsFn = Callable[[Array], Array]

# 256 positions x batch 4 x 128k vocabulary is 0.5 GB of float32 logits per chunk; the backward
# pass holds one (TPU v5e) to three (CPU) such buffers. Large vocabularies or batches want less.
DEFAULT_CHUNK_SIZE = 256


def first_argmax(values: Array) -> Array:
    """jnp.argmax over the last axis (the first index of the maximum), as two plain reductions.

    XLA's CPU backend runs argmax's paired (value, index) reduction element by element; a max
    and then a min over the indices that attain it vectorise: 16-23 vs 72 ms for [32, 128, 2048]
    float32 on 2 cores (the [.., V] int32 selection between them may be materialised).
    """
    max_value = jnp.max(values, axis=-1, keepdims=True)
    ids = jnp.arange(values.shape[-1], dtype=jnp.int32)
    size = jnp.int32(values.shape[-1])
    # Never `size`, even where no entry equals the maximum (NaNs; the loss is NaN there anyway).
    first = jnp.min(jnp.where(values == max_value, ids, size), axis=-1)
    return jnp.where(first == size, 0, first)


def _chunk_stats(
    logits_BxCxV: Array, targets_BxC: Array, weights_BxC: Array, z_loss: float
) -> tuple[dict[str, Array], Array]:
    """Weighted float32 sums for one block of logits, and its argmax predictions [B, C]."""
    logits_BxCxV = logits_BxCxV.astype(jnp.float32)
    weights_BxC = weights_BxC.astype(jnp.float32)
    # Same formula as optax.softmax_cross_entropy_with_integer_labels (normaliser minus the label's
    # logit), but the label's logit is picked by a compare-and-reduce rather than a gather: it
    # fuses without a [B, C, V] one-hot, and its gradient is a select, not a scatter. With the
    # vocabulary axis sharded it needs only all-reduces of [B, C] values (tested).
    log_normalizer_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    targets_BxC = targets_BxC.astype(jnp.int32)
    vocab_ids_V = jnp.arange(logits_BxCxV.shape[-1], dtype=jnp.int32)
    is_target_BxCxV = vocab_ids_V == targets_BxC[..., None]
    target_logit_BxC = jnp.sum(jnp.where(is_target_BxCxV, logits_BxCxV, 0.0), axis=-1)
    nll_BxC = log_normalizer_BxC - target_logit_BxC
    # Correct where the target's logit is the largest: one max-reduction, which vectorises, where
    # comparing with argmax (wanted only for returned predictions) runs XLA's CPU backend's slow
    # paired reduction (the costliest op of the default run's step). A tie for the largest, which
    # argmax breaks by the lower id, counts as correct. No gradient flows through the count.
    max_logit_BxC = jax.lax.stop_gradient(jnp.max(logits_BxCxV, axis=-1))
    correct_BxC = (jax.lax.stop_gradient(target_logit_BxC) >= max_logit_BxC).astype(jnp.float32)
    predictions_BxC = jnp.argmax(logits_BxCxV, axis=-1).astype(jnp.int32)
    sums = dict(
        loss_sum=jnp.sum(nll_BxC * weights_BxC),
        weight_sum=jnp.sum(weights_BxC),
        correct_sum=jnp.sum(correct_BxC * weights_BxC),
    )
    if z_loss > 0.0:
        sums["z_loss_sum"] = z_loss * jnp.sum(jnp.square(log_normalizer_BxC) * weights_BxC)
    return sums, predictions_BxC


def full_cross_entropy_sums(
    hidden_BxLxD: Array,
    logits_fn: LogitsFn,
    targets_BxL: Array,
    weights_BxL: Array,
    *,
    z_loss: float = 0.0,
    return_predictions: bool = False,
) -> dict[str, Array] | tuple[dict[str, Array], Array]:
    """Reference: the same sums from the whole [B, L, V] logits at once."""
    sums, predictions_BxL = _chunk_stats(logits_fn(hidden_BxLxD), targets_BxL, weights_BxL, z_loss)
    return (sums, predictions_BxL) if return_predictions else sums


def cross_entropy_sums(
    hidden_BxLxD: Array,
    logits_fn: LogitsFn,
    targets_BxL: Array,
    weights_BxL: Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    z_loss: float = 0.0,
    return_predictions: bool = False,
) -> dict[str, Array] | tuple[dict[str, Array], Array]:
    """Float32 sums loss_sum, weight_sum, correct_sum (+ z_loss_sum if z_loss > 0), chunked over L.

    `logits_fn(hidden_BxCxD) -> logits_BxCxV` may close over parameters (an NNX module's head
    called inside `nnx.grad` works) and their gradients flow through the scan, but it must not
    mutate state (no dropout RNG): it runs inside scan and remat. loss_sum is the NLL alone;
    train on loss_sum + z_loss_sum. With return_predictions, also the argmax [B, L] (int32).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    batch, length, dim = hidden_BxLxD.shape
    if chunk_size >= length:
        return full_cross_entropy_sums(
            hidden_BxLxD,
            logits_fn,
            targets_BxL,
            weights_BxL,
            z_loss=z_loss,
            return_predictions=return_predictions,
        )
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length
    if pad:
        # Padded positions get weight 0, so they add nothing to any sum (or gradient).
        hidden_BxLxD = jnp.pad(hidden_BxLxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxL = jnp.pad(targets_BxL, ((0, 0), (0, pad)))
        weights_BxL = jnp.pad(weights_BxL, ((0, 0), (0, pad)))

    # Chunk axis to the front for scan; batch stays a whole axis so its sharding is untouched.
    hidden_NxBxCxD = jnp.swapaxes(hidden_BxLxD.reshape(batch, num_chunks, chunk_size, dim), 0, 1)
    targets_NxBxC = jnp.swapaxes(targets_BxL.reshape(batch, num_chunks, chunk_size), 0, 1)
    weights_NxBxC = jnp.swapaxes(weights_BxL.reshape(batch, num_chunks, chunk_size), 0, 1)

    # Remat: the backward pass recomputes one chunk's logits instead of keeping all of them.
    # prevent_cse=False is safe (and cheaper) inside scan, which already blocks that CSE.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk(hidden_BxCxD, targets_BxC, weights_BxC):
        return _chunk_stats(logits_fn(hidden_BxCxD), targets_BxC, weights_BxC, z_loss)

    def step(totals, xs):
        sums, predictions_BxC = chunk(*xs)
        totals = jax.tree.map(jnp.add, totals, sums)
        return totals, predictions_BxC if return_predictions else None

    names = ["loss_sum", "weight_sum", "correct_sum"] + (["z_loss_sum"] if z_loss > 0.0 else [])
    zeros = {name: jnp.zeros((), jnp.float32) for name in names}
    totals, predictions_NxBxC = jax.lax.scan(
        step, zeros, (hidden_NxBxCxD, targets_NxBxC, weights_NxBxC)
    )
    if not return_predictions:
        return totals
    predictions_BxL = jnp.swapaxes(predictions_NxBxC, 0, 1).reshape(batch, -1)[:, :length]
    return totals, predictions_BxL
