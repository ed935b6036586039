"""LoRA adapters out to and in from Hugging Face PEFT: PeftModel on the converted base gives our
logits; an adapter directory reads back into the same adapters. Skipped without torch/peft."""

import dataclasses
import json
import os
import re

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


def test_a_bert_classifier_trained_in_full_goes_to_modules_to_save_and_back(tmp_path):
    """finetune.lora.train_also=[pooler, classifier]: PEFT's modules_to_save holds them; PeftModel
    on the original base (its own random head) gives our logits; reading back restores the head."""
    hf = _hf("bert")
    model, cfg = convert.from_hf(hf)
    lcfg = lora.LoraConfig(
        targets=("all-linear",),
        rank=4,
        alpha=8.0,
        base_dtype="float32",
        train_also=("pooler", "classifier"),
    )
    lora.apply_lora(model, lcfg, seed=1)
    for i, module in enumerate(lora.adapted(model).values()):
        module.lora_b.set_value(0.2 * jax.random.normal(jax.random.key(i), module.lora_b.shape))
    for i, var in enumerate((model.classifier.kernel, model.classifier.bias, model.pooler.kernel)):
        var.set_value(var[...] + 0.3 * jax.random.normal(jax.random.key(50 + i), var.shape))
    model.eval()
    ours = _ours(model, "bert")
    out = peft_io.save_adapter(
        model, cfg, lcfg, str(tmp_path / "adapter"), base_model="tiny", head="classification"
    )
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["bert.pooler.dense", "classifier"]
    from safetensors.numpy import load_file

    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert "base_model.model.bert.pooler.dense.weight" in keys
    peft_model = peft.PeftModel.from_pretrained(hf, out).eval()
    err = float(np.max(np.abs(ours - _theirs(peft_model, "bert"))))
    print(f"bert LoRA + modules_to_save: max |ours - PEFT| = {err:.2e}")
    assert err <= 1e-4

    # In: a fresh base (its own head) gets the trained head back, and train_also to train it on.
    fresh, cfg2 = convert.from_hf(_hf("bert"))
    before = np.asarray(fresh.classifier.kernel[...])
    lcfg2 = peft_io.lora_config_from_peft(out, cfg2)
    assert lcfg2.train_also == ("classifier", "pooler")
    lora.apply_lora(fresh, dataclasses.replace(lcfg2, base_dtype="float32"), seed=7)
    loaded = peft_io.load_adapter(fresh, cfg2, out)
    assert {"classifier.kernel", "classifier.bias", "pooler.kernel", "pooler.bias"} <= set(loaded)
    fresh.eval()
    head = np.asarray(fresh.classifier.kernel[...])
    assert not np.allclose(head, before)
    np.testing.assert_allclose(head, np.asarray(model.classifier.kernel[...]), atol=1e-6)
    np.testing.assert_allclose(_ours(fresh, "bert"), ours, atol=1e-5, rtol=0)


def test_bad_adapter_directories_are_clear(tmp_path):
    model, cfg = convert.from_hf(_gpt2())
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        peft_io.lora_config_from_peft(str(tmp_path), cfg)
    # train_also leaves no whole Hugging Face module holds are refused by name, nothing written.
    cases = [
        (
            ("mlp.up",),
            ("blocks.self_attn.query",),
            r"blocks.self_attn.query.\w+ is one part of the fused .*c_attn",
        ),
        (("mlp.up",), ("embed",), "embed.token_embed.embedding is tied"),
        (("self_attn.query",), ("blocks.self_attn",), "also carries LoRA adapters"),
    ]
    for targets, train_also, message in cases:
        model, cfg = convert.from_hf(_gpt2())
        lcfg = lora.LoraConfig(targets=targets, train_also=train_also)
        lora.apply_lora(model, lcfg)
        with pytest.raises(ValueError, match=message):
            peft_io.save_adapter(model, cfg, lcfg, str(tmp_path / "a"))
        assert not (tmp_path / "a").exists()


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


# ----------------------------------------------------------------------------- the README's block

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_SECTION = "## Fine-tuning on one GPU"


