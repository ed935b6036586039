"""Generation: the KV cache against full recomputation, beam search against brute force, sampling
controls, EOS, int8 quantization error, and clear errors."""

import functools
import itertools

import jax
import jax.numpy as jnp
import model_helpers
import numpy as np
import pytest
from flax import nnx
from model_helpers import tokens

from jaxformer.inference import (
    METHODS,
    DecodeOptions,
    beam_search,
    generate,
    param_bytes,
    quantize_model,
    sampling,
)

# A larger init than the presets' 0.02 makes random models' greedy outputs vary from step to step
# (with 0.02 they repeat one token), so token-for-token comparisons mean something.
SHARP = 0.3
PROMPT_LENGTHS = np.array([7, 3, 5])


@nnx.jit
def forward(model, *args):
    return model(*args)


# Building is slower than generating, and no test mutates a model.
build = functools.lru_cache(maxsize=None)(model_helpers.build)


def right_padded(seed, lengths, vocab=512):
    x = np.array(tokens(seed, (len(lengths), max(lengths)), vocab))
    x[np.arange(x.shape[1])[None, :] >= np.asarray(lengths)[:, None]] = 0
    return jnp.asarray(x)


def greedy_by_recompute(logits_of, context, n):
    """Greedy decoding that reruns the whole forward pass for every token (no cache). The sequence
    sits at the start of a fixed-width buffer (one compilation); causality makes the rest inert."""
    generated, logp_sum = [], 0.0
    for _ in range(n):
        seq = list(context) + generated
        buffer = jnp.array([seq + [0] * (len(context) + n - len(seq))])
        logits = logits_of(buffer)[0, len(seq) - 1]
        tok = int(jnp.argmax(logits))
        logp_sum += float(jax.nn.log_softmax(logits)[tok])
        generated.append(tok)
    return generated, logp_sum


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_decoder_greedy_with_cache_equals_recompute(name, monkeypatch):
    model = build(name, init_std=SHARP)
    prompt = right_padded(0, PROMPT_LENGTHS)
    out, scores = generate(
        model, prompt, prompt_lengths=PROMPT_LENGTHS, max_new_tokens=6, return_scores=True
    )
    assert out.shape == (3, 6)
    # Without return_scores the loop skips the log-softmax; the tokens are the same.
    np.testing.assert_array_equal(
        generate(model, prompt, prompt_lengths=PROMPT_LENGTHS, max_new_tokens=6), out
    )
    # Stacks deeper than SPLIT_DECODE_MAX_LAYERS keep the stacked weights and cache in the token
    # loop (5 new tokens: a new compilation, traced with the lowered bound).
    from jaxformer.models import stack

    monkeypatch.setattr(stack, "SPLIT_DECODE_MAX_LAYERS", 0)
    assert stack.split_layers(model.blocks) is None
    np.testing.assert_array_equal(
        generate(model, prompt, prompt_lengths=PROMPT_LENGTHS, max_new_tokens=5), out[:, :5]
    )
    for row, length in enumerate(PROMPT_LENGTHS):
        context = np.asarray(prompt[row, :length]).tolist()
        ref, logp = greedy_by_recompute(lambda x: forward(model, x), context, 6)
        assert out[row].tolist() == ref, f"row {row} (prompt length {length})"
        np.testing.assert_allclose(scores[row], logp, rtol=1e-4, atol=1e-4)
    assert len(set(np.asarray(out).ravel().tolist())) > 3  # not a degenerate repetition
    # One row alone: its loop carries the caches without the batch axis (without_batch_axis).
    one = generate(model, prompt[:1, : PROMPT_LENGTHS[0]], max_new_tokens=5)
    assert one.tolist() == [out[0, :5].tolist()]


