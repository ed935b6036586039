"""Stateless packed batches: a batch is a pure function of (seed, step), sharded contiguously over processes."""

from __future__ import annotations

import collections
import math
from typing import Callable, Iterator, Optional

import numpy as np

from jaxformer.data import objectives as obj
from jaxformer.data.config import DataConfig
from jaxformer.data.objectives import SpecialIds

OBJECTIVES = ("causal_lm", "masked_lm", "span_corruption")
_PERMUTATION_SALT = 0x5EED
_OBJECTIVE_SALT = {"causal_lm": 1, "masked_lm": 2, "span_corruption": 3}

RowFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.random.Generator], obj.Row]


class PackedStream:
    """Documents shuffled per epoch (seeded by (seed, epoch)), concatenated and cut into rows of row_len tokens.

    The incomplete last row of each epoch is dropped, so rows never hold padding. A document crossing a row
    boundary is split; its continuation starts a new segment (positions restart at 0) in the next row.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, row_len: int, seed: int, shuffle: bool = True):
        self.tokens = np.asarray(tokens)
        self.offsets = np.asarray(offsets, np.int64)
        if self.tokens.ndim != 1 or self.offsets.ndim != 1 or len(self.offsets) < 2:
            raise ValueError("tokens must be a flat [N] array and offsets [n_docs + 1] document starts")
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.tokens) or np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must start at 0, be non-decreasing and end at len(tokens)")
        if row_len < 1:
            raise ValueError(f"row length must be positive, got {row_len}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if len(self.tokens) < row_len:
            raise ValueError(
                f"corpus too small: {len(self.tokens)} tokens cannot fill one row of {row_len} tokens"
            )
        self.row_len, self.seed, self.shuffle = int(row_len), int(seed), shuffle
        self._doc_lens = np.diff(self.offsets)
        self._epochs: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()

    @property
    def num_docs(self) -> int:
        """Number of documents in the corpus."""
        return len(self._doc_lens)

    @property
    def rows_per_epoch(self) -> int:
        """Full rows per pass over the corpus."""
        return len(self.tokens) // self.row_len

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document permutation [n_docs], cumulative lengths in that order [n_docs + 1]); cached."""
        if epoch not in self._epochs:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch, _PERMUTATION_SALT]).permutation(self.num_docs)
            else:
                perm = np.arange(self.num_docs)
            cum = np.concatenate([[0], np.cumsum(self._doc_lens[perm])])
            self._epochs[epoch] = (perm, cum)
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        self._epochs.move_to_end(epoch)
        return self._epochs[epoch]

    def _row_slot(self, epoch: int, r: int) -> int:
        """Where row r of an epoch is cut from: an affine bijection (a*r + b) mod n when shuffling.

        Consecutive rows (one batch) then come from all over the corpus instead of one or two
        documents, without storing a permutation of every row.
        """
        n = self.rows_per_epoch
        if not self.shuffle or n == 1:
            return r
        rng = np.random.default_rng([self.seed, epoch, _PERMUTATION_SALT, 1])
        a = int(rng.integers(1, n))
        while math.gcd(a, n) != 1:
            a = a % (n - 1) + 1
        return (a * r + int(rng.integers(0, n))) % n

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens [L], segment_ids [L] (1, 2, ... per document piece), positions [L]) of global row `index`."""
        if index < 0:
            raise ValueError(f"row index must be non-negative, got {index}")
        epoch, r = divmod(int(index), self.rows_per_epoch)
        perm, cum = self.epoch_order(epoch)
        r = self._row_slot(epoch, r)
        start, end = r * self.row_len, (r + 1) * self.row_len
        first = int(np.searchsorted(cum, start, side="right")) - 1
        last = int(np.searchsorted(cum, end, side="left"))  # first k with cum[k] >= end
        lo = np.maximum(cum[first:last], start)
        hi = np.minimum(cum[first + 1 : last + 1], end)
        keep = hi > lo  # skip empty documents
        lo, hi, docs = lo[keep], hi[keep], perm[first:last][keep]
        piece_lens = hi - lo
        piece_of = np.repeat(np.arange(len(piece_lens)), piece_lens)
        piece_starts = np.concatenate([[0], np.cumsum(piece_lens)[:-1]])
        positions_L = np.arange(self.row_len) - piece_starts[piece_of]
        source_L = self.offsets[docs][piece_of] + (lo - cum[first:last][keep])[piece_of] + positions_L
        return (
            self.tokens[source_L].astype(np.int32),
            (piece_of + 1).astype(np.int32),
            positions_L.astype(np.int32),
        )


class Batcher:
    """batch(step) -> dict of arrays: global rows step*B .. step*B+B-1, this process's contiguous slice."""

    def __init__(self, stream: PackedStream, row_fn: RowFn, batch_size: int, seed: int, salt: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.stream, self.row_fn, self.batch_size, self.seed, self.salt = stream, row_fn, batch_size, seed, salt
        self._eval_stream: Optional[PackedStream] = None

    def row(self, index: int, stream: Optional[PackedStream] = None) -> obj.Row:
        """The objective applied to global row `index`; its randomness is seeded by (seed, index) only."""
        rng = np.random.default_rng([self.seed, int(index), self.salt])
        return self.row_fn(*(stream or self.stream).row(index), rng)

    def _rows(self, step: int, process_index: int, process_count: int, stream: PackedStream) -> obj.Row:
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
        if self.batch_size % process_count:
            raise ValueError(
                f"global batch size {self.batch_size} is not divisible by the process count {process_count}"
            )
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        local = self.batch_size // process_count
        first = step * self.batch_size + process_index * local
        rows = [self.row(i, stream) for i in range(first, first + local)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> obj.Row:
        """This process's share ([B / process_count, ...] arrays) of the global batch at `step`."""
        return self._rows(step, process_index, process_count, self.stream)

    def eval_batches(
        self, num_batches: Optional[int] = None, process_index: int = 0, process_count: int = 1
    ) -> Iterator[obj.Row]:
        """Unshuffled batches in corpus order (default: every full batch of one pass); deterministic."""
        if self._eval_stream is None:
            s = self.stream
            self._eval_stream = PackedStream(s.tokens, s.offsets, s.row_len, s.seed, shuffle=False)
        available = self._eval_stream.rows_per_epoch // self.batch_size
        if num_batches is None:
            num_batches = available
        if num_batches > available:
            raise ValueError(
                f"eval set holds {available} full batches of {self.batch_size} rows, {num_batches} requested"
            )
        for step in range(num_batches):
            yield self._rows(step, process_index, process_count, self._eval_stream)


def make_batcher(
    data_config: DataConfig,
    tokens: np.ndarray,
    offsets: np.ndarray,
    special_ids: SpecialIds,
    seed: int,
    objective: Optional[str] = None,
    shuffle: bool = True,
) -> Batcher:
    """Batcher for `objective` (default: data_config.objective) with the shapes of data_config."""
    name = data_config.objective if objective is None else objective
    if name == "auto":
        raise ValueError("objective 'auto' must be resolved from the model family before building a batcher")
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid objectives: {', '.join(OBJECTIVES)}")
    c, sp = data_config, special_ids
    if name == "causal_lm":
        row_len = c.seq_len + 1

        def row_fn(t, s, p, rng):
            return obj.causal_lm(t, s, p)

    elif name == "masked_lm":
        if sp.mask is None:
            raise ValueError("masked_lm needs a mask id in SpecialIds")
        row_len, pool = c.seq_len, sp.normal_ids()
        if len(pool) == 0:
            raise ValueError("masked_lm needs at least one non-special id in the vocabulary")

        def row_fn(t, s, p, rng):
            return obj.masked_lm(t, s, p, rng, sp, c.mask_rate, pool)

    else:
        row_len = obj.span_corruption_raw_length(c.seq_len, c.target_len, c.noise_density, c.mean_noise_span)
        spans = obj.noise_counts(row_len, c.noise_density, c.mean_noise_span)[1]
        if spans > len(sp.sentinels):
            raise ValueError(f"span corruption needs {spans} sentinel ids, SpecialIds has {len(sp.sentinels)}")

        def row_fn(t, s, p, rng):
            return obj.span_corruption(t, rng, sp, c.seq_len, c.target_len, c.noise_density, c.mean_noise_span)

    stream = PackedStream(tokens, offsets, row_len, seed, shuffle=shuffle)
    return Batcher(stream, row_fn, c.batch_size, seed, salt=_OBJECTIVE_SALT[name])
