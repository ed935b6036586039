"""The training loop: sharded state, jitted steps, metrics, validation and checkpoints, for any
workload (pretraining or fine-tuning)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
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
from jaxformer.training import metrics as metrics_lib
from jaxformer.training.checkpoint import Checkpointer, CheckpointError, checkpoint_dir
from jaxformer.training.config import check_resume
from jaxformer.training.optimizer import make_schedule
from jaxformer.training.pretraining import Pretraining
from jaxformer.training.step import make_eval_step, make_train_step, spike_guard
from jaxformer.training.workload import Evaluator, RunEnv, Workload

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: the run saved its state; rerunning the command resumes it


class Preempted(Exception):
    """SIGTERM/SIGINT arrived; the state after `step` is saved and durable."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(
            f"{signal_name}: saved a checkpoint at step {step}; rerun the same "
            "command to resume from it"
        )
        self.step = step


class NonFiniteStep(ValueError):
    """A step's loss or gradients were NaN/Inf (its update was not applied)."""


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


@contextlib.contextmanager
def _stop_signals(flag: list) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT only record themselves in `flag` (the loop checks it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def record(signum, _frame):
        flag.append(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, record)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train_state_factory(model_cfg: models.ModelConfig, tx, seed: int) -> Callable[[], tuple]:
    """A function building the (model, optimizer) pair that a run trains."""

    def factory():
        model = models.create(model_cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    return factory


def build_state(model_cfg: models.ModelConfig, tx, mesh, rules, seed: int):
    """(graphdef, state) of (model, optimizer), every array born sharded on the mesh."""
    return nnx.split(
        shard_lib.create_sharded(train_state_factory(model_cfg, tx, seed), mesh, rules)
    )


def check_batch_size(batch_size: int, grad_accum_steps: int, mesh, rules) -> None:
    """A clear error unless the global batch splits over the batch's mesh axes and micro-batches."""
    shards = shard_lib.batch_shards(mesh, rules)
    axes = shard_lib.batch_axes(mesh, rules)
    if batch_size % shards:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the {shards} ways the "
            f"batch is split (mesh axes {axes})"
        )
    if batch_size % (grad_accum_steps * shards):
        raise ValueError(
            f"batch_size={batch_size} must split into optimizer.grad_accum_steps="
            f"{grad_accum_steps} micro-batches of a multiple of {shards} rows"
        )


def _model_mismatch(stored: dict, wanted: models.ModelConfig) -> list[str]:
    mine = dataclasses.asdict(wanted)
    return [
        f"{k}: checkpoint {stored.get(k)!r} vs config {v!r}"
        for k, v in mine.items()
        if k not in ("preset", "dtype", "remat", "attention_impl", "dropout_rate")
        and stored.get(k) != v
    ]


class Trainer:
    """One run: mesh, sharded state, jitted steps, the loop, checkpoints and metrics, for any
    workload (pretraining by default, or fine-tuning); `run()` trains from the latest checkpoint
    (or scratch) to the end."""

    def __init__(
        self,
        cfg,
        workload: Optional[Workload] = None,
        *,
        show_progress: bool = True,
        log: Callable[[str], None] = print,
        read_only: bool = False,
        step: Optional[int] = None,
    ):
        """Builds everything; `read_only` (evaluation) writes nothing and needs a checkpoint."""
        self.workload = workload = workload if workload is not None else Pretraining()
        self.log, self.show_progress = log, show_progress
        shard_lib.maybe_initialize_distributed(cfg.mesh)
        self.mesh = shard_lib.make_mesh(cfg.mesh)
        self.rules = cfg.mesh.rules
        self.batch_size = workload.batch_size(cfg)
        check_batch_size(self.batch_size, cfg.optimizer.grad_accum_steps, self.mesh, self.rules)
        self.run_dir = os.path.abspath(cfg.run.dir)
        meta = None
        if read_only or os.path.isdir(checkpoint_dir(self.run_dir)):
            existing = Checkpointer(self.run_dir, create=False)
            if read_only or existing.latest_step is not None:
                meta = existing.read_meta(step)
        if meta is not None and not read_only:  # before any work: this run, or a new run.dir
            changed = check_resume(cfg, meta["config"], int(meta["step"]), self.run_dir)
            if changed:
                self.log(changed)
        self.env = RunEnv(self.run_dir, self.mesh, self.rules, log, show_progress)
        self.cfg = cfg = workload.prepare(cfg, meta, self.env)
        self.tokenizer = workload.tokenizer
        if meta is not None:
            mismatch = _model_mismatch(meta["config"]["model"], cfg.model)
            if mismatch:
                raise CheckpointError(
                    f"{self.run_dir} holds a checkpoint of a different model ("
                    + "; ".join(mismatch[:4])
                    + "); use another run.dir or move that one away"
                )
        self.schedule = make_schedule(cfg.optimizer, cfg.train.steps)
        tx = workload.optimizer(cfg)
        # Only now, with the input checked, may the run directory be created or written.
        self.checkpointer = Checkpointer(
            self.run_dir,
            keep=cfg.checkpoint.keep,
            async_save=cfg.checkpoint.async_save,
            create=not read_only,
        )
        if not read_only and jax.process_index() == 0:
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))

        self.log(
            f"[model] {cfg.model.family} {cfg.model.preset or ''} on mesh {dict(self.mesh.shape)}"
        )
        self.graphdef, self.state = build_state(
            cfg.model, tx, self.mesh, cfg.mesh.rules, cfg.train.seed
        )
        if meta is None:  # a resumed run's own checkpoint replaces the whole state instead
            model, optimizer = nnx.merge(self.graphdef, self.state)
            workload.initialize(model, cfg, self.env)
            self.graphdef, self.state = nnx.split((model, optimizer))
        self.num_params = models.count_params(nnx.merge(self.graphdef, self.state)[0])
        self.start_step = 0
        if meta is not None and step is not None:
            self.state = self.checkpointer.restore_state(
                self.state, self.mesh, cfg.mesh.rules, int(meta["step"])
            )
        elif meta is not None:  # the newest step that reads; damaged newer ones are set aside
            self.state, meta = self.checkpointer.restore_newest(
                self.state, self.mesh, cfg.mesh.rules, set_aside=not read_only
            )
        if meta is not None:
            self.start_step = int(meta["step"])
            self.log(f"[resume] from step {self.start_step} of {self.run_dir}")
        step_kw = dict(
            rules=cfg.mesh.rules, mesh=self.mesh, loss_chunk_size=cfg.train.loss_chunk_size
        )
        self.train_step = make_train_step(
            self.graphdef,
            cfg.optimizer.grad_accum_steps,
            shard_lib.state_shardings(self.state, self.mesh, cfg.mesh.rules),
            z_loss=cfg.train.z_loss,
            spike_factor=cfg.train.spike_factor,
            spike_window=cfg.train.spike_window,
            spike_warmup=cfg.train.spike_warmup,
            **step_kw,
        )
        # Running means for spike skipping travel with the checkpoint, so a resumed run skips
        # exactly the updates the uninterrupted one would.
        stored = (meta or {}).get("data", {})
        self.spike_guard = (
            spike_guard(stored.get("spike_guard")) if cfg.train.spike_factor else None
        )
        # Skipped-update counts continue across a resume, as the logged metrics would.
        self.skipped_steps = int(stored.get("skipped_steps", 0))
        self.spike_steps = int(stored.get("spike_steps", 0))
        self.eval_step = make_eval_step(self.graphdef, **step_kw)
        self.is_lead = jax.process_index() == 0
        self.writer = metrics_lib.MetricsWriter(
            self.run_dir, enabled=self.is_lead and not read_only
        )

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
            step = make_eval_step(
                graphdef,
                rules=self.rules,
                mesh=self.mesh,
                loss_chunk_size=self.cfg.train.loss_chunk_size,
            )
            evaluator = Evaluator(self.env, step, state, graphdef)
        return self.workload.evaluate(evaluator, self.cfg, num_batches)

    def model(self) -> nnx.Module:
        """The trained model (evaluation mode), sharing the state's arrays."""
        return Evaluator(self.env, self.eval_step, self.state, self.graphdef).model()

    def save(self, step: int) -> None:
        """Starts an (asynchronous) checkpoint of the state after `step` updates."""
        self.checkpointer.save(
            step,
            self.state,
            config=config_to_dict(self.cfg),
            tokenizer_model=self.tokenizer.serialized_model(),
            data_state=self._data_state(step),
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
        tokens_per_step = self.workload.tokens_per_step(cfg)
        peak = cfg.train.peak_flops or metrics_lib.detect_peak_flops()
        flops_per_step = (
            metrics_lib.flops_per_token(
                cfg.model, self.num_params, tokens_per_step // self.batch_size
            )
            * tokens_per_step
        )
        last_train: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        pending = None  # (step, device metrics): fetched one step late so the device never waits
        bar = tqdm(
            total=total,
            initial=self.start_step,
            desc="train",
            unit="step",
            disable=not (self.show_progress and self.is_lead),
            dynamic_ncols=True,
        )
        clock, clock_step = time.perf_counter(), self.start_step

        def flush(item):
            nonlocal clock, clock_step, last_train
            step, device_metrics = item
            values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
            now = time.perf_counter()
            steps_done = max(step - clock_step, 1)
            seconds = max(now - clock, 1e-9) / steps_done
            clock, clock_step = now, step
            values.update(
                learning_rate=float(self.schedule(step - 1)),
                tokens_per_second=tokens_per_step / seconds,
                step_seconds=seconds,
            )
            if peak:
                values["mfu"] = flops_per_step / seconds / (peak * jax.device_count())
            self.writer.write(step, values)
            bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['learning_rate']:.2e}")
            last_train = values

        signals: list[str] = []
        last_flag = None  # (step, device flags of a skipped update), read one step late
        checked = [self.start_step]  # steps up to here are counted (a step is checked once)

        def check_finite(item):
            step, flag, spike = item
            if step <= checked[0]:
                return
            checked[0] = step
            if spike is not None and float(jax.device_get(spike)):
                self.spike_steps += 1
                bar.write(
                    f"[skip] step {step}: loss or gradient norm above "
                    f"train.spike_factor={cfg.train.spike_factor} x its running mean; "
                    "update not applied"
                )
            if float(jax.device_get(flag)) == 0.0:
                return
            self.skipped_steps += 1
            if cfg.train.nonfinite == "stop":
                raise NonFiniteStep(
                    f"loss or gradients were NaN/Inf at step {step}; that update was not applied "
                    "and no checkpoint holds it. Lower optimizer.learning_rate, try "
                    "train.z_loss=1e-4, or set train.nonfinite=skip to skip such steps"
                )
            bar.write(f"[skip] step {step}: loss or gradients not finite; update not applied")

        batcher = self.workload.batcher
        host_batches = prefetch.ahead(
            lambda s: batcher.batch(s, jax.process_index(), jax.process_count()),
            self.start_step,
            stop,
            **self.workload.prefetch_options(cfg),
        )
        next_batch = None
        with _stop_signals(signals):
            for step in range(self.start_step, stop):
                batch = (
                    next_batch if next_batch is not None else self._on_devices(next(host_batches))
                )
                if self.spike_guard is None:
                    self.state, device_metrics = self.train_step(self.state, batch)
                else:
                    self.state, device_metrics = self.train_step(
                        self.state, batch, self.spike_guard
                    )
                    self.spike_guard = device_metrics.pop("guard")
                # The step runs asynchronously; meanwhile the next batch goes onto the devices.
                next_batch = self._on_devices(next(host_batches)) if step + 1 < stop else None
                done = step + 1
                # Checked one step late, like the metrics, so the device never waits for it.
                if last_flag is not None:
                    check_finite(last_flag)
                last_flag = (done, device_metrics["nonfinite"], device_metrics.get("spike"))
                if pending is not None:
                    flush(pending)
                    pending = None
                if done % cfg.train.log_every == 0 or done == stop:
                    counts = dict(skipped_steps=self.skipped_steps)
                    if self.spike_guard is not None:
                        counts["spike_steps"] = self.spike_steps
                    pending = (done, dict(device_metrics, **counts))
                bar.update(1)
                if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == total:
                    if pending is not None:
                        flush(pending)
                        pending = None
                    last_eval = self.evaluate()
                    self.writer.write(done, last_eval, prefix="validation")
                    bar.write(
                        f"[eval] step {done}: "
                        + ", ".join(
                            f"{k} {v:.4f}" for k, v in last_eval.items() if k != "unigram_loss"
                        )
                    )
                if done % cfg.checkpoint.every == 0 or done == stop:
                    check_finite(last_flag)  # never checkpoint past an unchecked step
                    self.save(done)
                if self._stop_requested(signals):
                    check_finite(last_flag)
                    if done % cfg.checkpoint.every and done != stop:
                        self.save(done)
                    self.checkpointer.wait()
                    if pending is not None:
                        flush(pending)
                    bar.close()
                    raise Preempted(done, signals[0] if signals else "another process")
            if last_flag is not None:
                check_finite(last_flag)
        if pending is not None:
            flush(pending)
        bar.close()
        if self.start_step >= stop:  # a finished run rerun: report where it stands
            self.log(f"[resume] {self.run_dir} is already at step {self.start_step}")
            last_eval = self.evaluate()
        self.checkpointer.wait()
        return dict(
            train=last_train,
            validation=last_eval,
            steps=stop,
            skipped_steps=self.skipped_steps,
            spike_steps=self.spike_steps,
        )

    def _on_devices(self, local: dict) -> dict:
        return shard_lib.shard_batch(local, self.mesh, self.rules)

    def _stop_requested(self, signals: list) -> bool:
        """Whether any process got a stop signal; all hosts agree, so all save the same step."""
        local = bool(signals)
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        return bool(np.max(multihost_utils.process_allgather(np.int32(local))))

    def close(self) -> None:
        """Finishes checkpoint writes and closes metric files."""
        self.checkpointer.close()
        self.writer.close()
