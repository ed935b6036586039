"""A hang watchdog: when a step or a save makes no progress for `train.step_timeout` seconds, it
prints every thread's Python stack and ends the process with HUNG_EXIT, so that a scheduler
restarts the job (which resumes from its last checkpoint) instead of paying for a stuck one."""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Optional

HUNG_EXIT = 76  # distinct from 75 (preempted, saved) and from timeout(1)'s 124


def thread_stacks() -> str:
    """The Python stack of every thread of this process, innermost call last."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():  # pylint: disable=protected-access
        parts.append(f"--- thread {names.get(ident, ident)}:\n")
        parts.extend(traceback.format_stack(frame))
    return "".join(parts)


def dump_stacks_and_exit(message: str) -> None:
    """What a hang does by default: the message, every stack, then os._exit(HUNG_EXIT) (a hung
    process cannot be trusted to unwind)."""
    sys.stderr.write(f"\n{message}\n{thread_stacks()}")  # own line, after any progress bar
    sys.stderr.flush()
    os._exit(HUNG_EXIT)


class Watchdog:
    """Calls `on_hang(message)` once when `progress()` was not called for its allowance."""

    def __init__(self, timeout: float, on_hang: Optional[Callable[[str], None]] = None):
        self.timeout = timeout
        self._on_hang = on_hang or dump_stacks_and_exit
        self._lock = threading.Lock()
        self._deadline: Optional[float] = None
        self._what, self._allowed = "", 0.0
        self._stop = threading.Event()
        if timeout > 0:
            threading.Thread(target=self._watch, name="step-watchdog", daemon=True).start()

    def progress(self, what: str, allow: Optional[float] = None) -> None:
        """Resets the clock: `what` (e.g. 'step 12') must be done within `allow` seconds
        (default: the timeout)."""
        allowed = self.timeout if allow is None else allow
        with self._lock:
            self._what, self._allowed = what, allowed
            self._deadline = time.monotonic() + allowed

    def close(self) -> None:
        """Stops watching."""
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
                what, allowed = self._what, self._allowed
            if late:
                self._on_hang(
                    f"[hang] {what} made no progress for {allowed:.0f} s "
                    f"(train.step_timeout={self.timeout:g}); exiting with status {HUNG_EXIT} so "
                    "the job can be restarted: rerunning the same command resumes from the last "
                    "checkpoint. The Python stack of every thread follows."
                )
                return
