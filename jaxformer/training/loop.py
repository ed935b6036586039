"""The training loop: sharded state, jitted steps, metrics, validation and checkpoints, for any
workload (pretraining or fine-tuning)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, Optional

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxformer import models
from jaxformer import sharding as shard_lib
from jaxformer.config import config_to_dict, save_config
from jaxformer.data import prefetch
from jaxformer.models import flops as flops_lib
from jaxformer.training import metrics as metrics_lib
from jaxformer.training.checkpoint import Checkpointer, CheckpointError, checkpoint_dir
from jaxformer.training.config import TrainerSections, check_resume, model_changes
from jaxformer.training.optimizer import make_schedule
from jaxformer.training.profile import StepProfiler
from jaxformer.training.run_lock import RunInUse, RunLock
from jaxformer.training.state import (
    build_eval_step,
    build_state,
    build_train_step,
    check_batch_size,
)
from jaxformer.training.step import spike_guard
from jaxformer.training.step_log import NonFiniteStep, StepLog
from jaxformer.training.watchdog import Watchdog
from jaxformer.training.workload import Evaluator, RunEnv, Workload, workload_for_config

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: the run saved its state; rerunning the command resumes it


class Preempted(Exception):
    """SIGTERM/SIGINT arrived; the state after `step` is saved and durable (`saved`), or the run
    stopped before training a step of its own, so its latest checkpoint stands."""

    def __init__(self, step: int, signal_name: str, saved: bool = True):
        if saved:
            text = f"{signal_name}: saved a checkpoint at step {step}"
        else:
            text = (
                f"{signal_name} before the first step of this session: nothing new to save "
                f"(the run stands at step {step})"
            )
        super().__init__(f"{text}; rerun the same command to resume from it")
        self.step = step


PREEMPTION_NOTICE = "a preemption notice"
"""How a stop announced by the runtime's preemption service (not a signal of ours) is named."""


def reached_preemption_sync_point(step: int) -> bool:
    """Whether the hosts reached the step JAX's preemption service chose to save at (after a
    scheduler's notice, which that service may take before our SIGTERM handler sees it); False
    where the runtime offers no such service (one process, no coordination client)."""
    from jax.experimental import multihost_utils

    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # the preemption sync manager is not enabled
        return False


class _StopWaiting(Exception):
    """A stop signal arrived while the loop waited for a batch (see _Stops)."""


NONFINITE_EXIT = 3


def run_to_exit_status(trainer: Trainer) -> tuple[int, Optional[dict]]:
    """Runs the trainer; (0, result), or the exit status of a preemption or a non-finite stop
    (the message printed, the state saved or left at the last good checkpoint) and None."""
    import sys

    try:
        return 0, trainer.run()
    except Preempted as stop:
        print(f"\n[preempted] {stop}", file=sys.stderr)
        return PREEMPTED_EXIT, None
    except NonFiniteStep as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return NONFINITE_EXIT, None
    finally:
        trainer.close()


class _Stops(list):
    """Names of the stop signals received; while `waiting` (for a batch that may never come) a
    signal also interrupts the wait by raising _StopWaiting."""

    waiting = False

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """While inside, a stop signal (one already received, too) raises _StopWaiting."""
        if self:
            raise _StopWaiting
        self.waiting = True
        try:
            yield
        finally:
            self.waiting = False


