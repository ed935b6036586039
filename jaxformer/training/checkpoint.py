"""Self-describing orbax checkpoints: state, step, data position, RNG, resolved config and tokenizer."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from jaxformer import sharding as shard_lib
from jaxformer.training.checkpoint_faults import (
    MISMATCH,
    Unreadable,
    agreed,
    disk_error,
    error_chain,
    everywhere,
    first_line,
    install_test_save_delay,
    looks_damaged,
    quiet_disk_errors,
    quiet_read_failures,
    reason,
)

# 2: blocks stacked on a leading `layers` axis, per-head attention kernels (1 had per-layer
# blocks.{i} parameters and 2-D attention matrices).
FORMAT_VERSION = 2


# Unreadable checkpoints are moved here (inside the checkpoint directory, where orbax's step listing
# ignores them) instead of being deleted.
CORRUPT_DIR = "corrupt"
ITEMS = ("meta", "state")
REQUIRED_FILES = ("meta/metadata", "state/_METADATA")  # what every orbax >= 0.11 writes
COMMIT_FILE = "commit_success.txt"  # orbax >= 0.12 writes it just before committing a save
TMP_MARK = ".orbax-checkpoint-tmp"  # an uncommitted (interrupted) save: <step>.orbax-checkpoint-tmp


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit what the run asks for."""


_reported: set[str] = set()  # step directories whose damage this process has explained already


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_storable(pure: Any) -> Any:
    # Typed PRNG keys are stored as their raw uint32 data and re-wrapped on restore.
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, pure)


def _abstract_storable(pure_abstract: Any) -> Any:
    def one(x):
        if _is_key(x):
            data = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(one, pure_abstract)


def _from_storable(stored: Any, pure_abstract: Any) -> Any:
    return jax.tree.map(
        lambda x, ref: (
            jax.random.wrap_key_data(x, impl=getattr(ref.dtype, "_impl", None))
            if _is_key(ref)
            else x
        ),
        stored,
        pure_abstract,
    )


def checkpoint_dir(run_dir: str) -> str:
    """Where a run keeps its checkpoints."""
    return os.path.join(os.path.abspath(run_dir), "checkpoints")


