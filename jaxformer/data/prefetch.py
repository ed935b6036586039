"""Input batches computed ahead of the step that needs them, on background threads (grain)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


def ahead(
    batch_fn: Callable[[int], T], start: int, stop: int, *, threads: int = 2, buffer: int = 4
) -> Iterator[T]:
    """batch_fn(step) for step in [start, stop), in order; `buffer` steps computed ahead.

    `buffer=0` computes each batch when it is asked for (no threads).
    """
    if buffer <= 0 or stop <= start:
        return (batch_fn(step) for step in range(start, stop))
    import grain  # pylint: disable=g-import-not-at-top

    dataset = grain.MapDataset.range(start, stop).map(batch_fn)
    options = grain.ReadOptions(num_threads=max(1, threads), prefetch_buffer_size=buffer)
    return iter(dataset.to_iter_dataset(options))
