"""Faults injected into real runs: non-finite steps and preemption signals."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from data_fixtures import train_interrupted
from flax import nnx

from jaxformer.training.checkpoint import Checkpointer
from jaxformer.training.config import load_experiment
from jaxformer.training.loop import NONFINITE_EXIT, PREEMPTED_EXIT, Trainer
from jaxformer.training.main import run_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Adam moves every parameter by about the learning rate: 1e30 overflows the next forward pass.
EXPLODING = ["optimizer.learning_rate=1e30", "optimizer.schedule=constant"]


@pytest.fixture
def quiet_overrides(tiny_overrides):
    """The shared tiny run, with a one-token sample so the end of a run stays quick."""
    return tiny_overrides + ["train.sample_tokens=1"]


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _all_finite(run_dir):
    from jaxformer.convert.runs import load_run  # reads the arrays; no data, no compiled step

    for step in Checkpointer(run_dir, create=False).steps:
        model, _ = load_run(run_dir, step)
        params = jax.tree.leaves(nnx.state(model, nnx.Param))
        if not all(np.isfinite(np.asarray(p)).all() for p in params):
            return False
    return True


def test_non_finite_loss_stops_naming_the_step_and_saves_no_nan(quiet_overrides, tmp_path, capsys):
    run_dir = str(tmp_path / "nan")
    status = run_training(
        None,
        quiet_overrides + EXPLODING + ["train.steps=8", "checkpoint.every=1", f"run.dir={run_dir}"],
    )
    err = capsys.readouterr().err
    assert status == NONFINITE_EXIT, err
    assert "NaN/Inf at step" in err and "train.nonfinite=skip" in err
    assert Checkpointer(run_dir, create=False).steps  # it saved good steps before stopping
    assert _all_finite(run_dir)


def test_non_finite_steps_can_be_skipped_and_counted(quiet_overrides, tmp_path):
    run_dir = str(tmp_path / "skip")
    status = run_training(
        None,
        quiet_overrides
        + EXPLODING
        + ["train.steps=5", "checkpoint.every=5", "train.nonfinite=skip", f"run.dir={run_dir}"],
    )
    assert status == 0
    train = [r for r in _metrics(run_dir) if r["split"] == "train"]
    assert train[-1]["skipped_steps"] >= 1 and train[-1]["nonfinite"] == 1.0
    assert _all_finite(run_dir)


def test_z_loss_is_logged(quiet_overrides, tmp_path):
    run_dir = str(tmp_path / "z")
    assert (
        run_training(
            None, quiet_overrides + ["train.steps=2", "train.z_loss=1e-4", f"run.dir={run_dir}"]
        )
        == 0
    )
    train = [r for r in _metrics(run_dir) if r["split"] == "train"]
    assert all(r["z_loss"] > 0 for r in train)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_saves_the_current_step_and_the_rerun_resumes(
    quiet_overrides, tmp_path, signum
):
    run_dir = str(tmp_path / "preempted")
    command = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        *quiet_overrides,
        "train.steps=100000",
        "checkpoint.every=100000",
        f"run.dir={run_dir}",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(_metrics(run_dir)) >= 3:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, err
    saved = Checkpointer(run_dir, create=False).latest_step
    assert saved is not None and saved >= 3
    assert f"saved a checkpoint at step {saved}" in err and "rerun the same command" in err
    # The rerun resumes at the saved step (here told to stop two steps later).
    rerun = subprocess.run(
        command[:-3]
        + [f"train.steps={saved + 2}", "checkpoint.every=100000", f"run.dir={run_dir}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"[resume] from step {saved}" in rerun.stdout


def test_spike_check_skips_only_updates_far_above_the_running_means():
    import optax

    from jaxformer import models
    from jaxformer.training.step import make_train_step, spike_guard

    cfg = models.ModelConfig(
        vocab_size=64, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=16
    )
    model = models.create(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split((model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)))
    rng = np.random.default_rng(0)
    x = rng.integers(3, 64, (4, 9)).astype(np.int32)
    batch = dict(
        inputs=x[:, :-1],
        targets=x[:, 1:],
        loss_weights=np.ones((4, 8), np.float32),
        segment_ids=np.ones((4, 8), np.int32),
        positions=np.tile(np.arange(8, dtype=np.int32), (4, 1)),
    )
    step = make_train_step(graphdef, spike_factor=2.0, spike_window=10, spike_warmup=3)
    params = lambda s: jax.tree.leaves(nnx.state(nnx.merge(graphdef, s)[0], nnx.Param))
    before = [np.asarray(p) for p in params(state)]
    # Means far below this batch's loss, after the warm-up: a spike, so nothing moves.
    low = spike_guard(dict(loss=1e-3, grad_norm=1e3, count=5))
    same, metrics = step(jax.tree.map(jnp_copy, state), batch, low)
    assert float(metrics["spike"]) == 1.0 and float(metrics["nonfinite"]) == 0.0
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, params(same)))
    as_floats = lambda g: {k: float(v) for k, v in g.items()}
    assert as_floats(metrics["guard"]) == as_floats(low)  # a skipped update leaves the means
    # Still warming up (count < 3): applied, and folded into the means.
    warming = spike_guard(dict(loss=1e-3, grad_norm=1e-3, count=1))
    moved, metrics = step(jax.tree.map(jnp_copy, state), batch, warming)
    assert float(metrics["spike"]) == 0.0 and float(metrics["guard"]["count"]) == 2.0
    assert not all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, params(moved)))
    loss = float(metrics["loss"])
    assert float(metrics["guard"]["loss"]) == pytest.approx(1e-3 + (loss - 1e-3) / 2, rel=1e-6)


def jnp_copy(x):
    return x.copy() if hasattr(x, "copy") else x


def test_spike_skipping_is_logged_and_resumes_bit_exactly(quiet_overrides, tmp_path):
    # A factor just above 1 after one averaged update makes skips likely within a few steps.
    knobs = [
        "train.steps=6",
        "checkpoint.every=3",
        "train.spike_factor=1.02",
        "train.spike_warmup=1",
        "train.spike_window=4",
    ]
    straight = str(tmp_path / "straight")
    trainer = Trainer(
        load_experiment(None, quiet_overrides + knobs + [f"run.dir={straight}"]),
        show_progress=False,
        log=lambda _: None,
    )
    result = trainer.run()
    trainer.close()
    rows = [r for r in _metrics(straight) if r["split"] == "train"]
    assert result["spike_steps"] >= 1 and rows[-1]["spike_steps"] == result["spike_steps"]
    assert sum(r["spike"] for r in rows) == result["spike_steps"]

    resumed = str(tmp_path / "resumed")
    cfg = load_experiment(None, quiet_overrides + knobs + [f"run.dir={resumed}"])
    train_interrupted(cfg, until=3)
    strip = lambda r: {
        k: v for k, v in r.items() if k not in ("step_seconds", "tokens_per_second", "mfu")
    }
    assert [strip(r) for r in _metrics(resumed) if r["split"] == "train"] == [
        strip(r) for r in rows
    ]


# ------------------------------------------------------------------ signals in every phase


def test_sigterm_during_the_last_save_waits_for_it_and_exits_75(
    quiet_overrides, tmp_path, monkeypatch, capsys
):
    """The final checkpointer.wait() runs with the loop's handlers installed: a SIGTERM while the
    last save is in flight (sent at the start of that wait) lets it finish, then exits 75."""
    run_dir = str(tmp_path / "run")
    wait, sent = Checkpointer.wait, []

    def sigterm_then_wait(self):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        wait(self)

    monkeypatch.setattr(Checkpointer, "wait", sigterm_then_wait)
    overrides = ["train.steps=2", "checkpoint.every=100", "checkpoint.async_save=true"]
    status = run_training(None, quiet_overrides + overrides + [f"run.dir={run_dir}"])
    err = capsys.readouterr().err
    assert status == PREEMPTED_EXIT, err
    assert "SIGTERM: saved a checkpoint at step 2" in err and "Traceback" not in err
    assert Checkpointer(run_dir, create=False).steps == [2]


def test_a_preemption_sync_point_saves_that_step_and_exits_75(
    quiet_overrides, tmp_path, monkeypatch, capsys
):
    """Where JAX's preemption service announces a scheduler's notice (it may take the SIGTERM
    before our handler), the loop saves at the step the hosts agreed on, like a stop signal."""
    from jaxformer.training import loop
    from jaxformer.training.loop import reached_preemption_sync_point

    assert reached_preemption_sync_point(3) is False  # one process: no preemption service
    monkeypatch.setattr(loop, "reached_preemption_sync_point", lambda step: step == 2)
    run_dir = str(tmp_path / "run")
    overrides = ["train.steps=4", "checkpoint.every=100", f"run.dir={run_dir}"]
    status = run_training(None, quiet_overrides + overrides)
    err = capsys.readouterr().err
    assert status == PREEMPTED_EXIT, err
    assert "a preemption notice: saved a checkpoint at step 2" in err
    assert Checkpointer(run_dir, create=False).steps == [2]


def test_sigterm_while_waiting_for_the_first_batch_stops_the_run(
    quiet_overrides, tmp_path, monkeypatch, capsys
):
    """An input that never delivers (a stuck read, a huge batch) no longer holds off SIGTERM."""
    import threading

    from jaxformer.data import prefetch

    real, stuck = prefetch.ahead, threading.Event()

    def stuck_input(batch_fn, start, stop, **options):
        def never(step):
            stuck.wait(60)
            return batch_fn(step)

        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
        return real(never, start, stop, **options)

    monkeypatch.setattr(prefetch, "ahead", stuck_input)
    run_dir = str(tmp_path / "run")
    try:
        status = run_training(None, quiet_overrides + ["train.steps=2", f"run.dir={run_dir}"])
    finally:
        stuck.set()
    err = capsys.readouterr().err
    assert status == PREEMPTED_EXIT, err
    assert "SIGTERM before the first step of this session: nothing new to save" in err
    assert not os.path.exists(os.path.join(run_dir, "run.lock"))


def test_sigterm_while_preparing_data_is_one_line_and_130(
    quiet_overrides, tmp_path, monkeypatch, capsys
):
    import jaxformer.training.pretraining as pretraining

    def terminated_while_preparing(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler interrupts this

    monkeypatch.setattr(pretraining, "prepare_data", terminated_while_preparing)
    run_dir = str(tmp_path / "run")
    started = time.time()
    assert run_training(None, quiet_overrides + [f"run.dir={run_dir}"]) == 130
    assert time.time() - started < 25
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted (SIGTERM); "), lines
    assert not os.path.exists(run_dir)  # the fresh run wrote nothing: no directory left


def test_sigterm_stops_prepare_with_one_line_and_130(monkeypatch, capsys):
    from jaxformer.data import prepare

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

    monkeypatch.setattr(prepare, "prepare_data", terminated)
    assert prepare.main([]) == 130
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [
        "[prepare] interrupted; finished shards are kept: rerun the same command to resume"
    ]


@pytest.mark.slow
def test_prepare_workers_die_with_their_parent(tmp_path):
    """kill -9 of the process that started a worker (as the prepare pool starts them, with
    exit_with_parent as its first act): the worker ends within seconds."""
    script, ready = tmp_path / "parent.py", tmp_path / "ready"
    script.write_text(
        "import multiprocessing, os, sys, time\n"
        "from jaxformer.data.prepare import exit_with_parent\n"
        "def work(parent, ready):\n"
        "    exit_with_parent(parent, 0.1)\n"
        "    open(ready, 'w').close()\n"
        "    time.sleep(120)\n"
        "if __name__ == '__main__':\n"
        "    context = multiprocessing.get_context('spawn')\n"
        "    child = context.Process(target=work, args=(os.getpid(), sys.argv[1]))\n"
        "    child.start()\n"
        "    print(child.pid, flush=True)\n"
        "    time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, str(script), str(ready)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    worker = int(parent.stdout.readline())
    deadline = time.time() + 120
    while not ready.exists() and time.time() < deadline:  # the worker is watching
        time.sleep(0.1)
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        _reap(worker)
        time.sleep(0.1)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the worker outlived its parent by 10 s")


def _reap(pid):
    """An orphan re-parented to this process (a subreaper, e.g. in containers) stays a zombie
    until waited for."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