def test_prefill_last_only_and_the_cache_layout():
    """decode_step(last_only=True) gives the full prefill's last logits and the same cache, laid
    out [layers, B, K, M, H]; an attention decodes a one-layer cache as its slice of the stack."""
    from jaxformer.models import stack

    model = build("gpt-tiny", init_std=SHARP)
    cfg, x = model.config, tokens(2, (2, 5))
    cache = model.init_cache(2, 8)
    assert cache["k"].shape == (cfg.num_layers, 2, cfg.kv_heads, 8, cfg.dims_per_head)
    prefill = nnx.jit(
        lambda m, c, last: m.decode_step(x, c, index=0, last_only=last), static_argnums=2
    )
    (full, full_cache), (last, last_cache) = (
        prefill(model, cache, False),
        prefill(model, cache, True),
    )
    assert last.shape == (2, 1, cfg.vocab_size)
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    for name in cache:
        np.testing.assert_array_equal(last_cache[name], full_cache[name])

    @jax.jit
    def one_and_stacked(state, k, v):
        attn = nnx.merge(graphdef, stack._layer(state, 1)).self_attn
        h = jax.random.normal(jax.random.key(0), (2, 5, cfg.d_model))
        return (
            attn.decode(h, (k[1], v[1]), index=2),
            attn.decode(h, (k, v), index=2, layer=1),
            attn.decode(h[:1], (jnp.swapaxes(k[1, 0], 1, 2), v[1, 0]), index=2),  # one row
        )

    graphdef, state = nnx.split(model.blocks)
    outs = one_and_stacked(state, cache["k"], cache["v"])
    (one, (k_one, _)), (stacked, (k_all, _)), (row, (k_row, v_row)) = outs
    np.testing.assert_allclose(one, stacked, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(k_one, k_all[1])
    assert not np.any(k_all[0])  # the other layers' slots are untouched
    assert v_row.shape == (cfg.kv_heads, 8, cfg.dims_per_head)
    assert k_row.shape == (cfg.kv_heads, cfg.dims_per_head, 8)  # keys [K, H, M]
    np.testing.assert_allclose(row, one[:1], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(k_row, np.swapaxes(k_one[0], 1, 2))
    split = stack.split_cache(cache)
    (row_cache,) = stack.without_batch_axis([split[0]])
    assert (row_cache["k"].shape, row_cache["v"].shape) == (k_row.shape, v_row.shape)
    assert stack.cache_length([row_cache]) == stack.cache_length(cache) == 8
    attn = nnx.merge(graphdef, stack._layer(state, 1)).self_attn
    with pytest.raises(ValueError, match="no batch axis"):  # two rows cannot share one row's cache
        attn.decode(jnp.zeros((2, 1, cfg.d_model)), (k_row, v_row), index=2)


def test_encoder_decoder_greedy_with_cache_equals_recompute():
    model = build("t5-tiny", init_std=0.1)
    lengths = np.array([9, 4])
    encoder = right_padded(1, lengths)
    out = generate(model, encoder, prompt_lengths=lengths, max_new_tokens=6)
    for row, length in enumerate(lengths):
        enc = encoder[row : row + 1, :length]
        ref, _ = greedy_by_recompute(lambda x: forward(model, enc, x), [0], 6)
        assert out[row].tolist() == ref, f"row {row}"
    one = generate(model, encoder[:1, : lengths[0]], max_new_tokens=6)  # caches without batch axis
    assert one.tolist() == [out[0].tolist()]
    # Padding the encoder input further, or on the left with an encoder_mask, changes nothing
    # (T5's relative positions do not see the shift).
    wider = jnp.pad(encoder, ((0, 0), (0, 3)))
    assert generate(model, wider, prompt_lengths=lengths, max_new_tokens=6).tolist() == out.tolist()
    left = jnp.stack([jnp.roll(wider[r], 12 - n) for r, n in enumerate(lengths)])
    left_mask = jnp.arange(12)[None, :] >= (12 - lengths)[:, None]
    assert generate(model, left, encoder_mask=left_mask, max_new_tokens=6).tolist() == out.tolist()


@pytest.mark.parametrize("name", ["gpt-tiny", "t5-tiny"])
def test_beam_with_one_beam_is_greedy(name):
    model = build(name, init_std=SHARP if name == "gpt-tiny" else 0.1)
    prompt = right_padded(0, PROMPT_LENGTHS)
    kw = dict(prompt_lengths=PROMPT_LENGTHS, max_new_tokens=6)
    greedy = generate(model, prompt, **kw)
    beam = generate(model, prompt, method="beam", num_beams=1, **kw)
    assert beam.tolist() == greedy.tolist()


def brute_force(model, context, n, vocab, eos_id, length_penalty):
    """Every distinct n-token continuation (pad after EOS) with its length-normalised score."""
    conts = np.array(list(itertools.product(range(vocab), repeat=n)))
    seqs = jnp.asarray(np.concatenate([np.tile(context, (len(conts), 1)), conts], axis=1))
    logp = jax.nn.log_softmax(forward(model, seqs)[:, len(context) - 1 : -1], axis=-1)
    logp_tok = np.asarray(jnp.take_along_axis(logp, jnp.asarray(conts)[..., None], -1)[..., 0])
    best = {}
    for cont, lp in zip(conts, logp_tok):
        ends = np.flatnonzero(cont == eos_id) if eos_id is not None else []
        length = ends[0] + 1 if len(ends) else n
        canonical = tuple(cont[:length]) + (0,) * (n - length)
        best[canonical] = lp[:length].sum() / length**length_penalty
    return sorted(best.items(), key=lambda kv: -kv[1])


@pytest.mark.parametrize("eos_id,length_penalty", [(None, 1.0), (3, 1.0), (3, 0.0)])
def test_beam_search_finds_the_best_sequences(eos_id, length_penalty):
    # vocab 8, 3 new tokens: with 64 = 8**2 beams nothing is pruned before the last step, so the
    # beams must be exactly the 64 best of all continuations.
    model = build("gpt-tiny", vocab_size=8, init_std=1.0)
    lengths = np.array([4, 2])
    prompt = right_padded(2, lengths, vocab=8)
    seqs, scores = beam_search(
        model,
        prompt,
        prompt_lengths=lengths,
        max_new_tokens=3,
        num_beams=64,
        eos_id=eos_id,
        length_penalty=length_penalty,
    )
    for row, length in enumerate(lengths):
        ranked = brute_force(model, np.asarray(prompt[row, :length]), 3, 8, eos_id, length_penalty)[
            :64
        ]
        assert [list(s) for s, _ in ranked] == seqs[row].tolist()
        np.testing.assert_allclose(scores[row], [s for _, s in ranked], rtol=1e-4, atol=1e-4)
    best = generate(
        model,
        prompt,
        prompt_lengths=lengths,
        max_new_tokens=3,
        method="beam",
        num_beams=64,
        eos_id=eos_id,
        length_penalty=length_penalty,
    )
    assert best.tolist() == seqs[:, 0].tolist()


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("gpt-tiny", dict(scan_layers=False)),
        # GQA, RoPE, post-norms, soft-capping, and sliding-window layers between global ones.
        (
            "llama-tiny",
            dict(
                sliding_window=3, global_attention_every=2, post_norms=True, attn_logit_softcap=5.0
            ),
        ),
    ],
)
def test_a_last_only_prefill_is_the_full_prefill_s_last_row(name, overrides):
    """decode_step(last_only=True) runs the last layer's queries and MLP for the last token only:
    its logits are the full prefill's last row and every cache slot is the same, with left-padded
    rows (their own positions and valid slots) and the layers unrolled or windowed."""
    model = build(name, init_std=SHARP, **overrides)
    x, lengths = tokens(3, (2, 7)), jnp.array([7, 4])
    shift = 7 - lengths
    kv_valid = jnp.arange(9)[None, :] >= shift[:, None]
    positions = jnp.maximum(jnp.arange(7)[None, :] - shift[:, None], 0)
    prefill = nnx.jit(
        lambda m, last: m.decode_step(
            x,
            m.init_cache(2, 9),
            index=0,
            positions=positions,
            kv_valid=kv_valid,
            last_only=last,
        ),
        static_argnums=1,
    )
    (full, full_cache), (last, last_cache) = prefill(model, False), prefill(model, True)
    assert last.shape == (2, 1, model.config.vocab_size)
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    for key in full_cache:
        np.testing.assert_array_equal(last_cache[key], full_cache[key])


