"""Autoregressive generation for decoder-only and encoder-decoder models: greedy, sampling, beam.

The whole decode loop (prefill, then one cached step per token) is one compiled program: a
`jax.lax.while_loop` that also stops early once every row has emitted EOS. See `cache.py` for the
cache and the prompt layout, `beam.py` for the beam-search scoring convention.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.inference import beam as beam_lib
from jaxformer.inference import cache as cache_lib
from jaxformer.inference import sampling
from jaxformer.models.stack import split_cache, without_batch_axis

Array = jax.Array
METHODS = ("greedy", "sample", "beam")


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How to decode: everything but the model, the prompt and the rng (see `generate`)."""

    max_new_tokens: int
    method: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 4
    length_penalty: float = 1.0
    eos_id: Union[int, tuple[int, ...], None] = None
    """The id (or ids) that end a row."""
    pad_id: int = 0
    decoder_start_id: int = 0
    scores: bool = True
    """Whether greedy/sample decoding sums the tokens' log-probabilities (a log-softmax over the
    vocabulary per token: about 3% of a batch-16 GPT-2 step on CPUs)."""

    @property
    def greedy(self) -> bool:
        """Whether the next token is the argmax (sampling at temperature 0 is greedy)."""
        return self.method == "greedy" or (self.method == "sample" and self.temperature == 0)

    def compile_key(self) -> DecodeOptions:
        """These options as the compiled loop's static argument: plain Python numbers,
        temperature 0 sampling as 'greedy', and the temperature left out (it is passed traced)."""
        # Leaving the temperature out keeps one compilation for every temperature.
        return DecodeOptions(
            max_new_tokens=int(self.max_new_tokens),
            method="greedy" if self.greedy else self.method,
            top_k=int(self.top_k),
            top_p=float(self.top_p),
            num_beams=int(self.num_beams),
            length_penalty=float(self.length_penalty),
            eos_id=_eos_key(self.eos_id),
            pad_id=int(self.pad_id),
            decoder_start_id=int(self.decoder_start_id),
            scores=bool(self.scores),
        )


def _eos_key(eos_id: Union[int, Sequence[int], None]) -> Union[int, tuple[int, ...], None]:
    """eos_id as plain Python: None, an int, or a sorted tuple of several ids."""
    if eos_id is None:
        return None
    if isinstance(eos_id, (int, np.integer)) or np.ndim(eos_id) == 0:
        return int(eos_id)
    ids = tuple(sorted({int(i) for i in eos_id}))
    return ids[0] if len(ids) == 1 else ids


def generate(
    model: nnx.Module,
    prompt_tokens: Array,
    *,
    max_new_tokens: int,
    prompt_lengths: Optional[Array] = None,
    encoder_mask: Optional[Array] = None,
    method: str = "greedy",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    eos_id: Union[int, Sequence[int], None] = None,
    pad_id: int = 0,
    decoder_start_id: int = 0,
    rng: Union[Array, int, None] = None,
    return_scores: bool = False,
) -> Union[Array, tuple[Array, Array]]:
    """Generated token ids [B, max_new_tokens] (with return_scores, also scores [B]).

    prompt_tokens: [B, P] right-padded token ids: row b's prompt is prompt_tokens[b, :L_b] with
      L_b = prompt_lengths[b] (all P when None). For a decoder-only model this is the text to
      continue (L_b >= 1); for an encoder-decoder it is the encoder input, and decoding starts from
      `decoder_start_id` (T5: 0 = pad); its padding may instead be given as `encoder_mask`
      [B, P] (True = real token, any layout), as in the model's own call.
    method: 'greedy' (argmax), 'sample' (softmax of logits / temperature restricted to the top_k
      tokens (0: all) and to the top_p nucleus; temperature 0 means greedy; needs `rng`) or 'beam'
      (num_beams hypotheses, best one returned; see beam.py for the length_penalty convention).
    eos_id: a row that emits it (or any of several ids) is finished: every later position holds
      pad_id.
    Scores: the sum of the model's log-probabilities of the generated tokens up to and including
      EOS (greedy/sample), or the best hypothesis' length-normalised score (beam).
    """
    options = DecodeOptions(
        max_new_tokens=max_new_tokens,
        method=method,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_beams=num_beams,
        length_penalty=length_penalty,
        eos_id=eos_id,
        pad_id=pad_id,
        decoder_start_id=decoder_start_id,
        scores=return_scores,
    )
    seqs, scores = _run(model, prompt_tokens, prompt_lengths, encoder_mask, rng, options)
    if method == "beam":
        seqs, scores = seqs[:, 0], scores[:, 0]
    return (seqs, scores) if return_scores else seqs