# ------------------------------------------------------------------ pods: retention, hangs


def test_keep_every_keeps_durable_steps_beside_the_rolling_ones(tmp_path):
    import jax.numpy as jnp

    checkpointer = Checkpointer(str(tmp_path), keep=2, keep_every=3, async_save=False)
    state = nnx.State({"w": jnp.zeros(4)})
    for step in range(1, 8):
        checkpointer.save(
            step, state, config={}, tokenizer_model=b"", data_state={}, workload="pretraining"
        )
    checkpointer.close()
    assert Checkpointer(str(tmp_path), create=False).steps == [3, 6, 7]
    rolling = Checkpointer(str(tmp_path / "rolling"), keep=2, async_save=False)
    for step in range(1, 5):
        rolling.save(
            step, state, config={}, tokenizer_model=b"", data_state={}, workload="pretraining"
        )
    rolling.close()
    assert Checkpointer(str(tmp_path / "rolling"), create=False).steps == [3, 4]


def test_watchdog_fires_once_naming_what_hung_and_not_while_progress_is_made():
    import threading

    from jaxformer.training.watchdog import Watchdog, thread_stacks

    fired, done = [], threading.Event()
    watchdog = Watchdog(0.2, on_hang=lambda message: (fired.append(message), done.set()))
    for step in range(6):  # progress every 0.1 s: never late
        watchdog.progress(f"step {step}")
        time.sleep(0.1)
    assert not fired
    watchdog.progress("the save of step 6")
    assert done.wait(5)
    time.sleep(0.5)
    watchdog.close()
    assert len(fired) == 1 and fired[0].startswith("[hang] the save of step 6 made no progress")
    assert "exiting with status 76" in fired[0]
    assert "--- thread MainThread" in thread_stacks()


