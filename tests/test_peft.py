"""LoRA adapters out to and in from Hugging Face PEFT: PeftModel on the converted base gives our
logits; an adapter directory reads back into the same adapters. Skipped without torch/peft."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


from test_convert import _bert_config, _gpt2, _t5  # noqa: E402
from test_convert_decoders import hf_model  # noqa: E402
from test_lora import pretrained_gpt  # noqa: E402, F401  (a fixture)

from jaxformer import convert, lora  # noqa: E402
from jaxformer.convert import peft as peft_io  # noqa: E402

tf.logging.set_verbosity_error()
TOKENS = np.random.default_rng(0).integers(0, 96, (2, 10))


def _hf(name):
    if name == "gpt2":
        return _gpt2()
    if name == "bert":
        torch.manual_seed(0)
        return tf.BertForSequenceClassification(_bert_config()).eval()
    if name == "t5":
        return _t5("v1.1")
    classes = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "gemma2": "Gemma2Config"}
    options = {"gemma2": dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=24)}
    return hf_model(classes[name], **options.get(name, {}))


def _adapted(hf, targets, rank=4):
    model, cfg = convert.from_hf(hf)
    lcfg = lora.LoraConfig(targets=targets, rank=rank, alpha=8.0, base_dtype="float32")
    lora.apply_lora(model, lcfg, seed=1)
    for i, module in enumerate(lora.adapted(model).values()):  # non-zero B: the adapters act
        b = module.lora_b[...]
        module.lora_b.set_value(0.2 * jax.random.normal(jax.random.key(i), b.shape))
    model.eval()
    return model, cfg, lcfg


def _ours(model, name):
    tokens = jnp.asarray(TOKENS)
    if name == "bert":  # the classifier (BertForSequenceClassification)
        return np.asarray(model.classify(tokens), np.float32)
    out = model(tokens, tokens) if name == "t5" else model(tokens)
    return np.asarray(out, np.float32)


def _theirs(model, name):
    with torch.no_grad():
        tokens = torch.tensor(TOKENS)
        if name == "t5":
            return model(input_ids=tokens, decoder_input_ids=tokens).logits.numpy()
        return model(input_ids=tokens).logits.numpy()


@pytest.mark.parametrize(
    "name, targets",
    [
        ("llama", ("all-linear",)),
        ("gpt2", ("self_attn.query", "self_attn.value")),  # two of c_attn's three parts
        ("qwen2", ("self_attn.query", "self_attn.value", "mlp.down")),
        ("gemma2", ("all-linear",)),
        ("bert", ("all-linear",)),
        ("t5", ("all-linear",)),
    ],
)
def test_peft_model_gives_our_logits_and_reads_back(name, targets, tmp_path):
    hf = _hf(name)
    model, cfg, lcfg = _adapted(hf, targets)
    ours = _ours(model, name)
    base = _ours(peft_io.base_model(model), name)
    assert float(np.max(np.abs(ours - base))) > 1e-3  # the adapters change the logits
    out = peft_io.save_adapter(model, cfg, lcfg, str(tmp_path / "adapter"), base_model="tiny")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    theirs = _theirs(peft.PeftModel.from_pretrained(hf, out).eval(), name)
    err = float(np.max(np.abs(ours - theirs)))
    print(f"{name} {targets}: max |ours - PEFT| = {err:.2e}")
    assert err <= 1e-4

    # In: the adapter directory builds the same LoRA config and adapters on a fresh base.
    fresh, cfg2 = convert.from_hf(_hf(name))  # PeftModel wrapped hf's modules in place
    lcfg2 = peft_io.lora_config_from_peft(out, cfg2)
    assert (lcfg2.rank, lcfg2.alpha) == (4, 8.0)
    lora.apply_lora(fresh, dataclasses.replace(lcfg2, base_dtype="float32"), seed=7)
    # (c_attn adapts query, key and value together: one left out reads back with B = 0)
    assert set(lora.adapted(model)) <= set(peft_io.load_adapter(fresh, cfg2, out))
    fresh.eval()
    np.testing.assert_allclose(_ours(fresh, name), _ours(model, name), atol=1e-5, rtol=0)


def test_a_hub_style_fused_c_attn_adapter_reads_exactly(tmp_path):
    """An adapter PEFT made on GPT-2's fused c_attn (one A for q, k and v) reads back exactly."""
    hf = _gpt2()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])
    pm = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    pm.save_pretrained(tmp_path / "hub")
    theirs = _theirs(pm.eval(), "gpt2")
    model, cfg = convert.from_hf(_gpt2())
    lcfg = peft_io.lora_config_from_peft(str(tmp_path / "hub"), cfg)
    assert lcfg.targets == (
        "blocks.mlp.up",
        "blocks.self_attn.key",
        "blocks.self_attn.query",
        "blocks.self_attn.value",
    )
    lora.apply_lora(model, dataclasses.replace(lcfg, base_dtype="float32"))
    peft_io.load_adapter(model, cfg, str(tmp_path / "hub"))
    model.eval()
    np.testing.assert_allclose(_ours(model, "gpt2"), theirs, atol=1e-4, rtol=0)


