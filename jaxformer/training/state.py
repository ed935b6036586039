"""The train state and the jitted steps a run trains with: one builder for the Trainer and for
ahead-of-time compiles (`--compile-only`), so both compile exactly the same step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import jax
import optax
from flax import nnx

from jaxformer import models
from jaxformer import sharding as shard_lib
from jaxformer.training.config import TrainConfig
from jaxformer.training.optimizer import OptimizerConfig
from jaxformer.training.step import make_eval_step, make_train_step, spike_guard

TRAINABLE_DEFAULT: nnx.filterlib.Filter = nnx.Param
"""What trains unless a workload says otherwise: every parameter."""


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


def train_state_factory(
    model_cfg: models.ModelConfig,
    tx: optax.GradientTransformation,
    seed: int,
    trainable: nnx.filterlib.Filter = TRAINABLE_DEFAULT,
    adapt: Optional[Callable[[nnx.Module], None]] = None,
) -> Callable[[], tuple]:
    """A function building the (model, optimizer) pair that a run trains; the optimizer holds
    state for the `trainable` variables only. `adapt` changes the fresh model in place first
    (e.g. jaxformer.lora adapters), so the adapted model is what is born sharded."""

    def factory():
        model = models.create(model_cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
        if adapt is not None:
            adapt(model)
        return model, nnx.Optimizer(model, tx, wrt=trainable)

    return factory


def build_state(
    model_cfg: models.ModelConfig,
    tx: optax.GradientTransformation,
    mesh,
    rules,
    seed: int,
    trainable: nnx.filterlib.Filter = TRAINABLE_DEFAULT,
    adapt: Optional[Callable[[nnx.Module], None]] = None,
):
    """(graphdef, state) of (model, optimizer), every array born sharded on the mesh."""
    factory = train_state_factory(model_cfg, tx, seed, trainable, adapt)
    return nnx.split(shard_lib.create_sharded(factory, mesh, rules))


def abstract_state(
    model_cfg: models.ModelConfig,
    tx: optax.GradientTransformation,
    mesh,
    rules,
    seed: int,
    trainable: nnx.filterlib.Filter = TRAINABLE_DEFAULT,
    adapt: Optional[Callable[[nnx.Module], None]] = None,
) -> tuple[nnx.GraphDef, Any, Any, int]:
    """(graphdef, state as sharded ShapeDtypeStructs, the shardings, parameter count): what
    `build_state` makes, traced without allocating anything the size of the model."""
    factory = train_state_factory(model_cfg, tx, seed, trainable, adapt)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(factory)
        graphdef, state = nnx.split(abstract)
        shardings = shard_lib.state_shardings(state, mesh, rules)
    state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, shardings
    )
    return graphdef, state, shardings, models.count_params(abstract[0])


def build_train_step(
    graphdef: nnx.GraphDef,
    state_sharding: Any,
    train: TrainConfig,
    optimizer: OptimizerConfig,
    mesh,
    rules,
    trainable: nnx.filterlib.Filter = TRAINABLE_DEFAULT,
) -> Callable:
    """The jitted train step of a run, every `train.*` option applied (loss chunking, z-loss,
    the spike guard); takes `(state, batch)` or, with train.spike_factor, `(state, batch, guard)`."""
    return make_train_step(
        graphdef,
        optimizer.grad_accum_steps,
        state_sharding,
        rules=rules,
        mesh=mesh,
        loss_chunk_size=train.loss_chunk_size,
        z_loss=train.z_loss,
        spike_factor=train.spike_factor,
        spike_window=train.spike_window,
        spike_warmup=train.spike_warmup,
        trainable=trainable,
    )


def build_eval_step(graphdef: nnx.GraphDef, train: TrainConfig, mesh, rules) -> Callable:
    """The jitted eval step of a run: `(state, batch) -> (sums, predictions)`."""
    return make_eval_step(graphdef, rules=rules, mesh=mesh, loss_chunk_size=train.loss_chunk_size)


def step_arguments(state: Any, batch: Any, train: TrainConfig) -> tuple:
    """The arguments the train step of `build_train_step` takes (a fresh spike guard if used)."""
    return (state, batch, spike_guard()) if train.spike_factor else (state, batch)
