"""`train.profile_steps`: a `jax.profiler` trace of a range of training steps, written under
<run.dir>/profile by process 0 (the hosts of an SPMD run all run the same program)."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax

PROFILE_DIR = "profile"


def trace_dirs(run_dir: str) -> list[str]:
    """The trace folders of a run, oldest first: each holds <host>.xplane.pb (TensorBoard's
    profile plugin, XProf), <host>.trace.json.gz and perfetto_trace.json.gz (ui.perfetto.dev)."""
    found = glob.glob(os.path.join(run_dir, PROFILE_DIR, "plugins", "profile", "*"))
    return sorted(found, key=os.path.getmtime)


class StepProfiler:
    """Traces the steps [first, last] (numbered as logged, from 1) that this session runs: the
    trace starts before the first of them once earlier work has finished, and stops after the
    last once its outputs are ready, so the trace holds exactly that work."""

    def __init__(self, run_dir: str, steps: Sequence[int], say: Callable[[str], None] = print):
        self.run_dir, self.say = run_dir, say
        self.steps = tuple(steps) if steps and jax.process_index() == 0 else ()
        self.first = 0  # the first step traced; 0 while no trace runs
        self.last = 0  # the last step dispatched while tracing

    def before(self, step: int, pending: Any) -> None:
        """Called before update `step` is dispatched; `pending`: the arrays earlier steps make."""
        if self.first or not self.steps or not self.steps[0] <= step <= self.steps[1]:
            return
        jax.block_until_ready(pending)  # earlier steps stay out of the trace
        out = os.path.join(self.run_dir, PROFILE_DIR)
        jax.profiler.start_trace(out, create_perfetto_trace=True)
        self.first = step
        self.say(f"[profile] tracing steps {step}-{self.steps[1]} into {out}")

    def after(self, step: int, outputs: Any) -> None:
        """Called once update `step` is dispatched; `outputs`: its arrays."""
        self.last = step
        if self.first and step >= self.steps[1]:
            self.stop(outputs)

    def stop(self, outputs: Any = None) -> None:
        """Ends a running trace (a run stopped early ends it at its last step), waiting for
        `outputs` first; then says where it went."""
        if not self.first:
            return
        step = self.last
        first, self.first = self.first, 0
        try:
            if outputs is not None:
                jax.block_until_ready(outputs)
        finally:
            jax.profiler.stop_trace()
        where = (trace_dirs(self.run_dir) or [os.path.join(self.run_dir, PROFILE_DIR)])[-1]
        self.say(
            f"[profile] steps {first}-{step} traced: {where} (tensorboard --logdir "
            f"{os.path.join(self.run_dir, PROFILE_DIR)}, or its perfetto_trace.json.gz in "
            "ui.perfetto.dev)"
        )

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()  # an exception: the trace so far, without waiting on failed work
