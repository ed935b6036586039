"""Beam search over the cached decode step, compiled as one `jax.lax.while_loop`.

Scoring convention: a hypothesis of n generated tokens (counting its EOS, not the padding after it)
scores sum(log p(token)) / n ** length_penalty. All live hypotheses of a step have the same n, so
length_penalty only matters between hypotheses that ended at different steps; 0 ranks by the plain
sum of log-probabilities. The num_beams hypotheses kept each step are the best by that score among
all one-token extensions; a finished hypothesis survives only as itself (its one allowed
continuation is pad at log-probability 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.inference import cache as cache_lib
from jaxformer.inference import sampling

Array = jax.Array


def beam_loop(
    model: nnx.Module,
    prefix: cache_lib.Prefix,
    *,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float,
    eos_id,
    pad_id: int,
) -> tuple[Array, Array]:
    """Hypotheses [B, num_beams, N] best first, and their scores [B, num_beams]."""
    b, vocab = prefix.logits_BxV.shape
    nb, n = num_beams, max_new_tokens
    cache = cache_lib.repeat_cache(prefix.cache, nb)
    rows = cache_lib.repeat_rows(prefix.rows, nb)
    # Only beam 0 is live at first, so the first step does not pick the same token num_beams times.
    sums_BxK = jnp.where(jnp.arange(nb) == 0, 0.0, -jnp.inf)[None, :].repeat(b, 0)
    carry = dict(
        i=jnp.int32(0),
        logits=cache_lib.repeat_rows(prefix.logits_BxV, nb),
        cache=cache,
        sums=sums_BxK,
        lengths=jnp.zeros((b, nb), jnp.int32),
        finished=jnp.zeros((b, nb), bool),
        seqs=jnp.full((b, nb, n), pad_id, jnp.int32),
    )
    pad_only_V = jnp.where(jnp.arange(vocab) == pad_id, 0.0, -jnp.inf)

    def select(c):
        """Keeps the best num_beams one-token extensions; returns them and each one's parent."""
        logp = jax.nn.log_softmax(c["logits"], axis=-1).reshape(b, nb, vocab)
        if eos_id is not None:
            logp = jnp.where(c["finished"][..., None], pad_only_V, logp)
        sums = c["sums"][..., None] + logp  # [B, nb, V]
        lengths = jnp.where(c["finished"], c["lengths"], c["i"] + 1)  # [B, nb]
        ranked = sums / (lengths.astype(jnp.float32) ** length_penalty)[..., None]
        _, flat_BxK = jax.lax.top_k(ranked.reshape(b, nb * vocab), nb)
        parent_BxK, tok_BxK = flat_BxK // vocab, (flat_BxK % vocab).astype(jnp.int32)
        from_parent = lambda x: jnp.take_along_axis(x, parent_BxK, axis=1)
        finished = from_parent(c["finished"])
        if eos_id is not None:
            finished = finished | sampling.is_eos(tok_BxK, eos_id)
        seqs = jnp.take_along_axis(c["seqs"], parent_BxK[..., None], axis=1)
        new = dict(
            c,
            sums=jnp.take_along_axis(sums.reshape(b, nb * vocab), flat_BxK, axis=1),
            lengths=from_parent(lengths),
            finished=finished,
            seqs=jax.lax.dynamic_update_index_in_dim(seqs, tok_BxK, c["i"], axis=2),
        )
        return new, parent_BxK, tok_BxK

    weights = cache_lib.decode_weights(model)  # outside the loop: its steps read them in place

    def body(c):
        c, parent_BxK, tok_BxK = select(c)
        rows_R = (jnp.arange(b)[:, None] * nb + parent_BxK).reshape(-1)
        logits, new_cache = cache_lib.step(
            model,
            tok_BxK.reshape(-1),
            cache_lib.reorder(c["cache"], rows_R),
            rows,
            prefix.first_slot,
            c["i"],
            weights,
        )
        return dict(c, i=c["i"] + 1, logits=logits, cache=new_cache)

    def cond(c):
        return (c["i"] < n - 1) & ~jnp.all(c["finished"])

    final, _, _ = select(jax.lax.while_loop(cond, body, carry))
    scores = final["sums"] / final["lengths"].astype(jnp.float32) ** length_penalty
    return final["seqs"], scores
