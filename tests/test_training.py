"""Pretraining end to end: sharding equivalence, bit-exact resume, resharding restore, bad input."""

import dataclasses
import json
import os

import jax
import numpy as np
import optax
import pytest
from data_fixtures import snapshot, train_interrupted
from flax import nnx

from jaxformer import models
from jaxformer import sharding as shard_lib
from jaxformer.training.checkpoint import Checkpointer
from jaxformer.training.config import load_experiment
from jaxformer.training.loop import Trainer
from jaxformer.training.main import run_training
from jaxformer.training.state import build_state
from jaxformer.training.step import make_train_step


def train_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


# ------------------------------------------------------------------ sharding equivalence


def _one_step(mesh_shape, devices, grad_accum_steps=1):
    rules = shard_lib.DEFAULT_RULES
    cfg = dataclasses.replace(models.preset("gpt-tiny"), num_heads=8, d_model=64)
    mesh = shard_lib.make_mesh(shard_lib.MeshConfig(shape=mesh_shape), devices)
    # Plain SGD: its update is linear in the gradient, so the comparison measures the sharded
    # gradients themselves. Adam's first step divides by |g| + eps and turns summation-order
    # rounding of gradients near 1e-8 into 0.1% differences of the update.
    tx = optax.sgd(0.5)
    graphdef, state = build_state(cfg, tx, mesh, rules, seed=0)
    rng = np.random.default_rng(0)
    x = rng.integers(3, cfg.vocab_size, (8, 17)).astype(np.int32)
    local = dict(
        inputs=x[:, :-1],
        targets=x[:, 1:],
        loss_weights=np.ones((8, 16), np.float32),
        segment_ids=np.ones((8, 16), np.int32),
        positions=np.tile(np.arange(16, dtype=np.int32), (8, 1)),
    )
    step = make_train_step(
        graphdef,
        grad_accum_steps,
        state_sharding=shard_lib.state_shardings(state, mesh, rules),
        rules=rules,
        mesh=mesh,
        loss_chunk_size=8,
    )
    state, metrics = step(state, shard_lib.shard_batch(local, mesh, rules))
    model, _ = nnx.merge(graphdef, state)
    return float(metrics["loss"]), model


@pytest.mark.parametrize(
    "mesh_shape",
    [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)],
    ids=["data", "fsdp", "tensor", "mixed"],
)
def test_one_step_matches_single_device(mesh_shape):
    loss_1, model_1 = _one_step((1, 1, 1), jax.devices()[:1])
    loss_n, model_n = _one_step(mesh_shape, jax.devices())
    assert abs(loss_1 - loss_n) < 1e-6
    params_1 = nnx.state(model_1, nnx.Param)
    params_n = nnx.state(model_n, nnx.Param)
    for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_n)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # Parameters really are sharded as the rules say.
    kernel = model_n.blocks.mlp.up.kernel[...]  # [layers, embed, mlp]
    expected = shard_lib.logical_to_spec(
        ("layers", "embed", "mlp"), shard_lib.DEFAULT_RULES, kernel.sharding.mesh
    )
    assert kernel.sharding.is_equivalent_to(
        jax.sharding.NamedSharding(kernel.sharding.mesh, expected), kernel.ndim
    )
    if mesh_shape[2] > 1:
        assert kernel.sharding.spec[2] == "tensor"
        assert kernel.addressable_shards[0].data.shape[2] == kernel.shape[2] // mesh_shape[2]
    if mesh_shape[1] > 1:
        assert kernel.sharding.spec[1] == "fsdp"


def test_gradient_accumulation_equals_one_big_batch():
    loss_1, model_1 = _one_step((1, 1, 1), jax.devices()[:1])
    loss_4, model_4 = _one_step((2, 1, 1), jax.devices()[:2], grad_accum_steps=4)
    assert abs(loss_1 - loss_4) < 1e-6
    for a, b in zip(
        jax.tree.leaves(nnx.state(model_1, nnx.Param)),
        jax.tree.leaves(nnx.state(model_4, nnx.Param)),
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_unknown_logical_axis_is_an_error():
    with pytest.raises(ValueError, match="no sharding rule"):
        shard_lib.logical_to_spec(("embed", "experts"), shard_lib.DEFAULT_RULES)


# ------------------------------------------------------------------ checkpoints


def test_checkpoint_restores_on_other_meshes(tmp_path):
    cfg = models.preset("gpt-tiny")
    rules = shard_lib.DEFAULT_RULES
    tx = optax.adamw(1e-3)
    mesh_24 = shard_lib.make_mesh(shard_lib.MeshConfig(shape=(2, 4, 1)))
    _, state = build_state(cfg, tx, mesh_24, rules, seed=3)
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(
        7,
        state,
        config={},
        tokenizer_model=b"tok",
        data_state={"seed": 3, "step": 7},
        workload="pretraining",
    )
    ckpt.wait()
    saved = [
        np.asarray(x)
        for x in jax.tree.leaves(nnx.to_pure_dict(state))
        if not jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key)
    ]
    for shape, devices in (((8, 1, 1), None), ((1, 1, 1), jax.devices()[:1])):
        mesh = shard_lib.make_mesh(shard_lib.MeshConfig(shape=shape), devices)
        _, fresh = build_state(cfg, tx, mesh, rules, seed=99)
        restored = Checkpointer(str(tmp_path), create=False).restore_state(fresh, mesh, rules)
        leaves = [
            x
            for x in jax.tree.leaves(nnx.to_pure_dict(restored))
            if not jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key)
        ]
        for a, b in zip(saved, leaves):
            np.testing.assert_array_equal(a, np.asarray(b))
            assert b.sharding.mesh.shape == mesh.shape
    meta = Checkpointer(str(tmp_path), create=False).read_meta()
    assert meta["step"] == 7 and meta["tokenizer"] == b"tok" and meta["data"]["step"] == 7


