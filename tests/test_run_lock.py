"""One writer per run directory: the lock file, its holder, stale locks of dead processes."""

import json
import os
import socket
import subprocess

import pytest

from jaxformer.training.run_lock import LOCK_FILE, RunInUse, RunLock


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _write_holder(run_dir, pid, host=None):
    os.makedirs(run_dir, exist_ok=True)
    holder = dict(pid=pid, host=host or socket.gethostname(), since="then", command="train.py")
    with open(os.path.join(run_dir, LOCK_FILE), "w") as f:
        json.dump(holder, f)


def test_a_second_writer_is_refused_naming_the_holder_until_the_first_releases(tmp_path):
    run_dir = str(tmp_path)
    first = RunLock(run_dir)
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    # flock conflicts between two opens of the file, in this process as in another.
    with pytest.raises(RunInUse, match=rf"process {os.getpid()} on host {socket.gethostname()}"):
        RunLock(run_dir)
    first.release()
    first.release()  # idempotent
    assert os.listdir(run_dir) == []  # the lock file goes with its holder
    second = RunLock(run_dir)
    second.release()


def test_a_fresh_run_that_wrote_nothing_leaves_no_directory(tmp_path):
    lock = RunLock(str(tmp_path / "new"))
    lock.release()
    assert not (tmp_path / "new").exists()


def test_the_lock_of_a_dead_process_is_taken_over_with_a_line(tmp_path):
    run_dir, said = str(tmp_path / "run"), []
    pid = _dead_pid()
    _write_holder(run_dir, pid)
    lock = RunLock(run_dir, log=said.append)
    assert len(said) == 1 and f"process {pid} on host" in said[0]
    assert "no longer running" in said[0]
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_live_holder_is_refused_even_where_flock_is_not_held(tmp_path):
    """A file system whose flock does not reach the holder: the pid check still refuses."""
    run_dir = str(tmp_path / "run")
    holder = subprocess.Popen(["sleep", "30"])
    try:
        _write_holder(run_dir, holder.pid)
        with pytest.raises(RunInUse, match=rf"process {holder.pid} on host .*another run.dir"):
            RunLock(run_dir)
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "run" / LOCK_FILE).exists()  # a refused writer removes nothing


def test_a_lock_of_another_host_not_held_is_taken_over_saying_so(tmp_path):
    run_dir, said = str(tmp_path / "run"), []
    _write_holder(run_dir, 1, host="other-host")
    RunLock(run_dir, log=said.append).release()
    assert len(said) == 1 and "process 1 on host other-host" in said[0]