@contextlib.contextmanager
def _stop_signals(flag: _Stops) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT only record themselves in `flag` (the loop checks it),
    or interrupt a wait for a batch."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def record(signum, _frame):
        flag.append(signal.Signals(signum).name)
        if flag.waiting:
            flag.waiting = False
            raise _StopWaiting

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, record)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Trainer:
    """One run: mesh, sharded state, jitted steps, the loop, checkpoints and metrics, for any
    workload (the one of the config's type by default: pretraining for an ExperimentConfig);
    `run()` trains from the latest checkpoint (or scratch) to the end."""

    def __init__(
        self,
        cfg: TrainerSections,
        workload: Optional[Workload] = None,
        *,
        show_progress: bool = True,
        log: Callable[[str], None] = print,
        read_only: bool = False,
        step: Optional[int] = None,
    ):
        """Builds everything; `read_only` (evaluation) writes nothing and needs a checkpoint."""
        self.workload = workload if workload is not None else workload_for_config(cfg)
        if not getattr(self.workload, "name", ""):
            raise TypeError(
                f"{type(self.workload).__name__} needs a class attribute `name` (recorded in its "
                "checkpoints; `workload.register` it so its runs open again)"
            )
        self.log, self.show_progress, self.read_only = log, show_progress, read_only
        if not read_only:  # a missing optional package, before any work
            metrics_lib.require_wandb(cfg.run.wandb_project)
        self._set_up_mesh(cfg)
        self.run_dir = os.path.abspath(cfg.run.dir)
        self._lock: Optional[RunLock] = None
        if not read_only:  # one writer per run: taken before anything is read or written
            self._lock_run_dir()
        try:
            self._build(cfg, step)
        except BaseException:
            self._release_lock()
            raise

    def _build(self, cfg: TrainerSections, step: Optional[int]) -> None:
        """Reads the checkpoint, prepares the data, builds (or restores) the state and steps."""
        meta = self._read_own_checkpoint(cfg, step)
        self.env = RunEnv(self.run_dir, self.mesh, self.rules, self.log, self.show_progress)
        self.cfg = cfg = self.workload.prepare(cfg, meta, self.env)
        self.tokenizer = self.workload.tokenizer
        if meta is not None:
            _check_same_model(meta, cfg.model, self.run_dir)
        self.schedule = make_schedule(cfg.optimizer, cfg.train.steps)
        self.trainable = self.workload.trainable(cfg)
        tx = self.workload.optimizer(cfg)
        self._open_run_dir()  # only now, with the input checked, may anything be written
        self.log(
            f"[model] {cfg.model.family} {cfg.model.preset or ''} on mesh {dict(self.mesh.shape)}"
        )
        self.graphdef, self.state = build_state(
            cfg.model,
            tx,
            self.mesh,
            self.rules,
            cfg.train.seed,
            self.trainable,
            adapt=lambda model: self.workload.adapt_model(model, cfg),
        )
        # What checkpoints hold of the model (None: all of it); the rest is the workload's to
        # rebuild on every start, resumed and read-only ones too (e.g. a LoRA run's frozen base).
        self.saved_filter = self.workload.saved_state(cfg)
        # A resumed run's own checkpoint replaces the whole state otherwise.
        if meta is None or self.saved_filter is not None:
            model, optimizer = nnx.merge(self.graphdef, self.state)
            self.workload.initialize(model, cfg, self.env)
            self.graphdef, self.state = nnx.split((model, optimizer))
        self.num_params = models.count_params(nnx.merge(self.graphdef, self.state)[0])
        meta = self._restore(meta, step)
        self.start_step = 0 if meta is None else int(meta["step"])
        self._build_steps((meta or {}).get("data", {}))
        self.is_lead = jax.process_index() == 0
        run = cfg.run
        self.writer = metrics_lib.MetricsWriter(
            self.run_dir,
            enabled=self.is_lead and not self.read_only,
            log=self.log,
            wandb=metrics_lib.WandbSettings(
                run.wandb_project,
                run.wandb_name,
                run.wandb_entity,
                run.wandb_mode,
                config=config_to_dict(cfg),
            ),
        )

    # ------------------------------------------------------------------ building

    def _set_up_mesh(self, cfg: TrainerSections) -> None:
        shard_lib.maybe_initialize_distributed(cfg.mesh)
        self.mesh = shard_lib.make_mesh(cfg.mesh)
        self.rules = cfg.mesh.rules
        self.batch_size = self.workload.batch_size(cfg)
        check_batch_size(self.batch_size, cfg.optimizer.grad_accum_steps, self.mesh, self.rules)

    def _lock_run_dir(self) -> None:
        """Takes the run directory's lock (process 0 for all hosts); RunInUse everywhere when
        another live process writes the run."""
        refused: Optional[RunInUse] = None
        if jax.process_index() == 0:
            try:
                self._lock = RunLock(self.run_dir, log=self.log)
            except RunInUse as err:
                refused = err
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            anyone = multihost_utils.broadcast_one_to_all(np.int32(refused is not None))
            if bool(anyone) and refused is None:
                refused = RunInUse(
                    f"{self.run_dir} is being written by another run (process 0 found its "
                    "lock held); wait for it to end, or use another run.dir"
                )
        if refused is not None:
            raise refused

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def _read_own_checkpoint(self, cfg: TrainerSections, step: Optional[int]) -> Optional[dict]:
        """The run directory's checkpoint metadata (None for a fresh run), checked against `cfg`
        before any work: the same run resumed, or a new run.dir."""
        if not (self.read_only or _all_see_directory(checkpoint_dir(self.run_dir))):
            return None
        existing = Checkpointer(self.run_dir, create=False)
        if not self.read_only and not existing.agreed_steps():  # every host decides alike
            return None
        meta = existing.read_meta(step)
        if meta["workload"] != self.workload.name:
            raise CheckpointError(
                f"{self.run_dir} holds a {meta['workload']} run; this is a "
                f"{self.workload.name} run: use another run.dir"
            )
        # A converted model (weights only, never trained here) is a starting point, not a run
        # to continue as it was: any data, optimizer or training settings may go with it.
        if not self.read_only and not meta.get("params_only"):
            changed = check_resume(cfg, meta["config"], int(meta["step"]), self.run_dir)
            if changed:
                self.log(changed)
        return meta

    def _open_run_dir(self) -> None:
        self.checkpointer = Checkpointer(
            self.run_dir,
            keep=self.cfg.checkpoint.keep,
            async_save=self.cfg.checkpoint.async_save,
            create=not self.read_only,
            keep_every=self.cfg.checkpoint.keep_every,
        )
        if not self.read_only and jax.process_index() == 0:
            save_config(self.cfg, os.path.join(self.run_dir, "config.yaml"))

    def _restore(self, meta: Optional[dict], step: Optional[int]) -> Optional[dict]:
        """Replaces the fresh state by the checkpoint's; returns the metadata of the step read."""
        if meta is None:
            return None
        if meta.get("params_only"):  # a converted model: its weights, a fresh optimizer
            # A reader of its own: a partial restore registers orbax's PyTree handler for the
            # state item, which the run's own manager must not keep (its saves are Standard).
            reader = Checkpointer(self.run_dir, create=False)
            try:
                model_only = reader.restore_state(
                    nnx.State({0: self.state[0]}),
                    self.mesh,
                    self.rules,
                    int(meta["step"]),
                    partial=True,
                )
            finally:
                reader.close()
            self.state[0] = model_only[0]
        elif step is not None:
            restored = self.checkpointer.restore_state(
                self._saved(self.state), self.mesh, self.rules, int(meta["step"])
            )
            self.state = self._with_saved(restored)
        else:  # the newest step that reads; damaged newer ones are set aside
            restored, meta = self.checkpointer.restore_newest(
                self._saved(self.state), self.mesh, self.rules, set_aside=not self.read_only
            )
            self.state = self._with_saved(restored)
        self.log(f"[resume] from step {int(meta['step'])} of {self.run_dir}")
        return meta

    def _build_steps(self, stored: dict) -> None:
        """The jitted train and eval steps, and what the train step carries across a resume."""
        train = self.cfg.train
        self.train_step = build_train_step(
            self.graphdef,
            shard_lib.state_shardings(self.state, self.mesh, self.rules),
            train,
            self.cfg.optimizer,
            self.mesh,
            self.rules,
            self.trainable,
        )
        # Running means for spike skipping travel with the checkpoint, so a resumed run skips
        # exactly the updates the uninterrupted one would.
        self.spike_guard = spike_guard(stored.get("spike_guard")) if train.spike_factor else None
        # Skipped-update counts continue across a resume, as the logged metrics would.
        self.skipped_steps = int(stored.get("skipped_steps", 0))
        self.spike_steps = int(stored.get("spike_steps", 0))
        self.eval_step = build_eval_step(self.graphdef, train, self.mesh, self.rules)

    # ------------------------------------------------------------------ pieces

    def evaluate(
        self, num_batches: Optional[int] = None, model: Optional[nnx.Module] = None
    ) -> dict[str, float]:
        """The workload's validation metrics of the trained state, or of another `model` of the
        same task (e.g. its int8 copy) on the same batches."""
        if model is None:
            evaluator = Evaluator(self.env, self.eval_step, self.state, self.graphdef)
        else:
            graphdef, state = nnx.split((model, None))
            step = build_eval_step(graphdef, self.cfg.train, self.mesh, self.rules)
            evaluator = Evaluator(self.env, step, state, graphdef)
        return self.workload.evaluate(evaluator, self.cfg, num_batches)

    def model(self) -> nnx.Module:
        """The trained model (evaluation mode), sharing the state's arrays."""
        return Evaluator(self.env, self.eval_step, self.state, self.graphdef).model()

    def _saved(self, state: nnx.State) -> nnx.State:
        """The part of the (model, optimizer) state that checkpoints hold."""
        if self.saved_filter is None:
            return state
        return nnx.State({0: nnx.filter_state(state[0], self.saved_filter), 1: state[1]})

    def _with_saved(self, restored: nnx.State) -> nnx.State:
        """The state with the checkpointed part replaced by `restored`."""
        if self.saved_filter is None:
            return restored
        flat = dict(nnx.to_flat_state(self.state))
        flat.update(nnx.to_flat_state(restored))
        return nnx.from_flat_state(flat)

    def save(self, step: int) -> None:
        """Starts an (asynchronous) checkpoint of the state after `step` updates."""
        self.checkpointer.save(
            step,
            self._saved(self.state),
            config=config_to_dict(self.cfg),
            tokenizer_model=self.tokenizer.serialized_model(),
            data_state=self._data_state(step),
            workload=self.workload.name,
        )

    def _data_state(self, step: int) -> dict:
        state = dict(
            seed=self.cfg.train.seed,
            step=step,
            skipped_steps=self.skipped_steps,
            spike_steps=self.spike_steps,
        )
        if self.spike_guard is not None:
            state["spike_guard"] = {
                k: float(v) for k, v in jax.device_get(self.spike_guard).items()
            }
        return state

    # ------------------------------------------------------------------ the loop

    def run(self, until: Optional[int] = None) -> dict[str, Any]:
        """Trains to cfg.train.steps (or stops early after step `until`, checkpointing there).

        Returns the last train and validation metrics.
        """
        cfg, total = self.cfg, self.cfg.train.steps
        stop = total if until is None else min(until, total)
        bar = tqdm(
            total=total,
            initial=self.start_step,
            desc="train",
            unit="step",
            disable=not (self.show_progress and self.is_lead),
            dynamic_ncols=True,
        )
        log = self._step_log(bar)
        last_eval: dict[str, float] = {}
        signals = _Stops()
        host_batches = self._host_batches(stop)
        next_batch = None
        timeout = cfg.train.step_timeout
        self.watchdog = Watchdog(timeout)
        # The first two steps' results include compiling (the log reads them one step late).
        self.watchdog.progress("the first steps (compiling)", allow=10 * timeout)
        saves: list[int] = []
        profiler = StepProfiler(self.run_dir, cfg.train.profile_steps, bar.write)
        with self.watchdog_closed(), _stop_signals(signals), profiler:
            for step in range(self.start_step, stop):
                if next_batch is None:
                    next_batch = self._wait_for_batch(host_batches, signals, step, log, bar)
                profiler.before(step + 1, self.state)
                device_metrics = self._train_one_step(next_batch)
                profiler.after(step + 1, (self.state, device_metrics))
                # The step runs asynchronously; meanwhile the next batch goes onto the devices.
                next_batch = None
                if step + 1 < stop:
                    next_batch = self._wait_for_batch(host_batches, signals, step + 1, log, bar)
                done = step + 1
                log.record(
                    done, device_metrics, log=done % cfg.train.log_every == 0 or done == stop
                )
                compiling = done - self.start_step < 2
                self.watchdog.progress(
                    f"step {done + 1}", allow=10 * timeout if compiling else None
                )
                bar.update(1)
                if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == total:
                    log.flush()
                    self.watchdog.progress(f"the validation at step {done}", allow=10 * timeout)
                    last_eval = self._validate(done, bar)
                if done % cfg.checkpoint.every == 0 or done == stop:
                    first_save = not saves
                    saves.append(done)  # the first save compiles its slicing programs
                    self.watchdog.progress(
                        f"the save of step {done}", allow=10 * timeout if first_save else None
                    )
                    log.settle_update()  # never checkpoint past an unchecked step
                    # nor past unwritten metrics: a host lost right after this save would
                    # otherwise take them along, and the rerun starts after them.
                    log.flush()
                    self._save_counted(done, log)
                if self._stop_requested(signals, step=done):
                    saved = done % cfg.checkpoint.every == 0 or done == stop
                    self._preempt(done, log, bar, signals, saved)
            profiler.stop(self.state)  # a run stopped early (`until`) inside the range
            log.settle_update()
            # The last save finishes with the handlers still installed: a signal meanwhile
            # waits for it (then exits 75) instead of killing the process mid-save.
            self.watchdog.progress(
                f"the last save (step {stop})", allow=10 * timeout if len(saves) < 2 else None
            )
            self.checkpointer.wait()
            if self.start_step < stop and self._stop_requested(signals):
                log.flush()
                bar.close()
                raise Preempted(stop, signals[0] if signals else "another process")
        log.flush()
        bar.close()
        self.skipped_steps, self.spike_steps = log.skipped_steps, log.spike_steps
        if self.start_step >= stop:  # a finished run rerun: report where it stands
            self.log(f"[resume] {self.run_dir} is already at step {self.start_step}")
            last_eval = self.evaluate()
        return dict(
            train=log.last_train,
            validation=last_eval,
            steps=stop,
            skipped_steps=self.skipped_steps,
            spike_steps=self.spike_steps,
        )

    @contextlib.contextmanager
    def watchdog_closed(self) -> Iterator[None]:
        """Stops the hang watchdog when the loop ends, however it ends."""
        try:
            yield
        finally:
            self.watchdog.close()

    def _step_log(self, bar: tqdm) -> StepLog:
        """The one-step-late reader of this run's metrics and skipped updates."""
        cfg = self.cfg
        tokens_per_step = self.workload.tokens_per_step(cfg)
        peak = cfg.train.peak_flops or metrics_lib.detect_peak_flops()

        def write(step: int, values: dict) -> None:
            self.writer.write(step, values)
            bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['learning_rate']:.2e}")

        return StepLog(
            write=write,
            learning_rate=self.schedule,
            say=bar.write,
            tokens_per_step=tokens_per_step,
            flops_per_step=self.model_flops_per_step(),
            peak_flops=peak * jax.device_count() if peak else 0.0,
            nonfinite=cfg.train.nonfinite,
            spike_factor=cfg.train.spike_factor,
            start_step=self.start_step,
            skipped_steps=self.skipped_steps,
            spike_steps=self.spike_steps,
        )

    def model_flops_per_step(self) -> float:
        """Model FLOPs of one update, the MFU numerator: `jaxformer.models.flops`, the count
        `python -m jaxformer.bench` and `--compile-only` report too."""
        length, target_len = self.workload.row_lengths(self.cfg)
        return flops_lib.model_flops_per_step(self.cfg.model, self.batch_size, length, target_len)

    def _host_batches(self, stop: int) -> Iterator[dict]:
        """This process's batches from start_step to `stop`, made ahead and put on the devices."""
        batcher = self.workload.batcher
        rows = prefetch.ahead(
            lambda s: batcher.batch(s, jax.process_index(), jax.process_count()),
            self.start_step,
            stop,
            **self.workload.prefetch_options(self.cfg),
        )
        return (self._on_devices(local) for local in rows)

    def _train_one_step(self, batch: dict) -> dict:
        """Dispatches one update (asynchronously); returns its device metrics."""
        if self.spike_guard is None:
            self.state, device_metrics = self.train_step(self.state, batch)
        else:
            self.state, device_metrics = self.train_step(self.state, batch, self.spike_guard)
            self.spike_guard = device_metrics.pop("guard")
        return device_metrics

    def _validate(self, done: int, bar: tqdm) -> dict[str, float]:
        metrics = self.evaluate()
        self.writer.write(done, metrics, prefix="validation")
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "unigram_loss")
        bar.write(f"[eval] step {done}: {shown}")
        return metrics

    def _save_counted(self, done: int, log: StepLog) -> None:
        """Checkpoints step `done` with the skipped-update counts read so far."""
        self.skipped_steps, self.spike_steps = log.skipped_steps, log.spike_steps
        self.save(done)

    def _wait_for_batch(
        self, batches: Iterator[dict], signals: _Stops, step: int, log: StepLog, bar: tqdm
    ) -> dict:
        """The next batch; a stop signal while it is being made (a slow or stuck input)
        interrupts the wait and preempts the run at the `step` updates done so far."""
        if jax.process_count() > 1:
            # Every host must save the same step together: they agree on stopping only between
            # steps (_stop_requested), so on several hosts a wait is not cut short.
            return next(batches)
        try:
            with signals.interruptible():
                return next(batches)
        except _StopWaiting:
            self._preempt(step, log, bar, signals, saved=False)
        raise AssertionError("unreachable")  # _preempt raises

    def _preempt(self, done: int, log: StepLog, bar: tqdm, signals: list, saved: bool) -> None:
        """Saves step `done` (unless `saved` already), waits for it to be durable, raises
        Preempted."""
        log.settle_update()
        if done == self.start_step:  # nothing trained in this session: the checkpoint stands
            self.checkpointer.wait()
            log.flush()
            bar.close()
            raise Preempted(done, signals[0] if signals else "another process", saved=False)
        self.watchdog.progress(f"the save of step {done} on preemption")
        if not saved:
            self._save_counted(done, log)
        self.checkpointer.wait()
        log.flush()
        bar.close()
        raise Preempted(done, signals[0] if signals else "another process")

    def _on_devices(self, local: dict) -> dict:
        return shard_lib.shard_batch(local, self.mesh, self.rules)

    def _stop_requested(self, signals: list, step: Optional[int] = None) -> bool:
        """Whether any process got a stop signal, or (with `step`, called at every step) the
        hosts reached JAX's preemption sync point; all hosts agree, so all save the same step."""
        if step is not None and reached_preemption_sync_point(step):
            signals.append(PREEMPTION_NOTICE)
            return True
        local = bool(signals)
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        return bool(np.max(multihost_utils.process_allgather(np.int32(local))))

    def close(self) -> None:
        """Finishes checkpoint writes, closes metric files and releases the run directory."""
        try:
            self.checkpointer.close()
            self.writer.close()
        finally:
            self._release_lock()


def _all_see_directory(path: str) -> bool:
    """Whether `path` is a directory, as process 0 sees it, on every process.

    The processes must agree: orbax's CheckpointManager synchronises them in its constructor, one
    way for an existing directory and another for a new one. Asked separately, a slower process
    can already see the directory that process 0 has just created for a fresh run, and then both
    fail with "sync_global_devices name mismatch".
    """
    exists = os.path.isdir(path)
    if jax.process_count() == 1:
        return exists
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))


def _check_same_model(meta: dict, model: models.ModelConfig, run_dir: str) -> None:
    """Refuses a checkpoint whose model differs from the prepared run's (vocabulary, labels)."""
    mismatch = model_changes(meta["config"]["model"], model)
    if mismatch:
        raise CheckpointError(
            f"{run_dir} holds a checkpoint of a different model ("
            + "; ".join(mismatch[:4])
            + "); use another run.dir or move that one away"
        )
