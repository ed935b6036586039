"""How a failed checkpoint read is judged and reported: damaged files (fall back to an older step)
versus another model's state (an error), one line per failure instead of orbax's tracebacks, and
the test hook that holds a save open so a test can kill the process in the middle of it."""

from __future__ import annotations

import contextlib
import errno
import gc
import inspect
import json
import logging
import os
import re
import sys
import time
from typing import Optional

import jax
import numpy as np

# Test hook (never set it outside tests): every save is held open this many seconds just before
# orbax commits it, so that a test can kill the process in the middle of an (asynchronous) save.
TEST_SAVE_DELAY_ENV = "JAXFORMER_TEST_SAVE_DELAY"
# Orbax errors that mean "another model", not "damaged files": never a reason to fall back.
MISMATCH = ("tree structures do not match", "is not compatible with the stored shape")
# TensorStore's status line of a failed read: DATA_LOSS: ..., OUT_OF_RANGE: ..., NOT_FOUND: ...
STATUS = re.compile(
    r"^[ \t]*(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|FAILED_PRECONDITION|UNAVAILABLE|"
    r"ABORTED|INTERNAL|UNKNOWN): .*$",
    re.MULTILINE,
)


# A save that fails because the disk is full or read-only is the user's to fix, not a bug.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
# TensorStore's way of saying which system error stopped a write (a ValueError, not an OSError).
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_FAILED_PATH = re.compile(r'Failed (?:writing|to write)[^"]*"([^"]+)"')


class Unreadable(Exception):
    """One checkpoint step cannot be read back (files missing, truncated or never committed)."""


def error_chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def first_line(err: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]


def reason(err: BaseException, limit: int = 300) -> str:
    """One line saying why a read failed: TensorStore's status line (DATA_LOSS: ..., OUT_OF_RANGE:
    ...) from deep in the chain when there is one, else the error's own first line."""
    for e in error_chain(err):
        found = STATUS.search(str(e))
        if found:
            return found.group(0).strip()[:limit]
    e = error_chain(err)[-1]
    return f"{type(e).__name__}: {first_line(e, limit)}"


def disk_error(err: BaseException) -> Optional[OSError]:
    """The full-disk (or read-only file system) OSError behind a failed save, else None: found
    in the chain as an OSError, or in TensorStore's message (RESOURCE_EXHAUSTED ... No space left
    on device [os_error_code='28'])."""
    for e in error_chain(err):
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return e
        text = str(e)
        code = _OS_ERROR_CODE.search(text)
        if code and int(code.group(1)) in DISK_ERRNOS:
            path = _FAILED_PATH.search(text)
            number = int(code.group(1))
            return OSError(number, os.strerror(number), *([path.group(1)] if path else []))
    return None


class _QuietDiskErrors(logging.Filter):
    """Drops orbax's log records (each with a traceback, several per failed background save)
    of a full or read-only disk: the run reports it in one line when it waits for the save."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and disk_error(exc) is not None:
            return False
        code = _OS_ERROR_CODE.search(record.getMessage())
        return not (code and int(code.group(1)) in DISK_ERRNOS)


_quiet_disk_errors = _QuietDiskErrors()


def quiet_disk_errors() -> None:
    """Installs the _QuietDiskErrors filter on absl's logger, which orbax logs through."""
    logger = logging.getLogger("absl")
    if _quiet_disk_errors not in logger.filters:
        logger.addFilter(_quiet_disk_errors)


def looks_damaged(err: BaseException) -> bool:
    """Whether a failed read looks like damaged files (rather than another model's state)."""
    for e in error_chain(err):
        text = str(e)
        if (
            isinstance(e, (OSError, json.JSONDecodeError))
            or STATUS.search(text)
            or "was not found in the checkpoint" in text
            or "Encountered error while reading" in text
        ):
            return True
    return False


@contextlib.contextmanager
def quiet_read_failures():
    """A failed restore leaves orbax's other pending reads to die one traceback each (through
    sys.unraisablehook, sys.excepthook from TensorStore's callback threads, and asyncio's
    'exception was never retrieved'); the caller reports one line instead."""
    hooks = sys.unraisablehook, sys.excepthook
    loggers = [logging.getLogger(name) for name in ("asyncio", "absl")]
    levels = [logger.level for logger in loggers]
    sys.unraisablehook = lambda _unraisable: None
    sys.excepthook = lambda *_exc_info: None
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    except BaseException:
        time.sleep(0.2)  # reads still in flight end (and are silenced) meanwhile
        raise
    finally:
        gc.collect()
        sys.unraisablehook, sys.excepthook = hooks
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def everywhere(ok: bool) -> bool:
    """Whether `ok` holds on every process (all hosts must pick the same checkpoint)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def agreed(values: list[int]) -> list[int]:
    """Process 0's list of (small) ints, on every process: hosts whose views of a shared run
    directory differ (a step not yet visible, or missing from one host's disk) must still walk
    the same steps, or their collectives fall out of step."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    count = int(multihost_utils.broadcast_one_to_all(np.int32(len(values))))
    mine = np.zeros(count, np.int32)
    mine[: min(count, len(values))] = values[:count]
    return [int(v) for v in multihost_utils.broadcast_one_to_all(mine)]


_delay_installed = False


def install_test_save_delay() -> None:
    """The TEST_SAVE_DELAY_ENV hook: sleeps in orbax's commit step (in the background thread of an
    asynchronous save), after the data is written and before the temporary directory is renamed."""
    global _delay_installed
    seconds = float(os.environ.get(TEST_SAVE_DELAY_ENV) or 0)
    if _delay_installed or seconds <= 0:
        return
    from orbax.checkpoint._src.path import atomicity  # private: this is only a test hook

    for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
        original = cls.finalize
        if inspect.iscoroutinefunction(original):

            async def finalize(self, *args, _original=original, **kwargs):
                import asyncio

                await asyncio.sleep(seconds)
                return await _original(self, *args, **kwargs)
        else:

            def finalize(self, *args, _original=original, **kwargs):
                time.sleep(seconds)
                return _original(self, *args, **kwargs)

        cls.finalize = finalize
    _delay_installed = True
