"""What the loop reads back from each step, one step late so the device never waits for it:
train metrics (with throughput and MFU) and whether the update was applied."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, Optional

import jax


class NonFiniteStep(ValueError):
    """A step's loss or gradients were NaN/Inf (its update was not applied)."""


@dataclasses.dataclass
class StepLog:
    """Metrics and skipped-update counts of a run; `record` each step, `settle` before a save."""

    write: Callable[[int, dict], None]
    """Writes one step's train metrics (metrics.jsonl, TensorBoard)."""
    learning_rate: Callable[[int], Any]
    say: Callable[[str], None]
    """Prints a line without breaking the progress bar."""
    tokens_per_step: int
    flops_per_step: float
    peak_flops: float
    """Of all devices together; 0 when unknown (no MFU)."""
    nonfinite: str
    """train.nonfinite: 'stop' raises NonFiniteStep, 'skip' goes on."""
    spike_factor: float
    start_step: int
    skipped_steps: int = 0
    spike_steps: int = 0
    last_train: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self._checked = self.start_step  # steps up to here are counted (each step once)
        self._clock, self._clock_step = time.perf_counter(), self.start_step
        self._pending: Optional[tuple[int, dict]] = None  # metrics to write
        self._unchecked: Optional[tuple[int, Any, Any]] = None  # update flags to read

    def record(self, done: int, device_metrics: dict, *, log: bool) -> None:
        """Takes step `done`'s device metrics; reads back the previous step's meanwhile."""
        self.settle_update()
        self._unchecked = (done, device_metrics["nonfinite"], device_metrics.get("spike"))
        self.flush()
        if log:
            counts = dict(skipped_steps=self.skipped_steps)
            if "spike" in device_metrics:
                counts["spike_steps"] = self.spike_steps
            self._pending = (done, dict(device_metrics, **counts))

    def settle_update(self) -> None:
        """Counts (or stops at) the last recorded step's skipped update, if not yet done."""
        if self._unchecked is None:
            return
        step, flag, spike = self._unchecked
        self._unchecked = None
        if step <= self._checked:
            return
        self._checked = step
        if spike is not None and float(jax.device_get(spike)):
            self.spike_steps += 1
            self.say(
                f"[skip] step {step}: loss or gradient norm above train.spike_factor="
                f"{self.spike_factor} x its running mean; update not applied"
            )
        if float(jax.device_get(flag)) == 0.0:
            return
        self.skipped_steps += 1
        if self.nonfinite == "stop":
            raise NonFiniteStep(
                f"loss or gradients were NaN/Inf at step {step}; that update was not applied "
                "and no checkpoint holds it. Lower optimizer.learning_rate, try "
                "train.z_loss=1e-4, or set train.nonfinite=skip to skip such steps"
            )
        self.say(f"[skip] step {step}: loss or gradients not finite; update not applied")

    def flush(self) -> None:
        """Writes the pending train metrics, with the time per step since the last write."""
        if self._pending is None:
            return
        step, device_metrics = self._pending
        self._pending = None
        values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        now = time.perf_counter()
        seconds = max(now - self._clock, 1e-9) / max(step - self._clock_step, 1)
        self._clock, self._clock_step = now, step
        values.update(
            learning_rate=float(self.learning_rate(step - 1)),
            tokens_per_second=self.tokens_per_step / seconds,
            step_seconds=seconds,
        )
        if self.peak_flops:
            values["mfu"] = self.flops_per_step / seconds / self.peak_flops
        self.write(step, values)
        self.last_train = values