def beam_search(
    model: nnx.Module,
    prompt_tokens: Array,
    *,
    max_new_tokens: int,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    prompt_lengths: Optional[Array] = None,
    encoder_mask: Optional[Array] = None,
    eos_id: Union[int, Sequence[int], None] = None,
    pad_id: int = 0,
    decoder_start_id: int = 0,
) -> tuple[Array, Array]:
    """All final hypotheses [B, num_beams, max_new_tokens], best first, and their scores."""
    options = DecodeOptions(
        max_new_tokens=max_new_tokens,
        method="beam",
        num_beams=num_beams,
        length_penalty=length_penalty,
        eos_id=eos_id,
        pad_id=pad_id,
        decoder_start_id=decoder_start_id,
    )
    return _run(model, prompt_tokens, prompt_lengths, encoder_mask, None, options)


def _run(model, prompt_tokens, prompt_lengths, encoder_mask, rng, options: DecodeOptions):
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
    lengths = _check(model, prompt_tokens, prompt_lengths, options)
    if encoder_mask is None:
        encoder_mask = jnp.arange(prompt_tokens.shape[1])[None, :] < lengths[:, None]
    elif model.config.family != "encoder_decoder" or prompt_lengths is not None:
        raise ValueError("encoder_mask is for encoder-decoder models, instead of prompt_lengths")
    elif jnp.shape(encoder_mask) != prompt_tokens.shape:
        raise ValueError(
            f"encoder_mask {jnp.shape(encoder_mask)} must have the prompt's shape "
            f"{prompt_tokens.shape}"
        )
    if options.method == "sample" and not options.greedy:
        if rng is None:
            raise ValueError("method='sample' needs rng= (a jax.random.key or an int seed)")
        rng = jax.random.key(rng) if isinstance(rng, (int, np.integer)) else rng
    else:
        rng = jax.random.key(0)  # unused
    temperature = options.temperature
    graphdef, state = nnx.split(model)
    return _compiled(
        graphdef,
        state,
        prompt_tokens,
        lengths,
        jnp.asarray(encoder_mask, bool),
        rng,
        jnp.float32(temperature if temperature else 1.0),
        options.compile_key(),
    )


def _check(model, prompt_tokens, prompt_lengths, options: DecodeOptions) -> Array:
    """Raises a ValueError naming the problem; returns the prompt lengths [B] as int32."""
    fam = cache_lib.family(model)
    o = options
    if o.method not in METHODS:
        raise ValueError(f"unknown generation method {o.method!r}; valid: {', '.join(METHODS)}")
    if prompt_tokens.ndim != 2:
        raise ValueError(f"prompt_tokens must be [batch, length]; got shape {prompt_tokens.shape}")
    b, p = prompt_tokens.shape
    max_len, n = model.config.max_len, o.max_new_tokens
    if n < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {n}")
    if fam == "decoder" and p + n > max_len:
        raise ValueError(
            f"prompt length {p} plus max_new_tokens {n} = {p + n} exceeds the model's "
            f"max_len {max_len}"
        )
    if fam == "encoder_decoder" and (p > max_len or n > max_len):
        raise ValueError(
            f"encoder prompt length {p} and max_new_tokens {n} must each be at most the model's "
            f"max_len {max_len}"
        )
    if o.temperature < 0 or not 0.0 < o.top_p <= 1.0 or o.top_k < 0 or o.num_beams < 1:
        raise ValueError(
            f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0 and num_beams >= 1; "
            f"got temperature={o.temperature}, top_p={o.top_p}, top_k={o.top_k}, "
            f"num_beams={o.num_beams}"
        )
    if prompt_lengths is None:
        return jnp.full((b,), p, jnp.int32)
    if not isinstance(prompt_lengths, jax.core.Tracer):
        lengths = np.asarray(prompt_lengths)
        low = 1 if fam == "decoder" else 0
        if lengths.shape != (b,) or lengths.min() < low or lengths.max() > p:
            raise ValueError(
                f"prompt_lengths must be {b} integers in [{low}, {p}] (the padded "
                f"prompt width); got {lengths.tolist()}"
            )
    return jnp.asarray(prompt_lengths, jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 7))