class Checkpointer:
    """An orbax CheckpointManager for one run directory.

    Reading the newest checkpoint (`read_meta()`, `restore_state()` without a step, and
    `restore_newest()` when a run resumes) falls back to the next older step when a step cannot be
    read back: files missing or truncated, or a save that never committed. Each such step is
    reported in one line on stderr; `restore_newest(set_aside=True)` also moves it to
    `checkpoints/corrupt/` (never deletes it) so that the run can save that step again. When no
    step reads, it is a CheckpointError and nothing is moved.
    """

    def __init__(
        self,
        run_dir: str,
        *,
        keep: int = 3,
        async_save: bool = True,
        create: bool = True,
        keep_every: int = 0,
    ):
        """`keep` newest checkpoints are kept, and never fewer than two: the newest is not read
        back after saving, so the one before it stays as the fallback. Steps that are multiples
        of `keep_every` (if > 0) are never deleted."""
        self.directory = directory = checkpoint_dir(run_dir)
        if not create and not os.path.isdir(directory):
            raise CheckpointError(f"no checkpoints in {run_dir} (expected {directory})")
        install_test_save_delay()
        quiet_disk_errors()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max(keep, 2),
            keep_period=keep_every or None,
            create=create,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(directory, options=options)

    @property
    def latest_step(self) -> Optional[int]:
        """The newest finished checkpoint's step, or None."""
        return self.manager.latest_step()

    @property
    def steps(self) -> list[int]:
        """All finished checkpoint steps, oldest first."""
        return sorted(self.manager.all_steps())

    def agreed_steps(self) -> list[int]:
        """`steps` as process 0 sees them, on every process (a collective on several hosts)."""
        return agreed(self.steps)

    def save(
        self,
        step: int,
        state: nnx.State,
        *,
        config: dict,
        tokenizer_model: bytes,
        data_state: dict,
        workload: str,
        params_only: bool = False,
    ) -> None:
        """Starts saving (asynchronously when configured); `wait()` blocks until it is on disk.
        `workload` names the registered workload whose config `config` is; `params_only` marks a
        state of the model alone, `(model,)` (a converted checkpoint: no optimizer state)."""
        meta = dict(
            format_version=FORMAT_VERSION,
            step=int(step),
            workload=workload,
            data=data_state,
            config=config,
            tokenizer=base64.b64encode(tokenizer_model).decode("ascii"),
        )
        if params_only:
            meta["params_only"] = True
        storable = _to_storable(nnx.to_pure_dict(state))
        with _disk_errors_as_oserror():  # this save's, or the error of the one before it
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(storable), meta=ocp.args.JsonSave(meta)
                ),
            )

    def read_meta(self, step: Optional[int] = None) -> dict:
        """The JSON part (step, data state, config, tokenizer) of a checkpoint: of `step`, or of
        the newest one whose metadata reads."""
        if step is not None:
            return self._one(self._resolve(step), self._read_meta)
        return self._newest(self._read_meta)[1]

    def restore_state(
        self,
        abstract_state: nnx.State,
        mesh: jax.sharding.Mesh,
        rules,
        step: Optional[int] = None,
        *,
        partial: bool = False,
    ) -> nnx.State:
        """Restores onto `mesh` (any shape): arrays land with the shardings the rules give there.

        With partial=True only the leaves present in `abstract_state` are read (e.g. the model
        parameters of a checkpoint that also holds optimizer state). Without `step`, the newest
        checkpoint whose arrays read.
        """

        def read(s):
            return self._restore_arrays(s, abstract_state, mesh, rules, partial)

        if step is not None:
            return self._one(self._resolve(step), read)
        return self._newest(read)[1]

    def restore_newest(
        self, abstract_state: nnx.State, mesh: jax.sharding.Mesh, rules, *, set_aside: bool = True
    ) -> tuple[nnx.State, dict]:
        """(state, metadata) of the newest checkpoint that reads completely, for resuming a run.

        With `set_aside`, newer steps that do not read are moved to `checkpoints/corrupt/` and
        interrupted saves (`<step>.orbax-checkpoint-tmp`) are removed, so the run saves those
        steps again; each is reported in one line.
        """

        def read(s):
            meta = self._read_meta(s)
            return self._restore_arrays(s, abstract_state, mesh, rules, False), meta

        return self._newest(read, set_aside=set_aside)[1]

    # ------------------------------------------------------------------ reading one step

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _commit_problem(self, step: int) -> Optional[str]:
        """Why `step` is not a complete, committed checkpoint as far as its files show, or None."""
        path = self._step_dir(step)
        for item in ITEMS:
            if not os.path.isdir(os.path.join(path, item)):
                return f"its {item}/ directory is missing"
        for name in REQUIRED_FILES:
            if not os.path.isfile(os.path.join(path, name)):
                return f"its {name} is missing"
        # Orbax >= 0.12 marks each item and then the step as committed; older ones mark nothing.
        marked = [os.path.exists(os.path.join(path, item, COMMIT_FILE)) for item in ITEMS]
        if any(marked) and not os.path.exists(os.path.join(path, COMMIT_FILE)):
            return f"its commit marker {COMMIT_FILE} is missing (the save never finished)"
        return None

    def _read_meta(self, step: int) -> dict:
        try:
            with quiet_read_failures():
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )
            meta = dict(restored["meta"])
        except Exception as err:  # any way the files can fail to read
            raise Unreadable(f"its metadata does not read ({reason(err)})") from err
        version = meta.get("format_version", 1)
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"the checkpoint at step {step} in {self.manager.directory} has format "
                f"{version}; this jaxformer reads format {FORMAT_VERSION} (parameters stacked over "
                "layers, per-head attention kernels). Load it with the jaxformer release that "
                "wrote it, or start a new run.dir"
            )
        try:
            meta["tokenizer"] = base64.b64decode(meta["tokenizer"])
            stored_step = int(meta["step"])
        except (KeyError, TypeError, ValueError) as err:
            raise Unreadable(f"its metadata is incomplete ({type(err).__name__}: {err})") from err
        if stored_step != step:
            raise Unreadable(f"its metadata is of step {stored_step}")
        if "workload" not in meta:  # written before runs recorded their workload
            meta["workload"] = "finetuning" if "task" in meta["config"] else "pretraining"
        return meta

    def _restore_arrays(
        self, step: int, abstract_state: nnx.State, mesh, rules, partial: bool
    ) -> nnx.State:
        shardings = shard_lib.state_shardings(abstract_state, mesh, rules)
        pure_abstract = nnx.to_pure_dict(
            jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                abstract_state,
                shardings,
            )
        )
        target = _abstract_storable(pure_abstract)
        restore = (
            ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True,
            )
            if partial
            else ocp.args.StandardRestore(target)
        )
        try:
            with quiet_read_failures():
                restored = self.manager.restore(step, args=ocp.args.Composite(state=restore))
        except Exception as err:
            text = "\n".join(str(e) for e in error_chain(err))
            if any(marker in text for marker in MISMATCH) or (
                isinstance(err, (ValueError, KeyError, TypeError)) and not looks_damaged(err)
            ):
                raise CheckpointError(
                    f"checkpoint at step {step} does not match this model: {first_line(err)}"
                ) from err
            raise Unreadable(f"its arrays do not read ({reason(err)})") from err
        state = jax.tree.map(lambda x: x, abstract_state)  # a copy to fill in
        nnx.replace_by_pure_dict(state, _from_storable(restored["state"], pure_abstract))
        return state

    def _one(self, step: int, read: Callable[[int], Any]) -> Any:
        """read(step) of the step asked for by name: no fallback, a clear error if it is damaged."""
        problem = self._commit_problem(step)
        if problem is None:
            try:
                return read(step)
            except Unreadable as err:
                problem = str(err)
        raise CheckpointError(
            f"the checkpoint at step {step} in {self.directory} is unreadable: {problem}"
        )

    # ------------------------------------------------------------------ falling back

    def _newest(self, read: Callable[[int], Any], *, set_aside: bool = False) -> tuple[int, Any]:
        """(step, read(step)) of the newest step that reads; the damaged newer ones reported.
        All hosts walk process 0's steps and fall back together past a step any of them cannot
        read."""
        steps = self.agreed_steps()
        if not steps:
            raise CheckpointError(f"no finished checkpoint in {self.directory}")
        damaged: list[tuple[int, str]] = []
        for step in reversed(steps):
            # Orbax's reads synchronise the hosts: all read a step, or none does. So the hosts
            # first agree that its files are complete everywhere, then read, then agree again.
            problem, result = self._commit_problem(step), None
            if everywhere(problem is None):
                try:
                    result = read(step)
                except Unreadable as err:
                    problem = str(err)
                ok = everywhere(problem is None)
            else:
                ok = False
            if not ok:
                damaged.append((step, problem or "it is missing or unreadable on another host"))
                continue
            self._handle_damaged(damaged, step, set_aside)
            return step, result
        # Nothing reads: a systematic problem as likely as damage, so nothing is moved.
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}: "
            + "; ".join(f"step {s}: {why}" for s, why in damaged)
            + ". Nothing was moved or deleted; fix or move away the damaged steps, or start a "
            "new run.dir"
        )

    def _handle_damaged(self, damaged: list[tuple[int, str]], good: int, set_aside: bool) -> None:
        lead = jax.process_index() == 0
        going_on = f"resuming from step {good}" if set_aside else f"reading step {good} instead"
        for step, why in damaged:
            path = self._step_dir(step)
            said = path in _reported
            _reported.add(path)
            if set_aside:
                where = self._set_aside(step) if lead else "corrupt/"
                line = (
                    f"moved the unreadable checkpoint of step {step} to {where}"
                    if said
                    else f"the checkpoint at step {step} in {self.directory} is unreadable: {why}; "
                    f"moved it to {where}"
                )
            elif said:
                continue
            else:
                line = f"the checkpoint at step {step} in {self.directory} is unreadable: {why}"
            if lead:
                print(f"[checkpoint] {line}; {going_on}", file=sys.stderr, flush=True)
        if not set_aside:
            return
        for name in self._interrupted_saves():
            if lead:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
                print(
                    f"[checkpoint] the save of step {name.split('.')[0]} was interrupted before "
                    f"it committed; removed its partial {name} ({going_on})",
                    file=sys.stderr,
                    flush=True,
                )
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxformer_checkpoint_set_aside")
        self.manager.reload()  # orbax must not see the moved steps (it skips saves <= its latest)

    def _set_aside(self, step: int) -> str:
        """Moves a damaged step out of orbax's sight into corrupt/; returns where it went."""
        folder = os.path.join(self.directory, CORRUPT_DIR)
        os.makedirs(folder, exist_ok=True)
        base = os.path.join(folder, f"{step}.{time.strftime('%Y%m%d-%H%M%S')}")
        dest, n = base, 1
        while os.path.exists(dest):
            dest, n = f"{base}-{n}", n + 1
        os.rename(self._step_dir(step), dest)
        return dest

    def _interrupted_saves(self) -> list[str]:
        """Names of orbax's temporary directories of saves that never committed."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if TMP_MARK in n and n.split(".")[0].isdigit())

    def _resolve(self, step: int) -> int:
        steps = self.steps
        if not steps:
            raise CheckpointError(f"no finished checkpoint in {self.manager.directory}")
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint at step {step}; available steps: {', '.join(map(str, steps))}"
            )
        return step

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are finished; a save that failed on a full or
        read-only disk raises its OSError (one line for the user, not orbax's chain)."""
        with _disk_errors_as_oserror():
            self.manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        with _disk_errors_as_oserror():
            self.manager.wait_until_finished()
            self.manager.close()


@contextlib.contextmanager
def _disk_errors_as_oserror() -> Iterator[None]:
    try:
        yield
    except Exception as err:
        found = disk_error(err)
        if found is None:
            raise
        raise found from None
