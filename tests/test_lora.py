"""LoRA / QLoRA: exact no-op at start, merging, quantization error, adapter-only training, meshes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import lora, models, quantize_nf4
from jaxformer import sharding as shard_lib
from jaxformer.training.finetune import Finetuning, load_finetune
from jaxformer.training.loop import Trainer

QUIET = dict(show_progress=False, log=lambda _: None)
ALL = lora.LoraConfig(targets=("all-linear",), base_dtype="float32")


def _inputs(preset: str, tokens):
    return (tokens, tokens) if preset == "t5-tiny" else (tokens,)


@nnx.jit(static_argnums=2)
def _forward(model, tokens, two: bool):
    return model(tokens, tokens) if two else model(tokens)


def _perturb(model, seed: int = 3) -> None:
    """Non-zero B everywhere, so the adapters change the outputs."""
    for i, module in enumerate(lora.adapted(model).values()):
        b = module.lora_b[...]
        module.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(seed + i), b.shape))


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny", "bert-tiny", "t5-tiny"])
def test_adapters_start_as_an_exact_no_op_and_merge_back(preset):
    model = models.create(models.preset(preset), rngs=nnx.Rngs(0))
    model.eval()
    tokens = (jnp.arange(32).reshape(2, 16) * 7) % 100
    two = preset == "t5-tiny"
    base = _forward(model, tokens, two)
    paths = lora.apply_lora(model, dataclasses.replace(ALL, dropout=0.1), seed=1)
    expected = 16 if two else (7 if preset == "llama-tiny" else 6)
    assert len(paths) == expected  # every stacked projection; not the BERT heads or pooler
    model.eval()
    np.testing.assert_array_equal(np.asarray(_forward(model, tokens, two)), np.asarray(base))
    _perturb(model)
    adapted = _forward(model, tokens, two)
    assert float(jnp.max(jnp.abs(adapted - base))) > 1e-3  # the adapters do act
    merged = lora.merge_lora(model)
    assert not lora.adapted(merged)
    np.testing.assert_allclose(
        np.asarray(_forward(merged, tokens, two)), np.asarray(adapted), atol=1e-5, rtol=0
    )


def test_layout_and_targets():
    model = models.create(models.preset("t5-tiny"), rngs=nnx.Rngs(0))
    cfg = lora.LoraConfig(targets=("self_attn.query", "mlp.down"), rank=4)
    paths = lora.apply_lora(model, cfg)
    assert paths == [
        "decoder_blocks.mlp.down",
        "decoder_blocks.self_attn.query",
        "encoder_blocks.mlp.down",
        "encoder_blocks.self_attn.query",
    ]
    q = model.encoder_blocks.self_attn.query
    assert isinstance(q.lora_a, nnx.LoRAParam) and q.lora_a[...].shape == (2, 64, 4)
    assert q.lora_a.get_metadata()["out_sharding"] == ("layers", "embed", "lora_rank")
    assert q.lora_b[...].shape == (2, 4, 4, 16)
    assert q.lora_b.get_metadata()["out_sharding"] == ("layers", "lora_rank", "heads", "head_dim")
    assert q.kernel[...].dtype == jnp.bfloat16 and not np.any(np.asarray(q.lora_b[...]))
    down = model.decoder_blocks.mlp.down
    assert down.lora_a.get_metadata()["out_sharding"] == ("layers", "mlp", "lora_rank")
    assert model.decoder_blocks.cross_attn.query.kernel[...].dtype == jnp.bfloat16  # frozen base
    bert = models.create(models.preset("bert-tiny"), rngs=nnx.Rngs(0))
    cfg = lora.LoraConfig(targets=("self_attn.value",), train_also=("classifier",))
    lora.apply_lora(bert, cfg)
    trained = {
        ".".join(map(str, k))
        for k, _ in nnx.to_flat_state(nnx.state(bert, lora.trainable_filter(cfg)))
    }
    assert trained == {
        "blocks.self_attn.value.lora_a",
        "blocks.self_attn.value.lora_b",
        "classifier.bias",
        "classifier.kernel",
    }
    assert bert.classifier.kernel[...].dtype == jnp.float32  # trained in full: not cast
    assert bert.pooler.kernel[...].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"'self_attn.qq' matches no projection.*self_attn.key"):
        lora.apply_lora(
            models.create(models.preset("gpt-tiny"), rngs=nnx.Rngs(0)),
            lora.LoraConfig(targets=("self_attn.qq",)),
        )


def test_quantized_bases_are_within_their_stated_error():
    w = jax.random.normal(jax.random.key(0), (2, 256, 8, 32))  # stacked per-head kernel
    nf4 = quantize_nf4.dequantize(quantize_nf4.quantize(w, 1), w.shape[1:])
    rel = float(jnp.sqrt(jnp.mean((nf4 - w) ** 2) / jnp.mean(w**2)))
    # Measured 0.0919 on these N(0, 1) weights; with exact (not double-quantized) absmaxes 0.0919
    # too: the 4-bit levels dominate the error.
    assert 0.08 < rel < 0.105, rel
    q = quantize_nf4.quantize(w, 1)
    bits = sum(np.asarray(x).nbytes for x in q) * 8 / w.size
    assert bits < 4.2, bits  # 4 + 8/64 + 32/(64*256), plus the per-layer offset
    # In a model: the QLoRA projection's dequantized base, int8 and nf4, against the float kernel.
    for kind, bound in (("int8", 0.01), ("nf4", 0.105)):
        model = models.create(models.preset("llama-tiny"), rngs=nnx.Rngs(0))
        kernel = model.blocks.self_attn.out.kernel[...]
        lora.apply_lora(model, lora.LoraConfig(targets=("self_attn.out",), quantize=kind))
        deq = model.blocks.self_attn.out.base_kernel(jnp.float32)
        rel = float(jnp.sqrt(jnp.mean((deq - kernel) ** 2) / jnp.mean(kernel**2)))
        assert rel < bound, (kind, rel)  # measured: int8 0.0060, nf4 0.0916
        assert not nnx.state(model.blocks.self_attn.out, nnx.Param).get("kernel")


def _lora_loss(model, tokens):
    logits = model(tokens)
    labels = jnp.roll(tokens, -1, axis=1)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


@nnx.jit
def _sgd_step(model, tokens):
    diff = nnx.DiffState(0, nnx.LoRAParam)
    loss, grads = nnx.value_and_grad(_lora_loss, argnums=diff)(model, tokens)
    params = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(lambda p, g: p - 0.5 * g, params, grads))
    return loss, _lora_loss(model, tokens)


def test_lora_on_a_2x2x2_mesh_equals_one_device():
    cfg = dataclasses.replace(models.preset("llama-tiny"), dropout_rate=0.0)
    lcfg = lora.LoraConfig(targets=("self_attn.query", "mlp.down"), quantize="nf4")

    def build():
        model = models.create(cfg, rngs=nnx.Rngs(0))
        lora.apply_lora(model, lcfg, seed=0)
        _perturb(model)
        return model

    tokens = (jnp.arange(8 * 16).reshape(8, 16) * 5) % cfg.vocab_size
    single = build()
    _, after_single = _sgd_step(single, tokens)
    mesh = shard_lib.make_mesh(shard_lib.MeshConfig(shape=(2, 2, 2)))
    sharded = shard_lib.create_sharded(build, mesh, shard_lib.DEFAULT_RULES)
    a = sharded.blocks.self_attn.query.lora_a
    assert a[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    with jax.set_mesh(mesh), shard_lib.axis_rules(shard_lib.DEFAULT_RULES, mesh):
        batch = jax.device_put(tokens, shard_lib.batch_sharding(mesh, 2))
        _, after_mesh = _sgd_step(sharded, batch)
    np.testing.assert_allclose(float(after_mesh), float(after_single), rtol=1e-5)


@pytest.fixture(scope="module")
def pretrained_gpt(stdlib_data_dir, stdlib_tokenizer, tmp_path_factory):
    """A 2-step gpt-tiny pretraining run to fine-tune from."""
    from jaxformer.training.config import load_experiment

    root = tmp_path_factory.mktemp("lora_base")
    tokenizer_path = str(root / "tok.model")
    stdlib_tokenizer.save(tokenizer_path)
    cfg = load_experiment(
        None,
        [
            "model.preset=gpt-tiny",
            f"data.data_dir={stdlib_data_dir}",
            f"data.tokenizer_path={tokenizer_path}",
            "data.seq_len=64",
            "data.batch_size=8",
            "train.steps=2",
            "optimizer.warmup_steps=1",
            "train.eval_every=0",
            "train.eval_batches=1",
            "checkpoint.async_save=false",
            f"run.dir={root / 'run'}",
        ],
    )
    trainer = Trainer(cfg, **QUIET)
    trainer.run()
    trainer.close()
    return str(root / "run")


def _lora_finetune(base, data_dir, run_dir, steps, extra=()):
    overrides = [
        f"task.data_dir={data_dir}",
        f"run.dir={run_dir}",
        f"train.steps={steps}",
        "train.eval_every=0",
        "train.eval_batches=1",
        "task.batch_size=8",
        "task.max_input_len=64",
        "checkpoint.async_save=false",
        "optimizer.warmup_steps=1",
        "finetune.lora.targets=[self_attn.query,self_attn.value,mlp.up]",
        "finetune.lora.rank=4",
        "finetune.lora.dropout=0.0",
        *extra,
    ]
    return load_finetune(base, None, "configs/finetune/lora_sft.yaml", overrides)


def test_only_adapters_train_and_hold_optimizer_state(pretrained_gpt, stdlib_data_dir, tmp_path):
    cfg, meta = _lora_finetune(pretrained_gpt, stdlib_data_dir, str(tmp_path / "ft"), 2)
    trainer = Trainer(cfg, Finetuning(meta), **QUIET)
    model, optimizer = nnx.merge(trainer.graphdef, trainer.state)
    assert not trainer.workload.new_parameters
    opt_paths = {
        ".".join(str(p) for p in path if not isinstance(p, int))
        for path, _ in nnx.to_flat_state(nnx.state(optimizer.opt_state))
    }
    adapter_paths = {
        ".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    }
    assert len(adapter_paths) == 6
    # Adam's moments exist for the adapters and nothing else (plus its step counter).
    assert {p for p in opt_paths if "lora_" in p} and all(
        any(p.endswith(a) for a in adapter_paths) or "count" in p for p in opt_paths
    ), opt_paths

    def params():
        state = nnx.state(nnx.merge(trainer.graphdef, trainer.state)[0], nnx.Param)
        return {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}

    before = params()
    trainer.run()
    after = params()
    trainer.close()
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    # The base is untouched; B moves at once (A only once B is non-zero, with weight decay 0).
    assert changed <= adapter_paths, changed
    assert {p for p in adapter_paths if p.endswith("lora_b")} <= changed, changed


def test_adapter_checkpoints_resume_bit_exactly_and_evaluate(
    pretrained_gpt, stdlib_data_dir, tmp_path
):
    from data_fixtures import train_interrupted

    from jaxformer.training.finetune import load_lora_run

    def adapters(model):
        return {
            ".".join(map(str, k)): np.asarray(v[...])
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
        }

    extra = ["checkpoint.every=2", "finetune.lora.dropout=0.1"]
    whole_cfg, _ = _lora_finetune(pretrained_gpt, stdlib_data_dir, str(tmp_path / "a"), 4, extra)
    trainer = Trainer(whole_cfg, **QUIET)
    trainer.run()
    saved = trainer._saved(trainer.state)
    trainer.close()
    saved_paths = {".".join(map(str, k)) for k, _ in nnx.to_flat_state(saved[0])}
    assert saved_paths and all("lora_" in p or "rngs" in p for p in saved_paths), saved_paths
    cut_cfg, _ = _lora_finetune(pretrained_gpt, stdlib_data_dir, str(tmp_path / "b"), 4, extra)
    train_interrupted(cut_cfg, until=2)
    adapted, _ = load_lora_run(str(tmp_path / "a"))
    whole = adapters(adapted)
    # eval.py's way in: a read-only Trainer, which rebuilds base + adapters.
    reader = Trainer(cut_cfg, read_only=True, **QUIET)
    cut_model = reader.model()
    reader.close()
    cut = adapters(cut_model)
    base_kernel = np.asarray(cut_model.blocks.self_attn.query.kernel[...].astype(jnp.float32))
    assert whole.keys() == cut.keys() and len(whole) == 6
    for key in whole:
        np.testing.assert_array_equal(whole[key], cut[key], err_msg=key)
    # The read-only run rebuilt its frozen base from the pretraining run.
    from jaxformer.convert.runs import load_run

    pre_model, _ = load_run(pretrained_gpt)
    pre_kernel = np.asarray(pre_model.blocks.self_attn.query.kernel[...])
    np.testing.assert_array_equal(base_kernel, pre_kernel.astype(jnp.bfloat16).astype(np.float32))
    # merge: a plain run directory whose model equals base + adapters; generation agrees.
    from jaxformer.convert.__main__ import main as convert_main
    from jaxformer.inference import generate

    out = str(tmp_path / "merged")
    assert convert_main(["merge", str(tmp_path / "a"), out]) == 0
    merged, _ = load_run(out)
    assert lora.adapted(adapted) and not lora.adapted(merged)
    tokens = (jnp.arange(2 * 12).reshape(2, 12) * 11) % 200
    np.testing.assert_allclose(
        np.asarray(_forward(merged, tokens, False)),
        np.asarray(_forward(adapted, tokens, False)),
        atol=1e-5,
        rtol=0,
    )
    np.testing.assert_array_equal(
        np.asarray(generate(adapted, tokens[:, :4], max_new_tokens=4, method="greedy")),
        np.asarray(generate(merged, tokens[:, :4], max_new_tokens=4, method="greedy")),
    )
    assert convert_main(["merge", pretrained_gpt, str(tmp_path / "m2")]) == 2  # not a LoRA run
    # Its checkpoints hold adapters only: load_run (to-hf) refuses it, naming merge.
    from jaxformer.training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="LoRA run.*jaxformer.convert merge"):
        load_run(str(tmp_path / "a"))


def test_lora_configs_load_and_bad_options_are_clear(pretrained_gpt, stdlib_data_dir, tmp_path):
    from jaxformer.config import ConfigError, load_config
    from jaxformer.training.finetune import FinetuneExperiment

    gpu = load_config(FinetuneExperiment, "configs/finetune/lora_gpu.yaml", [])
    assert (gpu.model.dtype, gpu.model.attention_impl, gpu.model.remat) == (
        "bfloat16",
        "cudnn",
        "full",
    )
    assert gpu.finetune.lora.quantize == "nf4" and gpu.finetune.lora.targets == ("all-linear",)
    sft = load_config(FinetuneExperiment, "configs/finetune/lora_sft.yaml", [])
    assert sft.finetune.lora.enabled and sft.finetune.lora.base_dtype == "bfloat16"
    run = str(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"finetune.lora.quantize='nf5'; valid: none, int8, nf4"):
        _lora_finetune(pretrained_gpt, stdlib_data_dir, run, 2, ["finetune.lora.quantize=nf5"])
    with pytest.raises(ConfigError, match="finetune.freeze and finetune.lora.targets"):
        _lora_finetune(pretrained_gpt, stdlib_data_dir, run, 2, ["finetune.freeze=[embed]"])
