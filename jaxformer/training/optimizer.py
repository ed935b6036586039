"""The optax optimizer, learning-rate schedules and weight-decay mask built from OptimizerConfig."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxformer.config import check_choice

NAMES = ("adamw", "adafactor")
SCHEDULES = ("warmup_cosine", "warmup_linear", "inverse_sqrt", "warmup_stable_decay", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """How parameters are updated: optimizer, learning-rate schedule, decay, clipping."""

    name: str = "adamw"
    """'adamw' or 'adafactor' (factored second moments, T5's optimizer)."""
    learning_rate: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    schedule: str = "warmup_cosine"
    """'warmup_cosine', 'warmup_linear', 'inverse_sqrt' (T5: constant during warmup, then
    lr * sqrt(warmup / step)), 'warmup_stable_decay' (WSD: linear warmup, constant, then linear
    decay over the last decay_fraction of the steps) or 'constant' (linear warmup, then flat)."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to learning_rate (inverse_sqrt holds the peak instead)."""
    min_lr_ratio: float = 0.1
    """Final learning rate / peak for warmup_cosine, warmup_linear and warmup_stable_decay."""
    decay_fraction: float = 0.1
    """Share of all steps spent decaying at the end of warmup_stable_decay."""
    b1: float = 0.9
    """AdamW first-moment decay; Adafactor keeps its own defaults (no momentum)."""
    b2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW denominator epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, multiplied by the current lr; never on biases or norms (see decay_mask)."""
    clip_norm: Optional[float] = 1.0
    """Clip the gradient to this global L2 norm before the update; 0 or None disables."""
    decay_embeddings: bool = False
    """Also apply weight decay to the embedding tables."""
    grad_accum_steps: int = 1
    """Micro-batches whose gradients the train step averages before one optimizer update."""

    def __post_init__(self) -> None:
        check_choice("OptimizerConfig.name", self.name, NAMES)
        check_choice("OptimizerConfig.schedule", self.schedule, SCHEDULES)
        if self.grad_accum_steps < 1:
            raise ValueError(
                f"OptimizerConfig.grad_accum_steps must be >= 1, got {self.grad_accum_steps}"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"OptimizerConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.learning_rate < 0:
            raise ValueError(
                f"OptimizerConfig.learning_rate must be >= 0, got {self.learning_rate}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(
                f"OptimizerConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"
            )
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(
                f"OptimizerConfig.decay_fraction must be in (0, 1], got {self.decay_fraction}"
            )
        if self.clip_norm is not None and self.clip_norm < 0:
            raise ValueError(
                f"OptimizerConfig.clip_norm must be >= 0 or None, got {self.clip_norm}"
            )


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the step, over a run of total_steps optimizer updates."""
    check_choice("OptimizerConfig.schedule", cfg.schedule, SCHEDULES)
    peak, warmup = cfg.learning_rate, cfg.warmup_steps
    end = peak * cfg.min_lr_ratio
    if warmup > total_steps and cfg.schedule != "inverse_sqrt":
        # The run would end before the peak learning rate: almost always a config mistake.
        raise ValueError(f"warmup_steps={warmup} is longer than the run ({total_steps} steps)")
    if cfg.schedule == "warmup_cosine":
        # optax counts decay_steps from step 0, warmup included, and needs a cosine part of at
        # least one step even when the whole run is warmup.
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup, max(total_steps, warmup + 1), end
        )
    if cfg.schedule == "warmup_linear":
        decay = optax.linear_schedule(peak, end, max(total_steps - warmup, 1))
        return optax.join_schedules([_warmup(peak, warmup), decay], [warmup])
    if cfg.schedule == "inverse_sqrt":
        # T5's rsqrt schedule, rescaled so that the flat part equals the configured peak.
        floor = max(warmup, 1)
        return lambda step: peak * jnp.sqrt(floor / jnp.maximum(step, floor).astype(jnp.float32))
    if cfg.schedule == "warmup_stable_decay":
        decay_steps = max(round(cfg.decay_fraction * total_steps), 1)
        decay_start = total_steps - decay_steps
        if decay_start < warmup:
            raise ValueError(
                f"warmup_stable_decay: warmup ({warmup} steps) overlaps the decay phase "
                f"(last {decay_steps} of {total_steps} steps); lower warmup_steps or decay_fraction"
            )
        return optax.join_schedules(
            [
                _warmup(peak, warmup),
                optax.constant_schedule(peak),
                optax.linear_schedule(peak, end, decay_steps),
            ],
            [warmup, decay_start],
        )
    return (
        optax.warmup_constant_schedule(0.0, peak, warmup)
        if warmup
        else optax.constant_schedule(peak)
    )


def _warmup(peak: float, warmup: int) -> optax.Schedule:
    # optax.linear_schedule with 0 transition steps would return init_value (0) forever.
    return optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_names(path: tuple[Any, ...]) -> list[str]:
    """A parameter's pytree path as names, e.g. ['blocks', 'mlp', 'up', 'kernel']."""
    # Flattening an nnx.Variable adds a trailing GetAttrKey('value'); it is not part of the name.
    while path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return [_key_name(k) for k in path]


def _decays(path: tuple[Any, ...], decay_embeddings: bool) -> bool:
    names = path_names(path)
    last = names[-1] if names else ""
    if last in ("bias", "scale") or any("norm" in n for n in names):
        return False
    if last == "embedding" and any("embed" in n for n in names[:-1]):
        return decay_embeddings
    return True


def decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
    """Same-structure pytree of bools: True where weight decay applies (not norms, biases, embeddings)."""
    # nnx.Optimizer hands the transformation an nnx.State of nnx.Param at init and of raw arrays at
    # update; treating Variables as leaves gives one bool per parameter in both cases.
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _decays(path, decay_embeddings),
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """The full update rule: optional global-norm clipping, then AdamW or Adafactor on the schedule."""
    check_choice("OptimizerConfig.name", cfg.name, NAMES)
    schedule = make_schedule(cfg, total_steps)
    mask = lambda params: decay_mask(params, cfg.decay_embeddings)  # noqa: E731
    if cfg.name == "adamw":
        tx = optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask
        )
    else:
        # optax's Adafactor adds wd * param after the lr scaling; scaling wd by the schedule keeps
        # the decay decoupled-and-proportional to lr, as in AdamW.
        wd = (lambda step: cfg.weight_decay * schedule(step)) if cfg.weight_decay else None
        tx = optax.adafactor(schedule, weight_decay_rate=wd, weight_decay_mask=mask)
    if cfg.clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx
