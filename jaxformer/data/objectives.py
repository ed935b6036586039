"""Pretraining objectives on packed rows: causal LM, masked LM (BERT), span corruption (T5). Pure numpy."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

Row = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecialIds:
    """Token ids with a special meaning; sentinels are listed explicitly (T5 uses sentinels[i] for span i)."""

    vocab_size: int
    pad: int = 0
    eos: int = 1
    mask: Optional[int] = None
    sentinels: tuple[int, ...] = ()
    no_mask_ids: tuple[int, ...] = ()
    """Further ids (bos, unk, ...) that are never masked nor drawn as random replacements."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sentinels", tuple(int(i) for i in self.sentinels))
        object.__setattr__(self, "no_mask_ids", tuple(int(i) for i in self.no_mask_ids))
        ids = [self.pad, self.eos, *self.sentinels, *self.no_mask_ids]
        ids += [] if self.mask is None else [self.mask]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"special ids {bad} are outside the vocabulary [0, {self.vocab_size})")
        if len(set(self.sentinels)) != len(self.sentinels):
            raise ValueError("sentinel ids must be distinct")

    def special_array(self) -> np.ndarray:
        """All special ids, sorted and unique."""
        ids = [self.pad, self.eos, *self.sentinels, *self.no_mask_ids]
        ids += [] if self.mask is None else [self.mask]
        return np.unique(np.asarray(ids, np.int64))

    def normal_ids(self) -> np.ndarray:
        """Every id of the vocabulary that is not special (the pool for BERT's random replacements)."""
        return np.setdiff1d(np.arange(self.vocab_size, dtype=np.int64), self.special_array())


# ---------------------------------------------------------------- causal LM


def causal_lm(tokens_L1: np.ndarray, segment_ids_L1: np.ndarray, positions_L1: np.ndarray) -> Row:
    """Next-token prediction from a row of L+1 tokens; no loss across a segment boundary or at padding."""
    seg_in, seg_out = segment_ids_L1[:-1], segment_ids_L1[1:]
    weights_L = (seg_in == seg_out) & (seg_in != 0)
    return {
        "inputs": tokens_L1[:-1].astype(np.int32),
        "targets": tokens_L1[1:].astype(np.int32),
        "loss_weights": weights_L.astype(np.float32),
        "segment_ids": seg_in.astype(np.int32),
        "positions": positions_L1[:-1].astype(np.int32),
    }


# ---------------------------------------------------------------- masked LM


def num_masked(num_candidates: int, mask_rate: float) -> int:
    """How many positions masked LM selects: round(rate * candidates), at least 1 if there is any candidate."""
    if num_candidates == 0:
        return 0
    return min(num_candidates, max(1, int(round(mask_rate * num_candidates))))


def masked_lm(
    tokens_L: np.ndarray,
    segment_ids_L: np.ndarray,
    positions_L: np.ndarray,
    rng: np.random.Generator,
    special: SpecialIds,
    mask_rate: float = 0.15,
    normal_ids: Optional[np.ndarray] = None,
) -> Row:
    """BERT masking: select mask_rate of the real non-special tokens; 80% -> [MASK], 10% random, 10% kept."""
    if special.mask is None:
        raise ValueError("masked_lm needs SpecialIds.mask")
    pool = special.normal_ids() if normal_ids is None else normal_ids
    candidates = np.flatnonzero((segment_ids_L != 0) & ~np.isin(tokens_L, special.special_array()))
    chosen = np.sort(rng.choice(candidates, num_masked(len(candidates), mask_rate), replace=False))
    u = rng.random(len(chosen))
    inputs_L = tokens_L.astype(np.int32).copy()
    inputs_L[chosen[u < 0.8]] = special.mask
    to_random = chosen[(u >= 0.8) & (u < 0.9)]
    inputs_L[to_random] = pool[rng.integers(0, len(pool), len(to_random))]
    weights_L = np.zeros(len(tokens_L), np.float32)
    weights_L[chosen] = 1.0
    return {
        "inputs": inputs_L,
        "targets": tokens_L.astype(np.int32),
        "loss_weights": weights_L,
        "segment_ids": segment_ids_L.astype(np.int32),
        "positions": positions_L.astype(np.int32),
    }


# ---------------------------------------------------------------- span corruption


def noise_counts(length: int, noise_density: float, mean_noise_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a raw row of `length` tokens, as in t5's random_spans_noise_mask."""
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span)), 1)
    return num_noise, num_spans


