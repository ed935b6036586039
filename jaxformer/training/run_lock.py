"""One writer per run directory: a lock file that training and fine-tuning hold while they write.

`<run_dir>/run.lock` names its holder (pid, host, start time, command) and is locked with
`flock`, which the kernel releases when the holder dies however it dies; the file is removed when
the holder closes the run. A lock file left by a dead process (kill -9, a lost host) is taken
over with a line saying so. Readers (`eval.py`, `finetune.py --from`, `convert to-hf`) never take
it, so they work while a run trains.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Optional

LOCK_FILE = "run.lock"
# Errnos of file systems without flock (some network mounts): the pid check alone decides there.
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunInUse(ValueError):
    """Another live process is writing this run directory."""


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _describe(holder: dict) -> str:
    where = f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    since = f" since {holder['since']}" if holder.get("since") else ""
    command = f" ({holder['command']})" if holder.get("command") else ""
    return f"{where}{since}{command}"


class RunLock:
    """Holds `<run_dir>/run.lock` until `release()`; RunInUse if a live process holds it."""

    def __init__(self, run_dir: str, log: Callable[[str], None] = print):
        self.run_dir = os.path.abspath(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_FILE)
        self._made_dir = not os.path.isdir(self.run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        self._fd: Optional[int] = None
        try:
            self._fd = self._take(log)
        except BaseException:
            self._remove_dir_if_made()
            raise

    def _take(self, log: Callable[[str], None]) -> int:
        for _ in range(20):  # the holder may remove the file between our open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                flocked = self._flock(fd)
                same = (
                    os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino
                )
                if not same:
                    os.close(fd)
                    continue
                self._check_holder(fd, flocked, log)
                record = dict(
                    pid=os.getpid(),
                    host=socket.gethostname(),
                    since=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    command=" ".join(sys.argv)[:200],
                )
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(record).encode(), 0)
                return fd
            except BaseException:
                os.close(fd)
                raise
        raise RunInUse(f"{self.run_dir}: could not take {self.path}; another process keeps it busy")

    def _flock(self, fd: int) -> bool:
        """Locks fd; False where the file system has no flock. RunInUse if it is held."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInUse(self._in_use(_read(fd))) from None
        except OSError as err:
            if err.errno not in _NO_FLOCK:
                raise
            return False
        return True

    def _check_holder(self, fd: int, flocked: bool, log: Callable[[str], None]) -> None:
        holder = _read(fd)
        if not holder:
            return
        pid, host = holder.get("pid"), holder.get("host")
        here = host == socket.gethostname() and isinstance(pid, int)
        if here and process_alive(pid) and (pid != os.getpid() or not flocked):
            # flock was free yet the holder lives: a file system whose locks do not hold.
            raise RunInUse(self._in_use(holder))
        if here and pid == os.getpid():
            return  # this process's own lock, left by an object that was never closed
        if here:
            why = "which is no longer running"
        else:
            why = "whose lock is not held (that process ended, or this file system does not share locks between hosts)"
        log(f"[run] took over {self.path} from {_describe(holder)}, {why}")

    def _in_use(self, holder: dict) -> str:
        who = _describe(holder) if holder else "another process"
        return (
            f"{self.run_dir} is being written by {who}; one process writes a run at a time: "
            "wait for it to end (or stop it), or use another run.dir. Reading the run "
            "(eval.py, finetune.py --from, convert to-hf) works meanwhile"
        )

    def release(self) -> None:
        """Removes the lock file and unlocks (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.remove(self.path)  # while still locked, so nobody takes the file being removed
        except FileNotFoundError:
            pass
        os.close(fd)
        self._remove_dir_if_made()

    def _remove_dir_if_made(self) -> None:
        # A fresh run that stopped before writing anything leaves no directory behind.
        if self._made_dir:
            try:
                os.rmdir(self.run_dir)
            except OSError:
                pass  # not empty: the run wrote something


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
