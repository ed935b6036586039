"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp

from jaxformer.losses import first_argmax

Array = jax.Array


def filter_logits(logits_BxV: Array, *, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Sets to -inf every logit outside the top_k largest (0: no limit) and outside the smallest
    set of most likely tokens whose probability reaches top_p (1.0: no limit)."""
    if top_k and top_k < logits_BxV.shape[-1]:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_BxV, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # the most likely token is always kept
        threshold_Bx1 = jnp.min(jnp.where(keep, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)
    return logits_BxV


def next_token(
    logits_BxV: Array, rng: Array, *, greedy: bool, temperature: Array, top_k: int, top_p: float
) -> Array:
    """Token ids [B]: the argmax when greedy, else a sample of softmax(filtered logits / T)."""
    if greedy:
        return first_argmax(logits_BxV)  # jnp.argmax's result, vectorised on CPUs
    scaled = filter_logits(logits_BxV / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)


def is_eos(tokens: Array, eos_id: Union[int, tuple[int, ...], None]) -> Array:
    """Boolean mask of `tokens` that end a row: equal to `eos_id`, or to any id of a tuple of
    them (Llama 3 stops at several); all False without one."""
    if eos_id is None:
        return jnp.zeros(tokens.shape, bool)
    if isinstance(eos_id, tuple):
        return jnp.isin(tokens, jnp.asarray(eos_id, tokens.dtype))
    return tokens == eos_id
