"""Batches drawn from several sources with weights, still a pure function of (seed, step)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxformer.data import objectives as obj
from jaxformer.data.pipeline import Batcher

_ORDER_SALT = 0x313C


def rows_per_source(weights: Sequence[float], batch_size: int) -> list[int]:
    """Each source's fixed share of a batch: largest remainders of batch_size * w / sum(w)."""
    w = np.asarray(weights, np.float64)
    exact = batch_size * w / w.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: batch_size - counts.sum()]:
        counts[i] += 1
    if np.any(counts == 0):
        raise ValueError(
            f"mixture weights {list(weights)} give some source no row of a "
            f"{batch_size}-row batch; raise its weight or the batch size"
        )
    return counts.tolist()


class MixtureBatcher:
    """Every global batch holds `rows_per_source` rows of each source, at seeded positions.

    Source s's rows at step t are its own rows t*c_s .. t*c_s + c_s - 1, so each source is read
    in its own order exactly as if it were trained alone at c_s rows per step, and any row of any
    step is computable without the ones before it (resume, any process count).
    """

    def __init__(self, batchers: Sequence[Batcher], weights: Sequence[float], seed: int):
        sizes = {b.batch_size for b in batchers}
        if len(sizes) != 1:
            raise ValueError("mixture sources must share one batch size")
        self.batchers, self.seed = list(batchers), seed
        self.batch_size = sizes.pop()
        self.counts = rows_per_source(weights, self.batch_size)
        self._first_slot = np.concatenate([[0], np.cumsum(self.counts)])

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> obj.Row:
        """This process's share ([B / process_count, ...] arrays) of the global batch at `step`."""
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(
                f"need 0 <= process_index < process_count, got {process_index}, {process_count}"
            )
        if self.batch_size % process_count:
            raise ValueError(
                f"global batch size {self.batch_size} is not divisible by the process "
                f"count {process_count}"
            )
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        slots = np.random.default_rng([self.seed, int(step), _ORDER_SALT]).permutation(
            self.batch_size
        )
        local = self.batch_size // process_count
        rows = []
        for slot in slots[process_index * local : (process_index + 1) * local]:
            s = int(np.searchsorted(self._first_slot, slot, side="right")) - 1
            k = int(slot - self._first_slot[s])
            rows.append(self.batchers[s].row(step * self.counts[s] + k))
        return {key: np.stack([r[key] for r in rows]) for key in rows[0]}