def test_interrupted_run_resumes_bit_exactly(tiny_overrides, tmp_path):
    steps = ["train.steps=6", "checkpoint.every=3"]
    straight = str(tmp_path / "straight")
    trainer = Trainer(
        load_experiment(None, tiny_overrides + steps + [f"run.dir={straight}"]),
        show_progress=False,
        log=lambda _: None,
    )
    trainer.run()
    trainer.close()

    resumed = str(tmp_path / "resumed")
    cfg = load_experiment(None, tiny_overrides + steps + [f"run.dir={resumed}"])
    train_interrupted(cfg, until=3)
    expected, got = train_losses(straight), train_losses(resumed)
    assert sorted(got) == list(range(1, 7))
    assert got == expected  # bit for bit: the same floats, not just close ones
    assert expected[6] < expected[1]

    # model.scan_layers changes how the stacked layers run, not the checkpoint: resuming with the
    # layers unrolled is allowed by both resume checks and goes on from step 6.
    unrolled = load_experiment(
        None,
        tiny_overrides + ["train.steps=7", "model.scan_layers=false", f"run.dir={straight}"],
    )
    messages = []
    trainer = Trainer(unrolled, show_progress=False, log=messages.append)
    try:
        assert trainer.start_step == 6
        assert trainer.run()["steps"] == 7
    finally:
        trainer.close()
    assert any("model.scan_layers True -> False" in m for m in messages), messages
    assert sorted(train_losses(straight)) == list(range(1, 8))


def test_compile_only_lowers_the_step_the_trainer_runs(tiny_overrides, tmp_path):
    from jaxformer.training.compile_only import lower_train_step

    options = ["train.z_loss=1e-4", "train.spike_factor=3.0", "train.loss_chunk_size=8"]
    cfg = load_experiment(None, tiny_overrides + options + [f"run.dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, show_progress=False, log=lambda _: None)
    try:
        batch = trainer._on_devices(trainer.workload.batcher.batch(0, 0, 1))
        with jax.set_mesh(trainer.mesh):
            ran = trainer.train_step.lower(trainer.state, batch, trainer.spike_guard).as_text()
        compiled_only = lower_train_step(trainer.cfg, trainer.mesh).as_text()
    finally:
        trainer.close()
    assert compiled_only == ran


# ------------------------------------------------------------------ bad input


def test_bad_input_ends_with_one_clear_message(tiny_overrides, tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  steps: [1,\n")
    cases = [
        (str(bad_yaml), [], "malformed YAML"),
        (None, ["train.stesp=3"], "did you mean 'train.steps'"),
        (None, ["train.steps=abc"], "train.steps"),
        (None, ["model.preset=gpt-huge"], "gpt-tiny"),
        (None, tiny_overrides + ["mesh.shape=[3,1,1]", f"run.dir={tmp_path / 'm'}"], "mesh.shape"),
        (
            None,
            tiny_overrides + ["data.max_documents=0", f"run.dir={tmp_path / 'e'}"],
            "has no documents",
        ),
    ]
    for config_path, overrides, message in cases:
        assert run_training(config_path, overrides) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err


def test_run_dir_of_another_model_is_refused_and_left_intact(tiny_overrides, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert run_training(None, tiny_overrides + ["train.steps=2", f"run.dir={run_dir}"]) == 0
    before = snapshot(run_dir)
    code = run_training(
        None, tiny_overrides + ["train.steps=4", "model.d_model=128", f"run.dir={run_dir}"]
    )
    assert code == 2
    assert "different model" in capsys.readouterr().err
    assert snapshot(run_dir) == before


# ------------------------------------------------------------------ the three shipped configs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt_tiny", "bert_tiny", "t5_tiny"])
def test_shipped_tiny_configs_train_with_falling_loss(name, stdlib_data_dir, tmp_path):
    config = os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.yaml")
    run_dir = str(tmp_path / name)
    overrides = [
        f"data.data_dir={stdlib_data_dir}",
        f"run.dir={run_dir}",
        "train.steps=40",
        "train.log_every=5",
        "train.eval_every=0",
        "train.eval_batches=2",
        "checkpoint.every=40",
        "optimizer.warmup_steps=5",
    ]
    cfg = load_experiment(config, overrides)
    trainer = Trainer(cfg, show_progress=False, log=lambda _: None)
    result = trainer.run()
    trainer.close()
    losses = train_losses(run_dir)
    assert losses[40] < losses[5] - 0.3, losses
    assert np.isfinite(result["validation"]["loss"])


def test_checkpoint_of_an_older_format_is_refused_clearly(tmp_path, monkeypatch):
    """Format 1 stored per-layer parameters; reading it into stacked blocks must not half-work."""
    from jaxformer.training import checkpoint as ckpt_lib

    mesh = shard_lib.make_mesh(shard_lib.MeshConfig(shape=(1, 1, 1)), jax.devices()[:1])
    _, state = build_state(
        models.preset("gpt-tiny"), optax.sgd(0.1), mesh, shard_lib.DEFAULT_RULES, seed=0
    )
    monkeypatch.setattr(ckpt_lib, "FORMAT_VERSION", 1)
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(3, state, config={}, tokenizer_model=b"tok", data_state={}, workload="pretraining")
    ckpt.wait()
    monkeypatch.setattr(ckpt_lib, "FORMAT_VERSION", 2)
    with pytest.raises(
        ckpt_lib.CheckpointError, match="has format 1; this jaxformer reads format 2"
    ):
        Checkpointer(str(tmp_path), create=False).read_meta()
