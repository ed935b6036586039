"""Kill -9 and damaged checkpoints: rerunning the same `train.py` command ends with the losses and
parameters of a run that was never interrupted, bit for bit."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from data_fixtures import TINY_RUN
from flax import nnx

from jaxformer import sharding as shard_lib
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training.checkpoint import Checkpointer, CheckpointError
from jaxformer.training.checkpoint_faults import TEST_SAVE_DELAY_ENV

# Subprocess runs of train.py (about 2 min in all): CI runs them once, on its Python 3.11 leg.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 6, 2  # checkpoints at steps 2, 4 and 6
TIMING = ("tokens_per_second", "step_seconds", "mfu")  # wall-clock figures: never reproducible


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One CPU device; compiled programs cached on disk, so that only the first run compiles."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


@pytest.fixture(scope="module")
def command(stdlib_data_dir, stdlib_tokenizer, tmp_path_factory):
    """The one train.py command of every run here, but for run.dir."""
    tokenizer_path = str(tmp_path_factory.mktemp("tokenizer") / "shared.model")
    stdlib_tokenizer.save(tokenizer_path)
    return [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        *TINY_RUN,
        f"data.data_dir={stdlib_data_dir}",
        f"data.tokenizer_path={tokenizer_path}",
        f"data.vocab_size={stdlib_tokenizer.vocab_size}",
        "train.sample_prompt=''",
        f"train.steps={STEPS}",
        f"checkpoint.every={EVERY}",
    ]


def _train(command, env, run_dir, *extra):
    done = subprocess.run(
        command + list(extra) + [f"run.dir={run_dir}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _rows(run_dir):
    """{(split, step): record without timing}; a step logged again by a rerun counts as rerun."""
    rows = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            rows[record["split"], record["step"]] = {
                k: v for k, v in record.items() if k not in TIMING
            }
    return rows


def _params(run_dir, step=STEPS):
    """Every stored array (parameters, optimizer state, RNG) of a checkpoint, as bytes."""
    ckpt = Checkpointer(run_dir, create=False)
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    ckpt.close()
    flat = jax.tree_util.tree_flatten_with_path(restored["state"])[0]
    return {
        jax.tree_util.keystr(k): (np.asarray(v).dtype, np.asarray(v).tobytes()) for k, v in flat
    }


@pytest.fixture(scope="module")
def reference(command, env, tmp_path_factory):
    """A run that was never interrupted: its directory, metrics and final arrays."""
    run_dir = str(tmp_path_factory.mktemp("reference") / "run")
    _train(command, env, run_dir)
    return dict(dir=run_dir, rows=_rows(run_dir), params=_params(run_dir))


def _assert_as_uninterrupted(run_dir, reference):
    rows = _rows(run_dir)
    assert rows.keys() == reference["rows"].keys()
    for key, row in reference["rows"].items():
        assert rows[key] == row, key  # exact float equality: bit-identical losses
    assert Checkpointer(run_dir, create=False).steps == [2, 4, 6]
    params = _params(run_dir)
    assert params.keys() == reference["params"].keys()
    assert all(params[k] == v for k, v in reference["params"].items())


def _wait_for(proc, condition, what, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()}"
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _committed(run_dir):
    ckpt = os.path.join(run_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(ckpt) if n.isdigit()) if os.path.isdir(ckpt) else []


def test_kill_during_an_async_save_then_rerun_is_bit_identical(command, env, reference, tmp_path):
    run_dir = str(tmp_path / "run")
    tmp_4 = os.path.join(run_dir, "checkpoints", "4" + ckpt_lib.TMP_MARK)
    # The test hook holds each save open for 2 s before orbax commits it (renames its temporary
    # directory), while training goes on: the kill lands inside the background save of step 4.
    proc = subprocess.Popen(
        command + ["checkpoint.async_save=true", f"run.dir={run_dir}"],
        env={**env, TEST_SAVE_DELAY_ENV: "2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(
        proc,
        lambda: os.path.isdir(tmp_4) and _committed(run_dir) == [2],
        "the async save of step 4 to start",
    )
    _kill(proc)
    assert os.path.isdir(tmp_4) and _committed(run_dir) == [2]
    rerun = _train(command, env, run_dir, "checkpoint.async_save=true")
    assert "the save of step 4 was interrupted before it committed" in rerun.stderr
    assert "[resume] from step 2" in rerun.stdout
    assert not os.path.exists(tmp_4)
    _assert_as_uninterrupted(run_dir, reference)


def test_kill_between_checkpoints_then_rerun_is_bit_identical(command, env, reference, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = subprocess.Popen(
        command + [f"run.dir={run_dir}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = os.path.join(run_dir, "metrics.jsonl")

    def past_step_3():  # step 2 is checkpointed; the step the kill lands in varies (3 to 6)
        return os.path.exists(metrics) and any(
            json.loads(line)["step"] >= 3 for line in open(metrics) if line.endswith("\n")
        )

    _wait_for(proc, past_step_3, "step 3")
    _kill(proc)
    saved = _committed(run_dir)
    assert saved and saved[-1] < STEPS
    rerun = _train(command, env, run_dir)
    assert f"[resume] from step {saved[-1]}" in rerun.stdout
    _assert_as_uninterrupted(run_dir, reference)


def _truncate(path, keep=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


def _largest_array_file(step_dir):
    files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*"))
    return max(files, key=os.path.getsize)


DAMAGE = {  # how step 4 is damaged -> what the one-line report says about it
    "truncated_metadata_json": (
        lambda d: _truncate(os.path.join(d, "meta", "metadata")),
        "its metadata does not read (JSONDecodeError",
    ),
    "truncated_array_file": (
        lambda d: _truncate(_largest_array_file(d), 0.9),
        "its arrays do not read (OUT_OF_RANGE",
    ),
    "missing_array_files": (
        lambda d: [
            os.remove(f) for f in glob.glob(os.path.join(d, "state", "ocdbt.process_*", "d", "*"))
        ],
        "its arrays do not read (",
    ),
    "no_commit_marker": (
        lambda d: os.remove(os.path.join(d, ckpt_lib.COMMIT_FILE)),
        "its commit marker commit_success.txt is missing",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_and_the_run_ends_bit_identical(
    command, env, reference, tmp_path, damage
):
    # The reference run as it stood after saving step 4 (step 6 not yet saved), then step 4 hurt.
    run_dir = str(tmp_path / "run")
    shutil.copytree(reference["dir"], run_dir)
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "6"))
    hurt, says = DAMAGE[damage]
    hurt(os.path.join(run_dir, "checkpoints", "4"))
    rerun = _train(command, env, run_dir)
    report = [
        line
        for line in rerun.stderr.splitlines()
        if line.startswith("[checkpoint]") and "step 4" in line
    ]
    assert report and says in report[0], rerun.stderr[-3000:]
    assert "moved" in report[-1] and "resuming from step 2" in report[-1]
    assert "Traceback" not in rerun.stderr and "Exception ignored" not in rerun.stderr
    assert "[resume] from step 2" in rerun.stdout
    aside = glob.glob(os.path.join(run_dir, "checkpoints", ckpt_lib.CORRUPT_DIR, "4.*"))
    assert len(aside) == 1  # moved, not deleted, and out of orbax's sight
    _assert_as_uninterrupted(run_dir, reference)


def test_no_readable_checkpoint_is_an_error_that_moves_nothing(reference, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(
        os.path.join(reference["dir"], "checkpoints"), os.path.join(run_dir, "checkpoints")
    )
    step_dir = os.path.join(run_dir, "checkpoints", "{}").format
    shutil.rmtree(os.path.join(step_dir(6), "state"))
    _truncate(os.path.join(step_dir(4), "meta", "metadata"))
    os.remove(os.path.join(step_dir(2), ckpt_lib.COMMIT_FILE))
    before = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    with pytest.raises(
        CheckpointError,
        match=r"no readable checkpoint in .*: step 6: its state/ "
        r"directory is missing; step 4: its metadata does not read \(JSONDecodeError"
        r".*; step 2: its commit marker commit_success.txt is missing.*Nothing was "
        r"moved",
    ):
        Checkpointer(run_dir, create=False).read_meta()
    # A step asked for by number does not fall back.
    with pytest.raises(CheckpointError, match="the checkpoint at step 4 in .* is unreadable"):
        Checkpointer(run_dir, create=False).read_meta(4)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == before


def test_another_state_is_not_mistaken_for_damage(tmp_path):
    """A restore that fails because the state differs (here the optimizer) must not set aside
    good checkpoints: it is the same clear error as before."""
    mesh = shard_lib.make_mesh(shard_lib.MeshConfig(shape=(1, 1, 1)), jax.devices()[:1])
    rules = shard_lib.DEFAULT_RULES

    def state(tx):
        model = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
        return nnx.state((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))

    adam = state(optax.adamw(1e-3))
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    for step in (1, 2):
        ckpt.save(
            step, adam, config={}, tokenizer_model=b"tok", data_state={}, workload="pretraining"
        )
    ckpt.close()
    with pytest.raises(CheckpointError, match="at step 2 does not match this model"):
        Checkpointer(str(tmp_path)).restore_newest(state(optax.sgd(1e-3)), mesh, rules)
    assert Checkpointer(str(tmp_path), create=False).steps == [1, 2]
    _, meta = Checkpointer(str(tmp_path)).restore_newest(adam, mesh, rules)
    assert meta["step"] == 2
