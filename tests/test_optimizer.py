"""Schedules, weight-decay mask, clipping and both optimizers from OptimizerConfig."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxformer.training.optimizer import (
    OptimizerConfig,
    decay_mask,
    make_optimizer,
    make_schedule,
)

PEAK = 1e-3


def lr_at(schedule: optax.Schedule, step: int) -> float:
    return float(schedule(step))


def test_warmup_cosine_key_steps():
    cfg = OptimizerConfig(
        learning_rate=PEAK, schedule="warmup_cosine", warmup_steps=10, min_lr_ratio=0.1
    )
    s = make_schedule(cfg, total_steps=100)
    assert lr_at(s, 0) == 0.0
    assert lr_at(s, 5) == pytest.approx(PEAK / 2)
    assert lr_at(s, 10) == pytest.approx(PEAK)
    assert lr_at(s, 55) == pytest.approx(PEAK * 0.55, rel=1e-4)  # cosine midpoint: (peak + end) / 2
    assert lr_at(s, 100) == pytest.approx(PEAK * 0.1)


def test_warmup_linear_key_steps():
    cfg = OptimizerConfig(
        learning_rate=PEAK, schedule="warmup_linear", warmup_steps=10, min_lr_ratio=0.0
    )
    s = make_schedule(cfg, total_steps=110)
    assert lr_at(s, 0) == 0.0
    assert lr_at(s, 10) == pytest.approx(PEAK)
    assert lr_at(s, 60) == pytest.approx(PEAK / 2)
    assert lr_at(s, 110) == pytest.approx(0.0, abs=1e-12)


def test_inverse_sqrt_is_flat_then_decays_as_rsqrt():
    cfg = OptimizerConfig(learning_rate=PEAK, schedule="inverse_sqrt", warmup_steps=100)
    s = make_schedule(cfg, total_steps=10_000)
    assert lr_at(s, 0) == pytest.approx(PEAK)
    assert lr_at(s, 50) == pytest.approx(PEAK)
    assert lr_at(s, 100) == pytest.approx(PEAK)
    assert lr_at(s, 400) == pytest.approx(PEAK / 2)
    assert lr_at(s, 10_000) == pytest.approx(PEAK / 10)


def test_warmup_stable_decay_plateau_then_decay():
    cfg = OptimizerConfig(
        learning_rate=PEAK,
        schedule="warmup_stable_decay",
        warmup_steps=10,
        decay_fraction=0.2,
        min_lr_ratio=0.0,
    )
    s = make_schedule(cfg, total_steps=100)
    assert lr_at(s, 0) == 0.0
    assert lr_at(s, 5) == pytest.approx(PEAK / 2)
    for step in (10, 40, 80):
        assert lr_at(s, step) == pytest.approx(PEAK)
    assert lr_at(s, 90) == pytest.approx(PEAK / 2)
    assert lr_at(s, 100) == pytest.approx(0.0, abs=1e-12)


def test_wsd_rejects_warmup_overlapping_decay():
    cfg = OptimizerConfig(schedule="warmup_stable_decay", warmup_steps=95, decay_fraction=0.1)
    with pytest.raises(ValueError, match="overlaps the decay phase"):
        make_schedule(cfg, total_steps=100)


def test_warmup_longer_than_run_is_an_error():
    with pytest.raises(ValueError, match="longer than the run"):
        make_schedule(OptimizerConfig(warmup_steps=100), total_steps=10)


def test_constant_schedule_with_and_without_warmup():
    s = make_schedule(OptimizerConfig(learning_rate=PEAK, schedule="constant", warmup_steps=4), 100)
    assert [lr_at(s, i) for i in (0, 2, 4, 99)] == pytest.approx([0.0, PEAK / 2, PEAK, PEAK])
    s = make_schedule(OptimizerConfig(learning_rate=PEAK, schedule="constant", warmup_steps=0), 100)
    assert lr_at(s, 0) == pytest.approx(PEAK)


def test_zero_warmup_starts_at_peak():
    for schedule in ("warmup_cosine", "warmup_linear", "warmup_stable_decay"):
        s = make_schedule(
            OptimizerConfig(learning_rate=PEAK, schedule=schedule, warmup_steps=0), 100
        )
        assert lr_at(s, 0) == pytest.approx(PEAK), schedule


def test_unknown_name_and_schedule_list_valid_ones():
    with pytest.raises(ValueError, match="adamw, adafactor"):
        OptimizerConfig(name="sgd")
    with pytest.raises(ValueError, match="warmup_cosine, warmup_linear, inverse_sqrt"):
        OptimizerConfig(schedule="cosine")
    with pytest.raises(ValueError, match="grad_accum_steps"):
        OptimizerConfig(grad_accum_steps=0)


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.token_embed = nnx.Embed(16, 8, rngs=rngs)
        self.final_norm = nnx.LayerNorm(8, rngs=rngs)
        self.out = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, ids):
        return self.out(self.final_norm(self.token_embed(ids)))


def flat_mask(mask):
    return {
        "/".join(str(k.key) for k in path): bool(v)
        for path, v in jax.tree_util.tree_leaves_with_path(mask)
    }


EXPECTED = {
    "final_norm/bias": False,
    "final_norm/scale": False,
    "out/bias": False,
    "out/kernel": True,
    "token_embed/embedding": False,
}


def test_decay_mask_on_nnx_model():
    params = nnx.state(Tiny(nnx.Rngs(0)), nnx.Param)
    assert flat_mask(decay_mask(params)) == EXPECTED
    assert flat_mask(decay_mask(params, decay_embeddings=True))["token_embed/embedding"] is True
    assert flat_mask(decay_mask(nnx.to_pure_dict(params))) == EXPECTED


def test_decay_mask_sees_what_nnx_optimizer_passes():
    # nnx.Optimizer gives optax a State of nnx.Param at init and a State of raw arrays at update.
    seen = []

    def spy(params):
        mask = decay_mask(params)
        seen.append(flat_mask(mask))
        return mask

    model = Tiny(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3, mask=spy), wrt=nnx.Param)
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.arange(3))))(model)
    optimizer.update(model, grads)
    assert len(seen) == 2 and all(m == EXPECTED for m in seen)


def test_decay_mask_on_plain_dict():
    params = {
        "blocks": {"0": {"attn": {"value": {"kernel": 1.0, "bias": 1.0}}, "ln_norm": {"w": 1.0}}},
        "position_embed": {"embedding": 1.0},
        "relative": {"embedding": 1.0},
    }
    assert flat_mask(decay_mask(params)) == {
        "blocks/0/attn/value/kernel": True,
        "blocks/0/attn/value/bias": False,
        "blocks/0/ln_norm/w": False,
        "position_embed/embedding": False,
        "relative/embedding": True,
    }


def test_weight_decay_skips_masked_params():
    cfg = OptimizerConfig(
        learning_rate=0.1, schedule="constant", warmup_steps=0, weight_decay=0.5, clip_norm=None
    )
    params = {
        "out": {"kernel": jnp.ones(3), "bias": jnp.ones(3)},
        "final_norm": {"scale": jnp.ones(3)},
    }
    tx = make_optimizer(cfg, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    # Zero gradient: only decay moves the weights, by lr * wd * param where the mask allows it.
    np.testing.assert_allclose(updates["out"]["kernel"], -0.05 * np.ones(3), rtol=1e-6)
    np.testing.assert_allclose(updates["out"]["bias"], np.zeros(3))
    np.testing.assert_allclose(updates["final_norm"]["scale"], np.zeros(3))


def test_clipping_actually_clips():
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.full(4, 10.0)}  # global norm 20
    cfg = OptimizerConfig(clip_norm=1.0, weight_decay=0.0, warmup_steps=2)
    # Adam normalises the step size away, so look at its first moment: (1 - b1) * incoming gradient.
    tx = make_optimizer(cfg, 10)
    _, (_, adam_state) = tx.update(grads, tx.init(params), params)
    mu = adam_state[0].mu["w"]
    assert float(jnp.linalg.norm(mu)) == pytest.approx(1 - cfg.b1)
    np.testing.assert_allclose(mu, (1 - cfg.b1) * np.full(4, 0.5), rtol=1e-6)

    tx = make_optimizer(dataclasses.replace(cfg, clip_norm=0.0), 10)
    _, adam_state = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(adam_state[0].mu["w"], (1 - cfg.b1) * grads["w"], rtol=1e-6)


@pytest.mark.parametrize("name,lr", [("adamw", 0.05), ("adafactor", 0.1)])
def test_optimizers_reduce_a_quadratic(name, lr):
    target = jnp.arange(1.0, 257.0).reshape(16, 16) / 256  # 2-D and >= 128 so Adafactor factors it
    target = jnp.tile(target, (8, 8))
    params = {"w": jnp.zeros_like(target) + 0.5}
    loss = lambda p: jnp.mean((p["w"] - target) ** 2)  # noqa: E731
    cfg = OptimizerConfig(
        name=name, learning_rate=lr, schedule="constant", warmup_steps=0, weight_decay=0.0
    )
    tx = make_optimizer(cfg, 100)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    start = float(loss(params))
    for _ in range(50):
        params, state = step(params, state)
    assert float(loss(params)) < 0.1 * start


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_nnx_optimizer_update_runs(name):
    model = Tiny(nnx.Rngs(0))
    cfg = OptimizerConfig(name=name, learning_rate=1e-2, warmup_steps=0, weight_decay=0.1)
    optimizer = nnx.Optimizer(model, make_optimizer(cfg, 10), wrt=nnx.Param)
    ids = jnp.arange(6)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    @nnx.jit
    def train_step(model, optimizer):
        loss_fn = lambda m: jnp.mean(m(ids) ** 2)  # noqa: E731
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(3)]
    assert losses[-1] < losses[0]
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert not np.allclose(after["out"]["kernel"], before["out"]["kernel"])


@pytest.mark.parametrize("schedule", ["warmup_cosine", "warmup_linear", "constant"])
def test_a_run_that_is_all_warmup_reaches_the_peak(schedule):
    cfg = OptimizerConfig(schedule=schedule, learning_rate=1e-3, warmup_steps=10)
    lr = make_schedule(cfg, total_steps=10)
    assert float(lr(0)) == 0.0
    assert float(lr(10)) == pytest.approx(1e-3)