def test_bad_adapter_directories_are_clear(tmp_path):
    model, cfg = convert.from_hf(_gpt2())
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        peft_io.lora_config_from_peft(str(tmp_path), cfg)
    lcfg = lora.LoraConfig(targets=("self_attn.query",), train_also=("head",))
    lora.apply_lora(model, lcfg)
    with pytest.raises(ValueError, match="train_also"):
        peft_io.save_adapter(model, cfg, lcfg, str(tmp_path / "a"))


@pytest.mark.slow  # a 2-step LoRA run (~45 s here)
def test_to_hf_of_a_lora_run_writes_a_peft_directory(pretrained_gpt, stdlib_data_dir, tmp_path):  # noqa: F811
    """`python -m jaxformer.convert to-hf RUN OUT --base-out BASE` on a trained LoRA run."""
    from flax import nnx
    from test_lora import QUIET, _lora_finetune

    from jaxformer.convert.__main__ import main as convert_main
    from jaxformer.training.finetune import Finetuning, load_lora_run
    from jaxformer.training.loop import Trainer

    run = str(tmp_path / "ft")
    cfg, meta = _lora_finetune(pretrained_gpt, stdlib_data_dir, run, 2)
    trainer = Trainer(cfg, Finetuning(meta), **QUIET)
    trainer.run()
    trainer.close()
    out, base = str(tmp_path / "adapter"), str(tmp_path / "base")
    assert convert_main(["to-hf", run, out, "--base-out", base]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base
    model, _ = load_lora_run(run)
    hf = tf.AutoModelForCausalLM.from_pretrained(base).eval()
    theirs = _theirs(peft.PeftModel.from_pretrained(hf, out).eval(), "gpt2")
    err = float(np.max(np.abs(_ours(model, "gpt2") - theirs)))
    print(f"LoRA run -> PEFT: max |ours - PEFT| = {err:.2e}")
    assert err <= 1e-4
    assert convert_main(["to-hf", pretrained_gpt, str(tmp_path / "x"), "--base-out", base]) == 2

    # In: a LoRA run on the converted base starts from the PEFT adapters (same logits) and trains.
    # (the fixture's tokenizer is a jaxformer sentencepiece model: HF cannot hold it, so it is
    # given again when converting the base back)
    base_run, more = str(tmp_path / "base_run"), str(tmp_path / "more")
    tok = os.path.join(os.path.dirname(pretrained_gpt), "tok.model")
    assert convert_main(["from-hf", base, base_run, "--tokenizer", tok]) == 0
    extra = [f"finetune.lora.from_peft={out}"]
    cfg, meta = _lora_finetune(base_run, stdlib_data_dir, more, 2, extra)  # step 0: lr 0
    trainer = Trainer(cfg, Finetuning(meta), **QUIET)
    started = nnx.merge(trainer.graphdef, trainer.state)[0]
    started.eval()
    np.testing.assert_allclose(_ours(started, "gpt2"), _ours(model, "gpt2"), atol=1e-5, rtol=0)
    trainer.run()
    trainer.close()
    trained, _ = load_lora_run(more)
    assert float(np.max(np.abs(_ours(trained, "gpt2") - _ours(model, "gpt2")))) > 0
