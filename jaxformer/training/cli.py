"""How every command line ends: bad input, a full disk or Ctrl-C give one message and a status.

`train.py`, `finetune.py`, `eval.py` and `python -m jaxformer.convert` wrap their library function
in `@command(...)`, so the same mistakes end the same way everywhere:

- a user error (`ConfigError`, `CheckpointError` and other `ValueError`s, `UnicodeDecodeError`,
  `MissingDependency`, the `OSError`s of `USER_ERRNOS`: missing or unwritable paths, a read-only
  file system, a full disk; and `OSError`s that libraries raise with a message but no errno, such
  as transformers' "can't load the configuration") prints `error: <message>` on stderr and
  returns 2;
- Ctrl-C or SIGTERM outside a training loop (which saves and exits 75 itself) prints one line and
  returns 130;
- anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib.util
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, Optional

BAD_INPUT_EXIT = 2
INTERRUPTED_EXIT = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C


# Where a training command stopped outside its loop (e.g. Ctrl-C while preparing data) stands.
RESUME_HINT = (
    "checkpoints already in the run directory are intact; rerun the same command to "
    "resume (or start) the run"
)


def already_complete(trainer: Any, result: dict) -> bool:
    """Whether a training command found its run finished already (and trained no step)."""
    return trainer.start_step >= result["steps"]


class MissingDependency(RuntimeError):
    """An optional package that this command (or option) needs is not installed."""


def require(module: str, extra: str, purpose: str) -> None:
    """Raises MissingDependency, naming the pip extra, unless `module` can be imported."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependency(
            f"{purpose} needs the {module} package: pip install -e "
            f"'.[{extra}]' (or pip install {module})"
        )


# OSErrors that describe the user's paths or machine rather than a bug, with what to do.
USER_ERRNOS = {
    errno.ENOENT: "",
    errno.ENOTDIR: "",
    errno.EISDIR: "",
    errno.EEXIST: "",
    errno.ENOTEMPTY: "",
    errno.ENAMETOOLONG: "",
    errno.EACCES: "check that path's permissions (run directories, --out and data "
    "directories must be writable, checkpoints readable)",
    errno.EPERM: "check that path's permissions (run directories, --out and data "
    "directories must be writable, checkpoints readable)",
    errno.EROFS: "the file system is read-only: choose a run.dir (or --out) on a writable one",
    errno.ENOSPC: "the disk is full: free some space (or use a run.dir on another disk) and rerun "
    "the same command; checkpoints already written are intact",
    errno.EDQUOT: "the disk quota is exhausted: free some space and rerun the same command; "
    "checkpoints already written are intact",
}


def describe(err: BaseException) -> Optional[str]:
    """The one-line message for a user error, or None for anything else (a bug: let it raise)."""
    if isinstance(err, UnicodeDecodeError):  # a ValueError too, but its text names no file
        return (
            f"input is not valid UTF-8 ({err.reason}, byte {err.object[err.start : err.end]!r} "
            f"at offset {err.start}); convert the file or dataset to UTF-8"
        )
    if isinstance(err, (ValueError, MissingDependency)):
        return str(err) or type(err).__name__
    if isinstance(err, OSError) and err.errno is None and str(err):
        return str(err)  # raised by a library with a message for the user (no system error)
    if isinstance(err, OSError) and err.errno in USER_ERRNOS:
        where = " or ".join(
            repr(os.fsdecode(f)) for f in (err.filename, err.filename2) if f is not None
        )
        text = f"{err.strerror or os.strerror(err.errno)}{': ' + where if where else ''}"
        hint = USER_ERRNOS[err.errno]
        return f"{text}; {hint}" if hint else text
    return None


def _close_progress_bars() -> None:
    # A failure inside a loop leaves its tqdm bar open; closed, the message gets a line of its own.
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ()) or ()):
        bar.close()


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a training loop: ends a command as Ctrl-C does (unwinding, status 130)."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While inside (in the main thread), SIGTERM raises Terminated, so `timeout` or a scheduler
    stopping a command during data preparation, compiling or evaluating gets one line and 130
    (the training loop installs its own handlers, which save first)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum, _frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def command(interrupted: str = "") -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorates a command's library function (which returns an exit status) so that user
    errors end as `error: ...` and status 2, Ctrl-C as one line (plus `interrupted`) and 130."""

    def wrap(fn: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(fn)
        def run(*args, **kwargs) -> int:
            try:
                with terminate_as_interrupt():
                    return fn(*args, **kwargs)
            except KeyboardInterrupt as err:
                _close_progress_bars()
                how = "SIGTERM" if isinstance(err, Terminated) else "Ctrl-C"
                print(
                    f"\ninterrupted ({how}){'; ' + interrupted if interrupted else ''}",
                    file=sys.stderr,
                )
                return INTERRUPTED_EXIT
            except Exception as err:  # pylint: disable=broad-except
                message = describe(err)
                if message is None:
                    raise
                _close_progress_bars()
                print(f"error: {message}", file=sys.stderr)
                return BAD_INPUT_EXIT

        return run

    return wrap