def _compiled(
    graphdef, state, prompt_BxP, lengths_B, mask_BxP, rng, temperature, options: DecodeOptions
):
    """The whole decode loop; `options` is a `DecodeOptions.compile_key()` (static)."""
    model = nnx.merge(graphdef, state)
    model.eval()
    prefix = cache_lib.prefill(
        model,
        prompt_BxP,
        lengths_B,
        mask_BxP,
        options.max_new_tokens,
        pad_id=options.pad_id,
        decoder_start_id=options.decoder_start_id,
    )
    if options.method == "beam":
        return beam_lib.beam_loop(
            model,
            prefix,
            max_new_tokens=options.max_new_tokens,
            num_beams=options.num_beams,
            length_penalty=options.length_penalty,
            eos_id=options.eos_id,
            pad_id=options.pad_id,
        )
    return _token_loop(model, prefix, rng, temperature, options)


def _token_loop(model, prefix: cache_lib.Prefix, rng, temperature, options: DecodeOptions):
    """Greedy or sampled decoding; returns tokens [B, n] and summed log-probabilities [B]."""
    n, eos_id, pad_id = options.max_new_tokens, options.eos_id, options.pad_id
    b = prefix.logits_BxV.shape[0]
    weights = cache_lib.decode_weights(model)  # outside the loop: its steps read them in place
    cache = prefix.cache
    if weights.layers is not None:
        cache = split_cache(cache)
        cache = without_batch_axis(cache) if b == 1 else cache
    carry = dict(
        i=jnp.int32(0),
        logits=prefix.logits_BxV,
        cache=cache,
        rng=rng,
        finished=jnp.zeros((b,), bool),
        scores=jnp.zeros((b,), jnp.float32),
        out=jnp.full((b, n), pad_id, jnp.int32),
    )

    def emit(c):
        rng, key = jax.random.split(c["rng"])
        tok_B = sampling.next_token(
            c["logits"],
            key,
            greedy=options.greedy,
            temperature=temperature,
            top_k=options.top_k,
            top_p=options.top_p,
        )
        scores = c["scores"]
        if options.scores:
            logp_B = jnp.take_along_axis(
                jax.nn.log_softmax(c["logits"], axis=-1), tok_B[:, None], axis=1
            )[:, 0]
            scores = scores + jnp.where(c["finished"], 0.0, logp_B)
        tok_B = jnp.where(c["finished"], pad_id, tok_B)
        finished = c["finished"] | sampling.is_eos(tok_B, eos_id)
        return dict(
            c,
            rng=rng,
            finished=finished,
            scores=scores,
            out=jax.lax.dynamic_update_index_in_dim(c["out"], tok_B, c["i"], axis=1),
        ), tok_B

    def body(c):
        c, tok_B = emit(c)
        logits, cache = cache_lib.step(
            model, tok_B, c["cache"], prefix.rows, prefix.first_slot, c["i"], weights
        )
        return dict(c, i=c["i"] + 1, logits=logits, cache=cache)

    def cond(c):
        return (c["i"] < n - 1) & ~jnp.all(c["finished"])

    final, _ = emit(jax.lax.while_loop(cond, body, carry))
    return final["out"], final["scores"]
