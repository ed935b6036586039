"""Loss, train step and eval step as pure functions of (state, batch), jitted with donated state."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxformer import batches, losses
from jaxformer.logical import Rule, axis_rules
from jaxformer.loss_inputs import ClassificationLossInputs

Array = jax.Array
# A producer's dict of arrays (see jaxformer.batches.from_rows) or an already typed batch.
Batch = Union[dict[str, Array], batches.Batch]


def _sums_and_predictions(
    model: nnx.Module, batch: Batch, chunk_size: int = 0, z_loss: float = 0.0
) -> tuple[dict[str, Array], Array]:
    """Summed loss/weight/correct totals (plus `aux_<name>_sum` per auxiliary loss) and argmax
    predictions (or the loss inputs' own `predictions`); LM logits never exist whole when
    `chunk_size` > 0 (positions per chunk)."""
    inputs = model.loss_inputs(batches.from_rows(batch))
    if isinstance(inputs, ClassificationLossInputs):
        sums, predictions = _classification_sums(
            inputs.logits_BxC, inputs.labels_B, inputs.weights_B
        )
    elif chunk_size <= 0 or chunk_size >= inputs.hidden_BxLxD.shape[1]:
        sums, predictions = losses.full_cross_entropy_sums(
            inputs.hidden_BxLxD,
            inputs.logits_fn,
            inputs.targets_BxL,
            inputs.weights_BxL,
            z_loss=z_loss,
            return_predictions=True,
        )
    else:
        sums, predictions = losses.cross_entropy_sums(
            inputs.hidden_BxLxD,
            inputs.logits_fn,
            inputs.targets_BxL,
            inputs.weights_BxL,
            z_loss=z_loss,
            chunk_size=chunk_size,
            return_predictions=True,
        )
    if getattr(inputs, "predictions", None) is not None:  # e.g. extractive QA's span logits
        predictions = inputs.predictions
    if inputs.aux_losses:
        # Weighted like loss_sum, so dividing by the weight total gives back the aux value (see
        # jaxformer.loss_inputs); no ops at all for models without aux losses.
        scale = jnp.maximum(sums["weight_sum"], 1.0)
        for name, aux in inputs.aux_losses.items():
            sums[f"aux_{name}_sum"] = jnp.asarray(aux, jnp.float32) * scale
    return sums, predictions


def _classification_sums(
    logits_BxC: Array, labels_B: Array, weights_B: Array
) -> tuple[dict[str, Array], Array]:
    nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)
    predictions_B = jnp.argmax(logits_BxC, axis=-1)
    weights_B = weights_B.astype(jnp.float32)
    sums = dict(
        loss_sum=jnp.sum(nll_B * weights_B),
        weight_sum=jnp.sum(weights_B),
        correct_sum=jnp.sum((predictions_B == labels_B) * weights_B),
    )
    return sums, predictions_B


def loss_sums(
    model: nnx.Module, batch: Batch, chunk_size: int = 0, z_loss: float = 0.0
) -> dict[str, Array]:
    """Summed (not averaged) loss, weight and correct-prediction totals over a batch, in float32
    (plus z_loss_sum when z_loss > 0, and aux_<name>_sum per auxiliary loss of the model)."""
    return _sums_and_predictions(model, batch, chunk_size, z_loss)[0]


def _aux_names(sums: dict[str, Array]) -> list[str]:
    """Names of the auxiliary losses in a sums dict (keys aux_<name>_sum), in a fixed order."""
    return sorted(k[len("aux_") : -len("_sum")] for k in sums if k.startswith("aux_"))


def _micro_batches(batch: Batch, num: int) -> Batch:
    """[B, ...] -> [num, B/num, ...] with micro-batch i = rows i, i+num, ...

    Strided rather than contiguous, so every device's rows are spread over all micro-batches and
    each micro-batch stays sharded over the whole data axis.
    """
    return jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1), batch
    )


def make_train_step(
    graphdef: nnx.GraphDef,
    grad_accum_steps: int = 1,
    state_sharding: Any = None,
    *,
    rules: Optional[Sequence[Rule]] = None,
    mesh: Optional[Mesh] = None,
    loss_chunk_size: int = 0,
    z_loss: float = 0.0,
    spike_factor: float = 0.0,
    spike_window: int = 100,
    spike_warmup: int = 20,
    trainable: nnx.filterlib.Filter = nnx.Param,
) -> Callable:
    """A jitted `(state, batch) -> (state, metrics)`; gradients are averaged per target token.

    `state_sharding` (e.g. `sharding.state_shardings(state, mesh, rules)`) pins the new state to
    the layout of the old one instead of whatever the compiler would propagate; `rules` (with
    `mesh`) constrain the activations by the same logical-axis table as the parameters. An update
    whose loss or gradients are not finite is not applied (metrics["nonfinite"] is 1 then).

    Given a `guard` (`spike_guard()`: running means of loss and gradient norm), the step is
    `(state, batch, guard) -> (state, metrics)` with the updated guard in metrics["guard"]: once
    `spike_warmup` updates are averaged, an update whose loss or gradient norm exceeds
    `spike_factor` times its running mean (over about `spike_window` updates) is not applied
    either (metrics["spike"] is 1) and leaves the means as they were.
    """

    def sum_loss(model, batch):
        sums = loss_sums(model, batch, loss_chunk_size, z_loss)
        objective = sums["loss_sum"] + sums.get("z_loss_sum", 0.0)
        for name in _aux_names(sums):
            objective = objective + sums[f"aux_{name}_sum"]
        return objective, sums

    @_with_rules(rules, mesh)
    def train_step(state: Any, batch: Batch, guard: Optional[dict] = None):
        model, optimizer = nnx.merge(graphdef, state)
        # Only the `trainable` variables get gradients (the optimizer holds state for just those).
        grad_fn = nnx.grad(sum_loss, argnums=nnx.DiffState(0, trainable), has_aux=True)
        if grad_accum_steps == 1:
            grads, sums = grad_fn(model, batch)
        else:
            # The scan body rebuilds the model from its state, and carries that state so the
            # dropout RNG advances from one micro-batch to the next.
            model_graph, model_state = nnx.split(model)

            def micro_grads(state, micro):
                m = nnx.merge(model_graph, state)
                grads, sums = grad_fn(m, micro)
                return (grads, sums), nnx.state(m)

            def accumulate(carry, micro):
                totals, state = carry
                step_totals, state = micro_grads(state, micro)
                return (jax.tree.map(jnp.add, totals, step_totals), state), None

            micros = _micro_batches(batch, grad_accum_steps)
            shapes, _ = jax.eval_shape(
                micro_grads, model_state, jax.tree.map(lambda x: x[0], micros)
            )
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            ((grads, sums), model_state), _ = jax.lax.scan(accumulate, (zeros, model_state), micros)
            nnx.update(model, model_state)
        denom = jnp.maximum(sums["weight_sum"], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        # The reported (and spike-checked) loss includes the auxiliary losses, not the z-loss.
        loss_sum = sums["loss_sum"]
        for name in _aux_names(sums):
            loss_sum = loss_sum + sums[f"aux_{name}_sum"]
        loss = loss_sum / denom
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        apply = finite
        if guard is not None:
            warm = guard["count"] >= spike_warmup
            spike = (
                finite
                & warm
                & (
                    (loss > spike_factor * guard["loss"])
                    | (grad_norm > spike_factor * guard["grad_norm"])
                )
            )
            apply = finite & ~spike
            rate = 1.0 / jnp.minimum(guard["count"] + 1.0, float(spike_window))
            seen = dict(
                loss=guard["loss"] + rate * (loss - guard["loss"]),
                grad_norm=guard["grad_norm"] + rate * (grad_norm - guard["grad_norm"]),
                count=guard["count"] + 1.0,
            )
            guard = jax.tree.map(lambda new, old: jnp.where(apply, new, old), seen, guard)

        def apply_update(state):
            model, optimizer = nnx.merge(graphdef, state)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer))

        # cond, not select: a skipped step costs no second copy of the state.
        new_state = jax.lax.cond(
            apply, apply_update, lambda state: state, nnx.state((model, optimizer))
        )
        metrics = dict(
            loss=loss,
            accuracy=sums["correct_sum"] / denom,
            grad_norm=grad_norm,
            tokens=sums["weight_sum"],
            nonfinite=1.0 - finite.astype(jnp.float32),
        )
        if "z_loss_sum" in sums:
            metrics["z_loss"] = sums["z_loss_sum"] / denom
        for name in _aux_names(sums):
            metrics[f"aux_{name}"] = sums[f"aux_{name}_sum"] / denom
        if guard is not None:
            metrics.update(spike=spike.astype(jnp.float32), guard=guard)
        return new_state, metrics

    out_shardings = None if state_sharding is None else (state_sharding, None)
    return jax.jit(train_step, donate_argnums=0, out_shardings=out_shardings)


def spike_guard(stored: Optional[dict] = None) -> dict:
    """The running means a spike-checking train step carries (fresh, or as saved)."""
    stored = stored or {}
    return {k: jnp.float32(stored.get(k, 0.0)) for k in ("loss", "grad_norm", "count")}


def make_eval_step(
    graphdef: nnx.GraphDef,
    *,
    rules: Optional[Sequence[Rule]] = None,
    mesh: Optional[Mesh] = None,
    loss_chunk_size: int = 0,
) -> Callable:
    """A jitted `(state, batch) -> (sums, predictions)` in evaluation mode (no dropout).

    Predictions are the argmax classes (classification) or next tokens (language models).
    """

    @_with_rules(rules, mesh)
    def eval_step(state: Any, batch: Batch):
        model, _ = nnx.merge(graphdef, state)
        model.eval()
        return _sums_and_predictions(model, batch, loss_chunk_size)

    return jax.jit(eval_step)


def _with_rules(rules: Optional[Sequence[Rule]], mesh: Optional[Mesh]) -> Callable:
    """Decorator: trace the step inside `axis_rules`, so activations follow the rule table."""

    def wrap(fn: Callable) -> Callable:
        if rules is None:
            return fn

        @functools.wraps(fn)
        def traced(*args):
            with axis_rules(rules, mesh):
                return fn(*args)

        return traced

    return wrap