def readme_peft_steps() -> list[tuple[str, str]]:
    """The PEFT block of the README section: ("command", line) or ("python", heredoc body)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = f.read().split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if "from_peft" in b]
    steps, lines = [], iter(block.splitlines())
    for line in lines:
        heredoc = re.fullmatch(r"python - <<'(\w+)'", line.strip())
        if heredoc:
            body = []
            for inner in lines:
                if inner.strip() == heredoc.group(1):
                    break
                body.append(inner)
            steps.append(("python", "\n".join(body)))
        elif line.strip():
            steps.append(("command", line))
    return steps


def _script_main(name: str):
    """main() of a command-line script at the repository root (train.py, finetune.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_script_{name}", os.path.join(ROOT, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _in_tmp(text: str, tmp_path) -> str:
    return re.sub(r"(?<![\w/])(runs|out)/", lambda m: f"{tmp_path}/{m.group(1)}/", text)


@pytest.mark.slow  # two tiny LoRA runs, conversions, torch: ~40 s of CPU (90 s on a loaded 2-core host)
def test_readme_peft_commands_run_as_written(stdlib_data_dir, stdlib_tokenizer, tmp_path):
    """The README's PEFT block as written, with tiny settings added: a LoRA classifier (head in
    train_also) -> to-hf (PEFT dir + base) -> PeftModel gives our logits -> the base back as a run
    -> a LoRA run that starts from the PEFT adapter (step 0 has learning rate 0: its one step
    saves the weights it started from)."""
    import shlex

    from jaxformer.convert.__main__ import main as convert_main
    from jaxformer.training.finetune import load_lora_run

    steps = readme_peft_steps()
    assert [kind for kind, _ in steps] == ["command", "command", "python", "command", "command"]
    # The base the block starts from, as `python train.py --config configs/bert_tiny.yaml` leaves
    # runs/bert_tiny (checkpoint and tokenizer.model), untrained: its training is not the point.
    from flax import nnx

    from jaxformer import models
    from jaxformer.convert.runs import save_run

    base_dir = str(tmp_path / "runs/bert_tiny")
    cfg = dataclasses.replace(models.preset("bert-tiny"), vocab_size=stdlib_tokenizer.vocab_size)
    tokenizer = stdlib_tokenizer.serialized_model()
    save_run(models.create(cfg, rngs=nnx.Rngs(0)), cfg, base_dir, tokenizer_model=tokenizer)
    stdlib_tokenizer.save(os.path.join(base_dir, "tokenizer.model"))
    tiny = [
        f"task.data_dir={stdlib_data_dir}",
        "task.max_input_len=64",
        "task.batch_size=8",
        "task.max_examples=40",
        "train.eval_every=0",
        "train.eval_batches=1",
        "optimizer.warmup_steps=1",
        "checkpoint.async_save=false",
    ]
    finetunes = iter(["train.steps=2", "train.steps=1"])
    for kind, text in steps:
        text = _in_tmp(text, tmp_path)
        if kind == "python":
            namespace: dict = {}
            exec(compile(text, "README.md PEFT snippet", "exec"), namespace)
            ids = eval(re.search(r"input_ids=torch.tensor\((.*?)\)\)", text).group(1))
            with torch.no_grad():
                theirs = namespace["model"](input_ids=torch.tensor(ids)).logits.numpy()
            continue
        args = shlex.split(text)
        if args[1] == "-m":
            assert args[2] == "jaxformer.convert", text
            assert convert_main(args[3:]) == 0, text
        else:
            assert args[1] == "finetune.py", text
            extra = [*tiny, next(finetunes)]
            assert _script_main("finetune.py")(args[2:] + extra) == 0, text

    ours, _ = load_lora_run(str(tmp_path / "runs/bert-lora"))
    logits = np.asarray(ours.classify(jnp.asarray(ids)), np.float32)
    err = float(np.max(np.abs(logits - theirs)))
    print(f"README block: max |ours - PEFT| = {err:.2e}")
    assert err <= 1e-4
    started, _ = load_lora_run(str(tmp_path / "runs/bert-lora-2"))
    again = np.asarray(started.classify(jnp.asarray(ids)), np.float32)
    np.testing.assert_allclose(again, logits, atol=1e-5, rtol=0)
