"""Objectives: causal LM shifts, BERT masking statistics, T5 span corruption round trip."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxformer.data import objectives as obj
from jaxformer.data.objectives import SpecialIds

VOCAB = 200
SENTINELS = tuple(range(VOCAB - 1, VOCAB - 101, -1))  # T5 style: counting down from the top
SPECIAL = SpecialIds(vocab_size=VOCAB, pad=0, eos=1, mask=2, sentinels=SENTINELS, no_mask_ids=(3,))
NORMAL_LO, NORMAL_HI = 4, VOCAB - 100  # normal ids are [4, 100)


def test_special_ids_validation_and_pools():
    assert set(SPECIAL.normal_ids().tolist()) == set(range(NORMAL_LO, NORMAL_HI))
    assert {0, 1, 2, 3, VOCAB - 1} <= set(SPECIAL.special_array().tolist())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        SpecialIds(vocab_size=10, mask=10)
    with pytest.raises(ValueError, match="distinct"):
        SpecialIds(vocab_size=10, sentinels=(5, 5))


def test_causal_lm_targets_are_next_token_of_same_segment():
    tokens = np.array([10, 11, 12, 20, 21, 30, 31, 32, 0, 0])
    seg = np.array([1, 1, 1, 2, 2, 3, 3, 3, 0, 0])
    pos = np.array([0, 1, 2, 0, 1, 0, 1, 2, 0, 0])
    out = obj.causal_lm(tokens, seg, pos)
    np.testing.assert_array_equal(out["inputs"], tokens[:-1])
    np.testing.assert_array_equal(out["targets"], tokens[1:])
    np.testing.assert_array_equal(out["segment_ids"], seg[:-1])
    np.testing.assert_array_equal(out["positions"], pos[:-1])
    # weight 0 exactly at each segment's last token (target is in the next segment) and at padding
    np.testing.assert_array_equal(out["loss_weights"], [1, 1, 0, 1, 0, 1, 1, 0, 0])
    assert out["inputs"].dtype == np.int32 and out["loss_weights"].dtype == np.float32


def _mlm_rows(num_rows: int, length: int, seed: int):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(NORMAL_LO, NORMAL_HI, (num_rows, length))
    tokens[:, ::7] = SPECIAL.eos  # special tokens sprinkled in
    tokens[:, 3] = 3
    seg = np.ones((num_rows, length), np.int64)
    real = rng.integers(length // 2, length + 1, num_rows)
    for i, n in enumerate(real):
        seg[i, n:] = 0
        tokens[i, n:] = SPECIAL.pad
    return tokens, seg


def test_masked_lm_selection_count_and_80_10_10_split():
    tokens, seg = _mlm_rows(400, 64, seed=0)
    pos = np.zeros_like(tokens)
    kinds = np.zeros(3)
    for i in range(len(tokens)):
        out = obj.masked_lm(tokens[i], seg[i], pos[i], np.random.default_rng([7, i]), SPECIAL, 0.15)
        cand = (seg[i] != 0) & ~np.isin(tokens[i], SPECIAL.special_array())
        chosen = out["loss_weights"] == 1
        assert chosen.sum() == max(1, round(0.15 * cand.sum()))  # exact count rule
        assert not np.any(chosen & ~cand)  # never padding or special tokens
        np.testing.assert_array_equal(out["targets"], tokens[i])
        np.testing.assert_array_equal(
            out["inputs"][~chosen], tokens[i][~chosen]
        )  # unselected unchanged
        np.testing.assert_array_equal(out["segment_ids"], seg[i])
        sel_in, sel_orig = out["inputs"][chosen], tokens[i][chosen]
        is_mask = sel_in == SPECIAL.mask
        assert np.all(
            (sel_in >= NORMAL_LO) & (sel_in < NORMAL_HI) | is_mask
        )  # random ids are normal ids
        kinds += [
            is_mask.sum(),
            (~is_mask & (sel_in != sel_orig)).sum(),
            (sel_in == sel_orig).sum(),
        ]
    frac = kinds / kinds.sum()
    # ~3,000 selections, fixed seeds: 80/10/10 within a margin far above the standard error (~0.7%)
    # (a random replacement equal to the original counts as kept: 1/96 of 10%)
    assert abs(frac[0] - 0.8) < 0.03 and abs(frac[1] - 0.1) < 0.03 and abs(frac[2] - 0.1) < 0.03


def test_masked_lm_row_without_candidates_is_untouched():
    tokens = np.array([1, 1, 0, 0])
    seg = np.array([1, 1, 0, 0])
    out = obj.masked_lm(tokens, seg, np.zeros(4), np.random.default_rng(0), SPECIAL)
    np.testing.assert_array_equal(out["inputs"], tokens)
    assert out["loss_weights"].sum() == 0
    with pytest.raises(ValueError, match="mask"):
        obj.masked_lm(tokens, seg, np.zeros(4), np.random.default_rng(0), SpecialIds(vocab_size=10))


@settings(max_examples=60, deadline=None)
@given(
    length=st.integers(2, 300),
    density=st.floats(0.05, 0.5),
    span=st.floats(1.0, 8.0),
    seed=st.integers(0, 2**31),
)
def test_noise_mask_counts(length, density, span, seed):
    num_noise, num_spans = obj.noise_counts(length, density, span)
    if length - num_noise < num_spans:
        return
    mask = obj.random_spans_noise_mask(length, density, span, np.random.default_rng(seed))
    assert mask.shape == (length,) and mask.sum() == num_noise
    assert not mask[0] and mask[-1]  # alternates starting with non-noise
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    assert starts.sum() == num_spans
    assert abs(num_noise - length * density) <= 1.0  # noise fraction ~ density


def _reconstruct(out: dict) -> list[int]:
    """Merge encoder input and decoder target back into the raw row by sentinels."""
    enc = out["encoder_inputs"][: out["encoder_segment_ids"].sum() - 1].tolist()  # drop EOS
    dec = out["targets"][: int(out["loss_weights"].sum()) - 1].tolist()
    sentinel_at = {s: i for i, s in enumerate(SENTINELS)}
    spans: list[list[int]] = []
    for t in dec:
        if t in sentinel_at:
            assert sentinel_at[t] == len(spans)  # sentinels in order in the target
            spans.append([])
        else:
            spans[-1].append(t)
    raw, k = [], 0
    for t in enc:
        if t in sentinel_at:
            assert sentinel_at[t] == k  # and in the encoder input
            raw += spans[k]
            k += 1
        else:
            raw.append(t)
    assert k == len(spans)
    return raw


@settings(max_examples=60, deadline=None)
@given(
    seq_len=st.integers(8, 256),
    target_len=st.integers(4, 96),
    density=st.floats(0.05, 0.5),
    span=st.floats(1.0, 6.0),
    seed=st.integers(0, 2**31),
)
def test_span_corruption_round_trip(seq_len, target_len, density, span, seed):
    try:
        raw_len = obj.span_corruption_raw_length(seq_len, target_len, density, span)
    except ValueError:
        return  # nothing fits: reported as an error
    enc, dec = obj.span_corruption_lengths(raw_len, density, span)
    assert enc <= seq_len and dec <= target_len
    if obj.noise_counts(raw_len, density, span)[1] > len(SENTINELS):
        return
    rng = np.random.default_rng(seed)
    raw = rng.integers(NORMAL_LO, NORMAL_HI, raw_len)
    raw[rng.random(raw_len) < 0.1] = SPECIAL.eos  # document ends inside the window
    rng_row = np.random.default_rng([seed, 1])
    out = obj.span_corruption(raw, rng_row, SPECIAL, seq_len, target_len, density, span)
    assert out["encoder_inputs"].shape == (seq_len,) and out["targets"].shape == (target_len,)
    assert all(v.dtype == (np.float32 if k == "loss_weights" else np.int32) for k, v in out.items())
    assert out["encoder_segment_ids"].sum() == enc and out["loss_weights"].sum() == dec
    assert _reconstruct(out) == raw.tolist()
    n_dec = int(out["loss_weights"].sum())
    assert out["targets"][n_dec - 1] == SPECIAL.eos and np.all(
        out["targets"][n_dec:] == SPECIAL.pad
    )
    assert out["encoder_inputs"][enc - 1] == SPECIAL.eos and np.all(
        out["encoder_inputs"][enc:] == SPECIAL.pad
    )
    np.testing.assert_array_equal(out["decoder_inputs"][1:n_dec], out["targets"][: n_dec - 1])
    assert out["decoder_inputs"][0] == SPECIAL.pad and np.all(
        out["decoder_inputs"][n_dec:] == SPECIAL.pad
    )
    np.testing.assert_array_equal(out["decoder_segment_ids"], out["loss_weights"])
    np.testing.assert_array_equal(out["decoder_positions"][:n_dec], np.arange(n_dec))
    np.testing.assert_array_equal(out["encoder_positions"][:enc], np.arange(enc))


def test_span_corruption_raw_length_matches_t5_for_defaults():
    # t5's random_spans_helper(512, 0.15, 3) gives raw 568 -> inputs 512, targets 114
    assert obj.span_corruption_raw_length(512, 114, 0.15, 3.0) == 568
    assert obj.span_corruption_lengths(568, 0.15, 3.0) == (512, 114)
    with pytest.raises(ValueError, match="no raw length fits"):
        obj.span_corruption_raw_length(4, 2, 0.15, 3.0)