def test_a_hung_save_trips_the_step_timeout(quiet_overrides, tmp_path, monkeypatch):
    """In-process: the hang is reported (and would end the process: see the slow test below)
    with every thread's stack, the hung save among them."""
    from jaxformer.training import watchdog

    hangs = []
    monkeypatch.setattr(
        watchdog, "dump_stacks_and_exit", lambda m: hangs.append((m, watchdog.thread_stacks()))
    )
    save = Checkpointer.save

    def slow_save(self, step, *args, **kwargs):
        if step == 2:  # the first save (step 1) may take 10 x the timeout: it compiles
            time.sleep(5)
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", slow_save)
    overrides = ["train.steps=2", "checkpoint.every=1", "train.step_timeout=3"]
    overrides += [f"run.dir={tmp_path / 'run'}"]
    assert run_training(None, quiet_overrides + overrides) == 0  # the fake hang does not exit
    assert len(hangs) == 1, hangs
    message, stacks = hangs[0]
    assert message.startswith("[hang] the save of step 2 made no progress for 3 s")
    assert "in slow_save" in stacks


@pytest.mark.slow
def test_a_hung_save_exits_76_with_every_stack(quiet_overrides, tmp_path):
    from jaxformer.training.checkpoint_faults import TEST_SAVE_DELAY_ENV

    run_dir = str(tmp_path / "run")
    command = [sys.executable, os.path.join(ROOT, "train.py"), *quiet_overrides]
    command += ["train.steps=2", "checkpoint.every=1", "train.step_timeout=1.5"]
    command += [f"run.dir={run_dir}"]
    env = {**os.environ, TEST_SAVE_DELAY_ENV: "120"}  # every save held open for two minutes
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 76, done.stderr
    # The first save may take 10 x 1.5 s (it compiles); this one is held open far longer.
    assert "\n[hang] the save of step 1 made no progress for 15 s" in done.stderr
    assert "--- thread MainThread:" in done.stderr and "in finalize" in done.stderr
    assert time.time() - started < 120  # it did not wait for the save
