"""Self-describing orbax checkpoints: state, step, data position, RNG, resolved config and tokenizer."""

from __future__ import annotations

import base64
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from jaxformer import sharding as shard_lib

# 2: blocks stacked on a leading `layers` axis, per-head attention kernels (1 had per-layer
# blocks.{i} parameters and 2-D attention matrices).
FORMAT_VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit what the run asks for."""


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
        lambda x, ref: jax.random.wrap_key_data(x, impl=getattr(ref.dtype, "_impl", None))
        if _is_key(ref) else x, stored, pure_abstract)


def checkpoint_dir(run_dir: str) -> str:
    """Where a run keeps its checkpoints."""
    return os.path.join(os.path.abspath(run_dir), "checkpoints")


class Checkpointer:
    """An orbax CheckpointManager for one run directory."""

    def __init__(self, run_dir: str, *, keep: int = 3, async_save: bool = True,
                 create: bool = True):
        directory = checkpoint_dir(run_dir)
        if not create and not os.path.isdir(directory):
            raise CheckpointError(f"no checkpoints in {run_dir} (expected {directory})")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(directory, options=options)

    @property
    def latest_step(self) -> Optional[int]:
        """The newest finished checkpoint's step, or None."""
        return self.manager.latest_step()

    @property
    def steps(self) -> list[int]:
        """All finished checkpoint steps, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: nnx.State, *, config: dict, tokenizer_model: bytes,
             data_state: dict) -> None:
        """Starts saving (asynchronously when configured); `wait()` blocks until it is on disk."""
        meta = dict(format_version=FORMAT_VERSION, step=int(step), data=data_state, config=config,
                    tokenizer=base64.b64encode(tokenizer_model).decode("ascii"))
        storable = _to_storable(nnx.to_pure_dict(state))
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(storable), meta=ocp.args.JsonSave(meta)))

    def read_meta(self, step: Optional[int] = None) -> dict:
        """The JSON part (step, data state, config, tokenizer) of a checkpoint."""
        step = self._resolve(step)
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = dict(restored["meta"])
        version = meta.get("format_version", 1)
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"the checkpoint at step {step} in {self.manager.directory} has format "
                f"{version}; this jaxformer reads format {FORMAT_VERSION} (parameters stacked over "
                "layers, per-head attention kernels). Load it with the jaxformer release that "
                "wrote it, or start a new run.dir")
        meta["tokenizer"] = base64.b64decode(meta["tokenizer"])
        return meta

    def restore_state(self, abstract_state: nnx.State, mesh: jax.sharding.Mesh,
                      rules, step: Optional[int] = None, *, partial: bool = False) -> nnx.State:
        """Restores onto `mesh` (any shape): arrays land with the shardings the rules give there.

        With partial=True only the leaves present in `abstract_state` are read (e.g. the model
        parameters of a checkpoint that also holds optimizer state).
        """
        step = self._resolve(step)
        shardings = shard_lib.state_shardings(abstract_state, mesh, rules)
        pure_abstract = nnx.to_pure_dict(jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state, shardings))
        target = _abstract_storable(pure_abstract)
        restore = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True) if partial else ocp.args.StandardRestore(target)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=restore))
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"checkpoint at step {step} does not match this model: "
                                  f"{str(err).splitlines()[0][:300]}") from err
        state = jax.tree.map(lambda x: x, abstract_state)  # a copy to fill in
        nnx.replace_by_pure_dict(state, _from_storable(restored["state"], pure_abstract))
        return state

    def _resolve(self, step: Optional[int]) -> int:
        steps = self.steps
        if not steps:
            raise CheckpointError(f"no finished checkpoint in {self.manager.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"no checkpoint at step {step}; available steps: "
                                  f"{', '.join(map(str, steps))}")
        return step

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
