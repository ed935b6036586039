"""Stateless packed batches: a batch is a pure function of (seed, step), sharded contiguously over processes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import numpy as np

from jaxformer.data import objectives as obj
from jaxformer.data.config import DataConfig
from jaxformer.data.objectives import SpecialIds
from jaxformer.data.token_store import TokenSource

OBJECTIVES = ("causal_lm", "masked_lm", "span_corruption")
_PERMUTATION_SALT = 0x5EED
_OBJECTIVE_SALT = {"causal_lm": 1, "masked_lm": 2, "span_corruption": 3}

RowFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.random.Generator], obj.Row]


class PackedStream:
    """The token stream cut into rows of row_len tokens, rows visited in a seeded order per epoch.

    Rows are contiguous windows of the stored stream, so reading one touches one or two shards and
    nothing is held per document: memory does not grow with the corpus. When shuffling, each epoch
    shifts the cut points by a seeded offset (so rows differ between epochs) and visits the rows in
    a seeded permuted order (so one batch draws from all over the corpus). A document crossing a
    row boundary is split; its continuation starts a new segment (positions restart at 0).
    """

    def __init__(self, source: TokenSource, row_len: int, seed: int, shuffle: bool = True):
        if row_len < 1:
            raise ValueError(f"row length must be positive, got {row_len}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if source.num_tokens < row_len:
            raise ValueError(
                f"corpus too small: {source.num_tokens} tokens cannot fill one row of {row_len} tokens"
            )
        self.source, self.row_len, self.seed, self.shuffle = (
            source,
            int(row_len),
            int(seed),
            shuffle,
        )
        full_rows = source.num_tokens // self.row_len
        # Shuffling keeps one row's worth of slack so the per-epoch shift can move every cut.
        self._rows = full_rows - 1 if shuffle and full_rows > 1 else full_rows

    @property
    def rows_per_epoch(self) -> int:
        """Full rows per pass over the corpus."""
        return self._rows

    def _epoch_layout(self, epoch: int) -> tuple[int, int, int]:
        """(shift, a, b): row r of the epoch starts at shift + ((a*r + b) mod n) * row_len."""
        n = self.rows_per_epoch
        if not self.shuffle:
            return 0, 1, 0
        rng = np.random.default_rng([self.seed, epoch, _PERMUTATION_SALT])
        slack = self.source.num_tokens - n * self.row_len
        shift = int(rng.integers(0, slack + 1))
        if n == 1:
            return shift, 1, 0
        a = int(rng.integers(1, n))
        while math.gcd(a, n) != 1:  # an affine map is a bijection when a is coprime to n
            a = a % (n - 1) + 1
        return shift, a, int(rng.integers(0, n))

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens [L], segment_ids [L] (1, 2, ... per document piece), positions [L]) of global row `index`."""
        if index < 0:
            raise ValueError(f"row index must be non-negative, got {index}")
        epoch, r = divmod(int(index), self.rows_per_epoch)
        shift, a, b = self._epoch_layout(epoch)
        start = shift + ((a * r + b) % self.rows_per_epoch) * self.row_len
        end = start + self.row_len
        tokens_L = self.source.tokens(start, end)
        cuts = np.unique(self.source.doc_starts(start, end)) - start  # in (0, L)
        piece_of = np.zeros(self.row_len, np.int32)
        if len(cuts):
            piece_of[cuts] = 1
            piece_of = np.cumsum(piece_of, dtype=np.int32)
        piece_starts = np.concatenate([[0], cuts]).astype(np.int32)
        positions_L = np.arange(self.row_len, dtype=np.int32) - piece_starts[piece_of]
        return tokens_L, piece_of + 1, positions_L


class Batcher:
    """batch(step) -> dict of arrays: global rows step*B .. step*B+B-1, this process's contiguous slice."""

    def __init__(
        self, stream: PackedStream, row_fn: RowFn, batch_size: int, seed: int, salt: int = 0
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.stream, self.row_fn, self.batch_size, self.seed, self.salt = (
            stream,
            row_fn,
            batch_size,
            seed,
            salt,
        )

    def row(self, index: int) -> obj.Row:
        """The objective applied to global row `index`; its randomness is seeded by (seed, index) only."""
        rng = np.random.default_rng([self.seed, int(index), self.salt])
        return self.row_fn(*self.stream.row(index), rng)

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> obj.Row:
        """This process's share ([B / process_count, ...] arrays) of the global batch at `step`."""
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(
                f"need 0 <= process_index < process_count, got {process_index}, {process_count}"
            )
        if self.batch_size % process_count:
            raise ValueError(
                f"global batch size {self.batch_size} is not divisible by the process count {process_count}"
            )
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        local = self.batch_size // process_count
        first = step * self.batch_size + process_index * local
        rows = [self.row(i) for i in range(first, first + local)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def make_batcher(
    data_config: DataConfig,
    source: TokenSource,
    special_ids: SpecialIds,
    seed: int,
    objective: Optional[str] = None,
    shuffle: bool = True,
    source_index: int = 0,
    batch_size: Optional[int] = None,
) -> Batcher:
    """Batcher for `objective` (default: data_config.objective) with the shapes of data_config.

    `source_index` (a mixture's source number) gives each source its own objective randomness.
    """
    name = data_config.objective if objective is None else objective
    if name == "auto":
        raise ValueError(
            "objective 'auto' must be resolved from the model family before building a batcher"
        )
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
        row_len = obj.span_corruption_raw_length(
            c.seq_len, c.target_len, c.noise_density, c.mean_noise_span
        )
        spans = obj.noise_counts(row_len, c.noise_density, c.mean_noise_span)[1]
        if spans > len(sp.sentinels):
            raise ValueError(
                f"span corruption needs {spans} sentinel ids, SpecialIds has {len(sp.sentinels)}"
            )

        def row_fn(t, s, p, rng):
            return obj.span_corruption(
                t, rng, sp, c.seq_len, c.target_len, c.noise_density, c.mean_noise_span
            )

    stream = PackedStream(source, row_len, seed, shuffle=shuffle)
    return Batcher(
        stream,
        row_fn,
        batch_size or c.batch_size,
        seed,
        salt=_OBJECTIVE_SALT[name] + 16 * source_index,
    )