def span_corruption_lengths(
    length: int, noise_density: float, mean_noise_span: float
) -> tuple[int, int]:
    """(encoder length, decoder length) after corrupting a raw row of `length` tokens, EOS included."""
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def span_corruption_raw_length(
    inputs_len: int, targets_len: int, noise_density: float, mean_noise_span: float
) -> int:
    """Largest raw row length whose corrupted encoder/decoder sequences fit (t5's random_spans_helper)."""
    if not 0.0 < noise_density < 1.0 or mean_noise_span < 1.0:
        raise ValueError(
            f"need 0 < noise_density < 1 and mean_noise_span >= 1, got {noise_density}, {mean_noise_span}"
        )
    best = 0
    for n in range(2, int(inputs_len / (1.0 - noise_density)) + 3):
        num_noise, num_spans = noise_counts(n, noise_density, mean_noise_span)
        enc, dec = span_corruption_lengths(n, noise_density, mean_noise_span)
        if enc <= inputs_len and dec <= targets_len and n - num_noise >= num_spans:
            best = n
    if best == 0:
        raise ValueError(
            f"span corruption: no raw length fits seq_len={inputs_len} and target_len={targets_len} "
            f"(noise_density={noise_density}, mean_noise_span={mean_noise_span})"
        )
    return best


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Uniformly random split of num_items into num_segments positive lengths."""
    cuts = np.sort(rng.choice(np.arange(1, num_items), num_segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span: float, rng: np.random.Generator
) -> np.ndarray:
    """bool[length]: alternating non-noise/noise spans, non-noise first (t5's random_spans_noise_mask)."""
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span)
    if length - num_noise < num_spans:
        raise ValueError(f"raw length {length} too short for {num_spans} noise spans")
    noise_lens = _random_segmentation(num_noise, num_spans, rng)
    keep_lens = _random_segmentation(length - num_noise, num_spans, rng)
    lens = np.stack([keep_lens, noise_lens], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], num_spans), lens)


def _pad(x: np.ndarray, length: int, pad_id: int) -> np.ndarray:
    out = np.full(length, pad_id, np.int32)
    out[: len(x)] = x
    return out


def span_corruption(
    tokens_R: np.ndarray,
    rng: np.random.Generator,
    special: SpecialIds,
    inputs_len: int,
    targets_len: int,
    noise_density: float = 0.15,
    mean_noise_span: float = 3.0,
) -> Row:
    """T5 span corruption of one raw row (one segment): spans -> sentinels in the encoder, spans -> decoder."""
    noise_R = random_spans_noise_mask(len(tokens_R), noise_density, mean_noise_span, rng)
    starts_R = noise_R & ~np.concatenate([[False], noise_R[:-1]])
    num_spans = int(starts_R.sum())
    if num_spans > len(special.sentinels):
        raise ValueError(
            f"span corruption needs {num_spans} sentinels, got {len(special.sentinels)}"
        )
    sentinels = np.asarray(special.sentinels[:num_spans], np.int32)
    span_index_R = np.cumsum(starts_R) - 1
    enc = np.where(starts_R, sentinels[np.maximum(span_index_R, 0)], tokens_R)[~noise_R | starts_R]
    dec = np.insert(tokens_R[noise_R], np.flatnonzero(starts_R[noise_R]), sentinels)
    enc, dec = np.append(enc, special.eos), np.append(dec, special.eos)
    if len(enc) > inputs_len or len(dec) > targets_len:
        raise ValueError(
            f"corrupted lengths {len(enc)}, {len(dec)} exceed {inputs_len}, {targets_len}"
        )
    targets_D = _pad(dec, targets_len, special.pad)
    decoder_inputs_D = _pad(np.concatenate([[special.pad], dec[:-1]]), targets_len, special.pad)
    real_E = (np.arange(inputs_len) < len(enc)).astype(np.int32)
    real_D = (np.arange(targets_len) < len(dec)).astype(np.int32)
    return {
        "encoder_inputs": _pad(enc, inputs_len, special.pad),
        "encoder_segment_ids": real_E,
        "encoder_positions": (np.arange(inputs_len) * real_E).astype(np.int32),
        "decoder_inputs": decoder_inputs_D,
        "targets": targets_D,
        "loss_weights": real_D.astype(np.float32),
        "decoder_segment_ids": real_D,
        "decoder_positions": (np.arange(targets_len) * real_D).astype(np.int32),
    }