@pytest.mark.parametrize("vocab", [50257, 32000, 997])
def test_greedy_token_is_jnp_argmax(vocab):
    # 50257 = 29 chunks of 1733 and 32000 = 16 of 2000 take the two-level path; 997 (prime) not.
    assert sampling._argmax_chunk(vocab) == {50257: 1733, 32000: 2000, 997: None}[vocab]
    logits = np.random.default_rng(0).normal(size=(5, vocab)).astype(np.float32)
    logits[0, [vocab - 3, 40, vocab // 2]] = 9.0  # a tie across chunks: the first index wins
    logits[1] = 0.0  # all equal
    logits[2] = -np.inf
    logits[3, vocab - 1] = 50.0  # the last id
    logits = jnp.asarray(logits)
    tokens = sampling.greedy_token(logits)
    assert tokens.dtype == jnp.int32
    np.testing.assert_array_equal(tokens, jnp.argmax(logits, axis=-1))
    np.testing.assert_array_equal(tokens[:4], [40, 0, 0, vocab - 1])


def test_top_k_one_tiny_temperature_and_tiny_top_p_are_greedy():
    model = build("gpt-tiny", init_std=SHARP)
    prompt = right_padded(0, PROMPT_LENGTHS)
    kw = dict(prompt_lengths=PROMPT_LENGTHS, max_new_tokens=6)
    greedy = generate(model, prompt, **kw).tolist()
    for sample_kw in (dict(top_k=1), dict(temperature=1e-6), dict(top_p=1e-6)):
        out = generate(model, prompt, method="sample", rng=jax.random.key(3), **sample_kw, **kw)
        assert out.tolist() == greedy, sample_kw


def test_sampling_is_reproducible_and_stays_in_the_top_k():
    model = build("gpt-tiny")  # the flat logits of the 0.02 init make every top-5 token likely
    prompt = tokens(4, (4, 5))
    kw = dict(max_new_tokens=8, method="sample", top_k=5)
    a = generate(model, prompt, rng=jax.random.key(7), **kw)
    assert a.tolist() == generate(model, prompt, rng=7, **kw).tolist()
    assert a.tolist() != generate(model, prompt, rng=jax.random.key(8), **kw).tolist()
    logits = forward(model, jnp.concatenate([prompt, a], axis=1))[
        :, 4:-1
    ]  # the logits each token came from
    top5 = np.asarray(jax.lax.top_k(logits, 5)[1])
    assert all(a[r, t] in top5[r, t] for r in range(4) for t in range(8))
    assert len(set(np.asarray(a).ravel().tolist())) > 8  # it really samples


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_eos_stops_a_row(method):
    model = build("gpt-tiny", init_std=SHARP)
    prompt = right_padded(0, PROMPT_LENGTHS)
    kw = dict(prompt_lengths=PROMPT_LENGTHS, max_new_tokens=6, method=method, num_beams=1)
    free = np.asarray(generate(model, prompt, **kw))
    eos = int(free[0, 2])  # row 0 emits it at step 2 at the latest
    stopped = np.asarray(generate(model, prompt, eos_id=eos, **kw))
    for row in range(3):
        hits = np.flatnonzero(free[row] == eos)
        end = hits[0] + 1 if len(hits) else 6
        assert stopped[row, :end].tolist() == free[row, :end].tolist()
        assert (stopped[row, end:] == 0).all()
    assert (stopped[0, 3:] == 0).all()


# Measured: max |int8 - float32| / max |float32 logit| = 1.1% (gpt-tiny), 1.5% (t5-tiny) with the
# presets' init; weights take 27% of the float32 bytes. Asserted with a 2x margin.
INT8_REL_ERROR = 0.03


@pytest.mark.parametrize("name", ["gpt-tiny", "t5-tiny"])
def test_int8_logits_stay_close_to_float32(name):
    model = build(name)
    quantized = quantize_model(model)
    x = tokens(5, (4, 32))
    args = (x, x[:, :16]) if name == "t5-tiny" else (x,)
    exact, approx = forward(model, *args), forward(quantized, *args)
    rel = float(jnp.max(jnp.abs(exact - approx)) / jnp.max(jnp.abs(exact)))
    assert 0 < rel < INT8_REL_ERROR
    assert param_bytes(quantized) < 0.3 * param_bytes(model)
    assert quantized.embed.token_embed.embedding[...].dtype == jnp.int8
    assert model.embed.token_embed.embedding[...].dtype == jnp.float32  # the input is untouched
    prompt = x[:2, :8]
    assert generate(quantized, prompt, max_new_tokens=4).shape == (2, 4)


def test_the_compiled_loop_is_keyed_without_the_temperature():
    key = lambda **kw: DecodeOptions(max_new_tokens=4, **kw).compile_key()
    # The temperature is traced, so a new one reuses the compiled loop; at 0 sampling is greedy.
    assert key(method="sample", temperature=0.5) == key(method="sample", temperature=2.0)
    assert key(method="sample", temperature=0) == key(method="greedy")
    assert key(method="sample", top_k=np.int64(3)) == key(method="sample", top_k=3)
    assert len({key(method=m) for m in METHODS}) == len(METHODS)


def test_clear_errors():
    model = build("gpt-tiny")  # max_len 128
    with pytest.raises(ValueError, match=r"prompt length 100 plus max_new_tokens 40.*128"):
        generate(model, jnp.ones((1, 100), jnp.int32), max_new_tokens=40)
    with pytest.raises(ValueError, match="decoder-only or encoder-decoder"):
        generate(build("bert-tiny"), jnp.ones((1, 4), jnp.int32), max_new_tokens=2)
    with pytest.raises(ValueError, match="unknown generation method 'topk'"):
        generate(model, jnp.ones((1, 4), jnp.int32), max_new_tokens=2, method="topk")
    with pytest.raises(ValueError, match="needs rng"):
        generate(model, jnp.ones((1, 4), jnp.int32), max_new_tokens=2, method="sample")
    with pytest.raises(ValueError, match="prompt_lengths"):
        generate(model, jnp.ones((2, 4), jnp.int32), max_new_tokens=2, prompt_lengths=[0, 4])
    with pytest.raises(ValueError, match="encoder_mask is for encoder-decoder"):
        generate(
            model,
            jnp.ones((2, 4), jnp.int32),
            max_new_tokens=2,
            encoder_mask=jnp.ones((2, 4), bool),
        )
