"""One decoding interface over both generating families: prefill the cache, then step one token.

The cache is a functional pytree (a dict of arrays stacked over decoder layers: self-attention `k`,
`v` [layers, B, K, M, H] and, for encoder-decoders, the cross-attention `cross_k`, `cross_v`
projected once from the encoder output), so a `jax.lax.while_loop` can carry it.

Prompt layout. Prompts arrive right-padded, [B, P] with per-row `lengths`; decoder-only prompts are
shifted to the right (left-padded) before prefill so that every row's next token goes to the same
cache slot P + i. Each row keeps its own positions (row b's generated token i sits at position
lengths[b] + i, so learned positions and RoPE are those of the unpadded prompt) and `kv_valid`
hides its padding slots. Within a row, slot - position is constant, so the causal and sliding-
window masks computed on slots are the ones on positions. For an encoder-decoder the prompt is the
encoder input (padding, anywhere, hidden by the encoder mask) and decoding starts from
`decoder_start_id`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.models.stack import split_layers

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeRows:
    """Per-row arrays that every step needs (batch-leading, so they can be repeated for beams).

    A pytree: the fields that are None (those of the other family) have no leaves.
    """

    lengths_B: Optional[Array] = None
    """Decoder-only: the prompt lengths; generated token i of row b sits at lengths[b] + i."""
    kv_valid_BxM: Optional[Array] = None
    """Decoder-only: the cache slots that hold real tokens (False for the left padding)."""
    encoder_mask_BxS: Optional[Array] = None
    """Encoder-decoder: the encoder input's real tokens, for cross-attention."""


class Prefix(NamedTuple):
    """What the prompt leaves for the decode loop."""

    logits_BxV: Array
    """Float32 logits of the first new token."""
    cache: dict
    rows: DecodeRows
    first_slot: int
    """Cache slot of the first generated token; generated token i is fed at first_slot + i."""


def family(model: nnx.Module) -> str:
    """The family of a model that generates ('decoder' or 'encoder_decoder'); an error for one
    that cannot (its class says so: `generates`)."""
    fam = getattr(getattr(model, "config", None), "family", None)
    if not getattr(type(model), "generates", False) or not hasattr(model, "decode_step"):
        raise ValueError(
            f"generation needs a decoder-only or encoder-decoder model; got "
            f"{type(model).__name__} (family {fam!r}), which has no autoregressive decoder"
        )
    return fam


def left_align(tokens_BxP: Array, lengths_B: Array, pad_id: int) -> Array:
    """Moves each right-padded row's first lengths[b] tokens to the end of the row."""
    p = tokens_BxP.shape[1]
    src_BxP = jnp.arange(p)[None, :] - (p - lengths_B)[:, None]
    moved = jnp.take_along_axis(tokens_BxP, jnp.clip(src_BxP, 0, p - 1), axis=1)
    return jnp.where(src_BxP >= 0, moved, pad_id)


def prefill(
    model: nnx.Module,
    prompt_BxP: Array,
    lengths_B: Array,
    encoder_mask_BxP: Array,
    max_new_tokens: int,
    *,
    pad_id: int,
    decoder_start_id: int,
) -> Prefix:
    """Runs the prompt (decoder: right-padded rows of `lengths_B` tokens) or the encoder on it
    (encoder-decoder: real tokens where `encoder_mask_BxP`) plus the start token."""
    b, p = prompt_BxP.shape
    if family(model) == "decoder":
        length = p + max_new_tokens - 1  # the last generated token is never fed back
        shift_B = p - lengths_B
        kv_valid_BxM = jnp.arange(length)[None, :] >= shift_B[:, None]
        positions_BxP = jnp.maximum(jnp.arange(p)[None, :] - shift_B[:, None], 0)
        logits, cache = model.decode_step(
            left_align(prompt_BxP, lengths_B, pad_id),
            model.init_cache(b, length),
            index=0,
            positions=positions_BxP,
            kv_valid=kv_valid_BxM,
            last_only=True,
        )
        return Prefix(
            logits[:, -1].astype(jnp.float32),
            cache,
            DecodeRows(lengths_B=lengths_B, kv_valid_BxM=kv_valid_BxM),
            p,
        )
    encoded = model.encode(prompt_BxP, encoder_mask=encoder_mask_BxP)
    cache = model.init_cache(encoded, max_new_tokens)
    start_Bx1 = jnp.full((b, 1), decoder_start_id, prompt_BxP.dtype)
    logits, cache = model.decode_step(start_Bx1, cache, index=0, encoder_mask=encoder_mask_BxP)
    rows = DecodeRows(encoder_mask_BxS=encoder_mask_BxP)
    return Prefix(logits[:, -1].astype(jnp.float32), cache, rows, 1)


class DecodeWeights(NamedTuple):
    """Weights laid out once before a token loop, for `step` to read in place on every token."""

    layers: Optional[list]
    """The decoder stack's layers split (`stack.split_layers`; None: the stack's own scan)."""
    head_DxV: Optional[Array]
    """The tied LM head's table transposed (`LmHead.decode_table`; None: the head as it is)."""


def decode_weights(model: nnx.Module) -> DecodeWeights:
    """The model's `DecodeWeights`: call it outside the token loop, pass it to every `step`."""
    blocks = model.blocks if family(model) == "decoder" else model.decoder_blocks
    return DecodeWeights(split_layers(blocks), model.head.decode_table(model.embed))


def step(
    model: nnx.Module,
    tokens_B: Array,
    cache: dict,
    rows: DecodeRows,
    first_slot: int,
    i: Array,
    weights: DecodeWeights = DecodeWeights(None, None),
) -> tuple[Array, dict]:
    """Feeds generated token i of every row; returns the next logits [B, V] and the cache.

    `weights`: `decode_weights(model)`, made before the token loop."""
    index = first_slot + i
    layers, head_DxV = weights
    if rows.kv_valid_BxM is not None:  # decoder-only
        logits, cache = model.decode_step(
            tokens_B[:, None],
            cache,
            index=index,
            positions=(rows.lengths_B + i)[:, None],
            kv_valid=rows.kv_valid_BxM,
            layers=layers,
            head_DxV=head_DxV,
        )
    else:
        logits, cache = model.decode_step(
            tokens_B[:, None],
            cache,
            index=index,
            encoder_mask=rows.encoder_mask_BxS,
            layers=layers,
            head_DxV=head_DxV,
        )
    return logits[:, -1].astype(jnp.float32), cache


def repeat_rows(tree, n: int):
    """Repeats every batch-leading array n times (row b becomes rows b*n .. b*n+n-1)."""
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), tree)


def repeat_cache(cache: dict, n: int) -> dict:
    """Repeats every cache row n times (the batch is axis 1, after the layers)."""
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=1), cache)


def reorder(cache: dict, rows_R: Array) -> dict:
    """Gathers the self-attention cache rows (beam search); cross-attention K/V stay as they are,
    being the same for every beam of a prompt."""
    return {name: (x[:, rows_R] if name in ("k", "v") else x) for name, x in cache.items()}
