"""Packed stream and batcher: batches are a pure function of (seed, step), sharded exactly over processes."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxformer.data.config import DataConfig
from jaxformer.data.objectives import SpecialIds
from jaxformer.data.pipeline import OBJECTIVES, PackedStream, make_batcher
from jaxformer.data.token_store import ArrayTokens

VOCAB = 300
SPECIAL = SpecialIds(vocab_size=VOCAB, pad=0, eos=1, mask=2, sentinels=tuple(range(200, 300)))
CONFIG = DataConfig(seq_len=32, target_len=12, batch_size=8, objective="causal_lm")


def corpus(num_docs: int = 60, max_len: int = 50, seed: int = 0, identity: bool = False):
    """Random documents of 1..max_len tokens, each ending in EOS; identity=True makes token == stream index."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, max_len + 1, num_docs)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    tokens = rng.integers(3, 200, offsets[-1]).astype(np.int32)
    tokens[offsets[1:] - 1] = SPECIAL.eos
    if identity:
        tokens = np.arange(offsets[-1], dtype=np.int32)
    return tokens, offsets


def assert_batches_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_rows_are_contiguous_document_pieces():
    tokens, offsets = corpus(identity=True)
    stream = PackedStream(ArrayTokens(tokens, offsets), row_len=37, seed=3)
    for index in range(2 * stream.rows_per_epoch + 3):
        t, seg, pos = stream.row(index)
        assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(np.diff(seg) <= 1)
        for s in np.unique(seg):
            piece, p = t[seg == s], pos[seg == s]
            doc = np.searchsorted(offsets, piece[0], side="right") - 1
            np.testing.assert_array_equal(piece, piece[0] + np.arange(len(piece)))  # contiguous
            assert piece[-1] < offsets[doc + 1]  # inside one document
            np.testing.assert_array_equal(p, np.arange(len(piece)))  # positions restart per segment
            if s != seg[0]:
                assert piece[0] == offsets[doc]  # only the first segment can continue a document
            if s != seg[-1]:
                assert piece[-1] == offsets[doc + 1] - 1  # only the last segment can be cut


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), row_len=st.integers(1, 64), num_docs=st.integers(1, 40))
def test_every_token_once_per_epoch(seed, row_len, num_docs):
    tokens, offsets = corpus(num_docs=num_docs, max_len=30, seed=seed, identity=True)
    if len(tokens) < row_len:
        with pytest.raises(ValueError, match="corpus too small"):
            PackedStream(ArrayTokens(tokens, offsets), row_len, seed)
        return
    stream = PackedStream(ArrayTokens(tokens, offsets), row_len, seed)
    for epoch in range(2):
        rows = [
            stream.row(epoch * stream.rows_per_epoch + r)[0] for r in range(stream.rows_per_epoch)
        ]
        seen = np.concatenate(rows)
        assert len(np.unique(seen)) == len(seen) == stream.rows_per_epoch * row_len
        # what is dropped is the slack that lets each epoch shift its cuts: under two rows
        assert len(tokens) - len(seen) < 2 * row_len


def test_empty_documents_are_skipped():
    tokens = np.arange(10, dtype=np.int32)
    offsets = np.array([0, 0, 4, 4, 4, 10, 10])
    stream = PackedStream(ArrayTokens(tokens, offsets), row_len=5, seed=0, shuffle=False)
    t, seg, pos = stream.row(0)
    np.testing.assert_array_equal(t, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(seg, [1, 1, 1, 1, 2])
    np.testing.assert_array_equal(pos, [0, 1, 2, 3, 0])


def test_epochs_cut_and_order_rows_differently():
    tokens, offsets = corpus(identity=True)
    stream = PackedStream(ArrayTokens(tokens, offsets), row_len=16, seed=0)
    n = stream.rows_per_epoch
    firsts = [[int(stream.row(e * n + r)[0][0]) for r in range(n)] for e in range(3)]
    assert len({tuple(f) for f in firsts}) == 3  # another order each epoch
    assert len({min(f) for f in firsts}) > 1  # and other cut points
    # consecutive rows (one batch) are spread over the corpus, not adjacent windows
    assert np.mean(np.abs(np.diff(firsts[0])) == 16) < 0.5
    unshuffled = PackedStream(ArrayTokens(tokens, offsets), row_len=16, seed=0, shuffle=False)
    np.testing.assert_array_equal(unshuffled.row(0)[0], np.arange(16))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_batch_is_a_function_of_seed_and_step(objective):
    tokens, offsets = corpus()
    make = lambda seed: make_batcher(CONFIG, ArrayTokens(tokens, offsets), SPECIAL, seed, objective)
    rows_per_epoch = make(0).stream.rows_per_epoch
    steps = 2 * rows_per_epoch // CONFIG.batch_size + 2  # crosses two epoch boundaries
    assert rows_per_epoch % CONFIG.batch_size != 0  # some batch straddles an epoch boundary
    run = make(5)
    iterated = [run.batch(s) for s in range(steps)]
    for step in (0, steps // 3, steps - 1):
        assert_batches_equal(
            make(5).batch(step), iterated[step]
        )  # fresh process, resumed at `step`
    first_key = next(iter(iterated[0]))
    assert not np.array_equal(make(6).batch(1)[first_key], iterated[1][first_key])


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_process_shards_concatenate_to_global_batch(objective):
    tokens, offsets = corpus()
    batcher = make_batcher(CONFIG, ArrayTokens(tokens, offsets), SPECIAL, 11, objective)
    for step in (0, 7):
        full = batcher.batch(step)
        for count in (1, 2, 4, 8):
            other = make_batcher(
                CONFIG, ArrayTokens(tokens, offsets), SPECIAL, 11, objective
            )  # another host
            shards = [other.batch(step, i, count) for i in range(count)]
            assert all(len(s[k]) == CONFIG.batch_size // count for s in shards for k in s)
            assert_batches_equal({k: np.concatenate([s[k] for s in shards]) for k in full}, full)


def test_output_shapes_and_dtypes():
    tokens, offsets = corpus()
    B, L, T = CONFIG.batch_size, CONFIG.seq_len, CONFIG.target_len
    lm_keys = {"inputs", "targets", "loss_weights", "segment_ids", "positions"}
    t5_keys = {
        "encoder_inputs",
        "encoder_segment_ids",
        "encoder_positions",
        "decoder_inputs",
        "targets",
        "loss_weights",
        "decoder_segment_ids",
        "decoder_positions",
    }
    for objective, keys in [
        ("causal_lm", lm_keys),
        ("masked_lm", lm_keys),
        ("span_corruption", t5_keys),
    ]:
        batch = make_batcher(CONFIG, ArrayTokens(tokens, offsets), SPECIAL, 0, objective).batch(3)
        assert set(batch) == keys
        for k, v in batch.items():
            assert v.dtype == (np.float32 if k == "loss_weights" else np.int32), k
            is_decoder = objective == "span_corruption" and not k.startswith("encoder")
            assert v.shape == ((B, T) if is_decoder else (B, L)), k


def test_causal_batch_targets_follow_the_stream():
    tokens, offsets = corpus(identity=True)
    batch = make_batcher(CONFIG, ArrayTokens(tokens, offsets), SPECIAL, 1, "causal_lm").batch(2)
    w = batch["loss_weights"] == 1
    assert np.all(batch["targets"][w] == batch["inputs"][w] + 1)  # next token of the same document
    ends = np.isin(batch["inputs"], offsets[1:] - 1)  # last token of a document
    np.testing.assert_array_equal(
        w, ~ends
    )  # no padding in packed rows: weight 0 exactly at document ends


def test_errors_speak_to_the_user():
    tokens, offsets = corpus()
    batcher = make_batcher(CONFIG, ArrayTokens(tokens, offsets), SPECIAL, 0)
    with pytest.raises(ValueError, match="not divisible by the process count 3"):
        batcher.batch(0, 0, 3)
    with pytest.raises(ValueError, match="process_index"):
        batcher.batch(0, 4, 4)
    with pytest.raises(ValueError, match="corpus too small"):
        make_batcher(CONFIG, ArrayTokens(tokens[:10], np.array([0, 10])), SPECIAL, 0)
    with pytest.raises(ValueError, match="causal_lm, masked_lm, span_corruption"):
        make_batcher(CONFIG, ArrayTokens(tokens, offsets), SPECIAL, 0, "prefix_lm")
    with pytest.raises(ValueError, match="'auto'"):
        make_batcher(
            dataclasses.replace(CONFIG, objective="auto"), ArrayTokens(tokens, offsets), SPECIAL, 0
        )
    with pytest.raises(ValueError, match="sentinel"):
        one_sentinel = SpecialIds(vocab_size=VOCAB, sentinels=(5,))
        make_batcher(CONFIG, ArrayTokens(tokens, offsets), one_sentinel, 0, "span_corruption")
    with pytest.raises(ValueError, match="offsets"):
        ArrayTokens(tokens, offsets[:-1])


def test_rows_get_independent_randomness():
    tokens, offsets = corpus()
    batcher = make_batcher(CONFIG, ArrayTokens(tokens, offsets), SPECIAL, 2, "masked_lm")
    weights = np.concatenate([batcher.batch(s)["loss_weights"] for s in range(4)])
    assert len({w.tobytes() for w in weights}) == len(
        weights
    )  # every row has its own masking pattern
