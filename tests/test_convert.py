"""Hugging Face interop: logit parity with padding, lossless round trips, greedy generation, errors.

The HF models are randomly initialised from tiny configs (no downloads). Skipped without torch.
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jaxformer import convert  # noqa: E402
from jaxformer.convert import common  # noqa: E402
from jaxformer.convert.__main__ import main as cli  # noqa: E402
from jaxformer.training.checkpoint import Checkpointer  # noqa: E402

tf.logging.set_verbosity_error()
V, B, S, T = 96, 3, 12, 9
ATOL = 1e-4
RNG = np.random.default_rng(0)
TOKENS = RNG.integers(0, V, (B, S))
TYPES = RNG.integers(0, 2, (B, S))
DEC_TOKENS = RNG.integers(0, V, (B, T))
# Right padding: rows 1 and 2 are shorter.
MASK = np.ones((B, S), np.int64)
MASK[1, 7:], MASK[2, 3:] = 0, 0
DEC_MASK = np.ones((B, T), np.int64)
DEC_MASK[1, 5:] = 0


def _gpt2(**kw):
    torch.manual_seed(0)
    cfg = dict(
        vocab_size=V,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=V - 1,
        eos_token_id=V - 1,
    )
    return tf.GPT2LMHeadModel(tf.GPT2Config(**{**cfg, **kw})).eval()


def _bert_config(**kw):
    return tf.BertConfig(
        **{
            **dict(
                vocab_size=V,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=32,
                num_labels=3,
            ),
            **kw,
        }
    )


def _t5(version):
    torch.manual_seed(0)
    cfg = tf.T5Config(
        vocab_size=V,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        decoder_start_token_id=0,
        feed_forward_proj="relu" if version == "v1.0" else "gated-gelu",
        tie_word_embeddings=version == "v1.0",
    )
    model = tf.T5ForConditionalGeneration(cfg).eval()
    if version == "v1.1":  # v1.1 has its own lm_head (transformers 5 ties it unless told not to)
        model.lm_head.weight = torch.nn.Parameter(torch.randn(V, 32))
    return model


@pytest.fixture(scope="module")
def hf_models():
    torch.manual_seed(0)
    return {
        "gpt2": _gpt2(),
        "bert_mlm": tf.BertForMaskedLM(_bert_config()).eval(),
        "bert_cls": tf.BertForSequenceClassification(_bert_config()).eval(),
        "t5_v1.0": _t5("v1.0"),
        "t5_v1.1": _t5("v1.1"),
    }


def hf_logits(name, hf):
    t = torch.tensor
    with torch.no_grad():
        if name == "gpt2":
            return hf(t(TOKENS), attention_mask=t(MASK)).logits.numpy()
        if name.startswith("bert"):
            return hf(t(TOKENS), attention_mask=t(MASK), token_type_ids=t(TYPES)).logits.numpy()
        return hf(
            input_ids=t(TOKENS),
            attention_mask=t(MASK),
            decoder_input_ids=t(DEC_TOKENS),
            decoder_attention_mask=t(DEC_MASK),
        ).logits.numpy()


def our_logits(name, model):
    j = jnp.asarray
    if name == "gpt2":  # causal + right padding: real tokens never see the padding
        return np.asarray(model(j(TOKENS)))
    if name == "bert_mlm":
        return np.asarray(model(j(TOKENS), attention_mask=j(MASK), token_types=j(TYPES)))
    if name == "bert_cls":
        return np.asarray(model.classify(j(TOKENS), attention_mask=j(MASK), token_types=j(TYPES)))
    return np.asarray(
        model(j(TOKENS), j(DEC_TOKENS), encoder_mask=j(MASK), decoder_mask=j(DEC_MASK))
    )


def valid(name):
    """Positions whose logits are defined (HF computes garbage for padded GPT-2 queries)."""
    if name == "gpt2":
        return MASK.astype(bool)
    if name.startswith("t5"):
        return DEC_MASK.astype(bool)
    return Ellipsis


NAMES = ["gpt2", "bert_mlm", "bert_cls", "t5_v1.0", "t5_v1.1"]


@pytest.mark.parametrize("name", NAMES)
def test_logit_parity(hf_models, name):
    model, cfg = convert.from_hf(hf_models[name])
    ours, ref = our_logits(name, model), hf_logits(name, hf_models[name])
    assert ours.shape == ref.shape
    diff = np.abs(ours - ref)[valid(name)].max()
    print(f"{name}: max abs logit difference {diff:.2e}")
    assert diff < ATOL
    if name == "t5_v1.0":
        assert cfg.tie_embeddings and cfg.scale_tied_logits and cfg.mlp == "relu"
    if name == "t5_v1.1":
        assert not cfg.tie_embeddings and not cfg.scale_tied_logits and cfg.mlp == "geglu"


@pytest.mark.parametrize("name", NAMES)
def test_out_and_back_in(hf_models, name, tmp_path):
    model, cfg = convert.from_hf(hf_models[name])
    head = "classification" if name == "bert_cls" else None
    out = convert.to_hf(model, cfg, tmp_path / "hf", head=head)
    cls = type(hf_models[name])
    reloaded, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    ref = hf_logits(name, hf_models[name])
    np.testing.assert_allclose(
        hf_logits(name, reloaded.eval())[valid(name)], ref[valid(name)], atol=ATOL
    )
    again, cfg2 = convert.from_hf(out)
    assert cfg2 == cfg
    before, after = common.flat_params(model), common.flat_params(again)
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)


def test_directory_input_equals_in_memory(hf_models, tmp_path):
    hf = hf_models["bert_cls"]
    hf.save_pretrained(tmp_path)
    a, cfg_a = convert.from_hf(hf)
    b, cfg_b = convert.from_hf(str(tmp_path))
    assert cfg_a == cfg_b and cfg_a.num_labels == 3
    for (k, x), y in zip(common.flat_params(a).items(), common.flat_params(b).values()):
        if not k.startswith("mlm_"):  # absent from the checkpoint: our (seeded) init
            np.testing.assert_array_equal(x, y, err_msg=k)


def _greedy(step, buffer, start, n):
    out = []
    for i in range(n):
        token = int(np.argmax(np.asarray(step(jnp.asarray(buffer)))[0, start + i - 1]))
        buffer[0, start + i] = token
        out.append(token)
    return out


def _hf_new(generated, prompt_len, n, eos):
    new = list(generated[prompt_len:])
    assert len(new) == n or new[-1] == eos  # HF stops early only at EOS
    return new


def test_greedy_generation_gpt2(hf_models):
    hf, n, prompt = hf_models["gpt2"], 10, [5, 17, 42, 8]
    model, _ = convert.from_hf(hf)
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt)),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=V - 1,
        )[0].tolist()
    buffer = np.zeros((1, len(prompt) + n), np.int32)
    buffer[0, : len(prompt)] = prompt
    step = nnx.jit(lambda m, x: m(x))
    ours = _greedy(lambda x: step(model, x), buffer, len(prompt), n)
    new = _hf_new(ref, len(prompt), n, V - 1)
    assert ours[: len(new)] == new


def test_greedy_generation_t5(hf_models):
    hf, n = hf_models["t5_v1.0"], 8
    model, _ = convert.from_hf(hf)
    src = TOKENS[:1, :6]
    with torch.no_grad():
        # use_cache=False: transformers' cache sizes itself by the encoder depth (3 != 2 here)
        ref = hf.generate(
            torch.tensor(src),
            attention_mask=torch.ones(1, 6),
            max_new_tokens=n,
            do_sample=False,
            use_cache=False,
        )[0].tolist()
    assert ref[0] == 0  # decoder start
    encoded = model.encode(jnp.asarray(src))
    step = nnx.jit(lambda m, enc, x: m.decoder_logits(x, enc))
    buffer = np.zeros((1, n + 1), np.int32)
    ours = _greedy(lambda x: step(model, encoded, x), buffer, 1, n)
    new = _hf_new(ref, 1, n, hf.config.eos_token_id)
    assert ours[: len(new)] == new


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "build, match",
    [
        (
            lambda: tf.OPTForCausalLM(
                tf.OPTConfig(
                    vocab_size=V,
                    hidden_size=16,
                    num_hidden_layers=1,
                    ffn_dim=32,
                    num_attention_heads=2,
                    word_embed_proj_dim=16,
                    max_position_embeddings=32,
                )
            ),
            "unsupported .* type 'opt'",
        ),
        (lambda: _gpt2(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (lambda: _gpt2(activation_function="silu"), "activation_function='silu'"),
        (
            lambda: tf.BertForMaskedLM(_bert_config(position_embedding_type="relative_key")),
            "position_embedding_type='relative_key'",
        ),
        (lambda: tf.BertForMaskedLM(_bert_config(is_decoder=True)), "is_decoder"),
    ],
)
def test_unrepresentable_models_are_refused(build, match):
    with pytest.raises(ValueError, match=match):
        convert.from_hf(build())


def test_bad_directories(tmp_path, hf_models):
    with pytest.raises(ValueError, match="not a directory"):
        convert.from_hf(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no config.json"):
        convert.from_hf(str(tmp_path))
    hf_models["gpt2"].config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no weights in"):
        convert.from_hf(str(tmp_path))


def test_unexpected_weights_are_refused(hf_models, tmp_path):
    hf_models["gpt2"].save_pretrained(tmp_path)
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "model.safetensors"
    weights = load_file(path)
    weights["transformer.h.0.attn.q_norm.weight"] = np.ones(32, np.float32)
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no place for.*q_norm"):
        convert.from_hf(str(tmp_path))


def test_to_hf_refuses_unrepresentable_configs_and_full_directories(hf_models, tmp_path):
    from jaxformer import models

    with nnx.use_eager_sharding(False):
        llama = models.create(models.preset("llama-tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="GPT-2.*position='rope'"):
        convert.to_hf(llama, llama.config, tmp_path / "a", architecture="gpt2")
    model, cfg = convert.from_hf(hf_models["gpt2"])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        convert.to_hf(model, cfg, tmp_path / "b")
    assert os.listdir(tmp_path / "b") == ["keep.txt"]


# ----------------------------------------------------------------------------- command line


def test_command_line_round_trip(hf_models, tmp_path, capsys):
    hf = hf_models["t5_v1.1"]
    hf.save_pretrained(tmp_path / "hf")
    assert cli(["from-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    meta = Checkpointer(str(tmp_path / "run"), create=False).read_meta()
    assert meta["step"] == 0 and meta["config"]["model"]["family"] == "encoder_decoder"
    assert meta["tokenizer"] == b""  # the HF directory ships no sentencepiece model
    assert cli(["from-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 2  # never overwrites
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert cli(["to-hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    back = tf.T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ref = hf_logits("t5_v1.1", hf)
    np.testing.assert_allclose(hf_logits("t5_v1.1", back), ref, atol=ATOL)
    assert cli(["to-hf", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert "no checkpoints" in capsys.readouterr().err


def test_core_never_imports_torch():
    code = (
        "import sys, jaxformer, jaxformer.models, jaxformer.layers, jaxformer.training; "
        "bad = [m for m in ('torch', 'transformers', 'jaxformer.convert') "
        "if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}
    )


def test_converted_checkpoint_fine_tunes_and_evaluates(stdlib_data_dir, stdlib_tokenizer, tmp_path):
    from jaxformer.training.evaluate import run_eval
    from jaxformer.training.finetune import run_finetune

    hf = tf.BertForSequenceClassification(
        _bert_config(vocab_size=stdlib_tokenizer.vocab_size, max_position_embeddings=64)
    ).eval()
    hf.save_pretrained(tmp_path / "hf")
    stdlib_tokenizer.save(str(tmp_path / "tok.model"))
    assert (
        cli(
            [
                "from-hf",
                str(tmp_path / "hf"),
                str(tmp_path / "run"),
                "--tokenizer",
                str(tmp_path / "tok.model"),
            ]
        )
        == 0
    )
    run_dir = str(tmp_path / "finetuned")
    overrides = [
        f"task.data_dir={stdlib_data_dir}",
        "task.max_input_len=64",
        "train.steps=3",
        "train.eval_every=0",
        "optimizer.warmup_steps=1",
        "checkpoint.async_save=false",
        "model.pooling=first",  # what BertForSequenceClassification pools
        f"run.dir={run_dir}",
    ]
    assert (
        run_finetune(str(tmp_path / "run"), None, "configs/finetune/code_package.yaml", overrides)
        == 0
    )
    assert Checkpointer(run_dir, create=False).latest_step == 3
    assert run_eval(run_dir, None, None, str(tmp_path / "report.json"), False, None) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"accuracy", "macro_f1"} <= set(report["metrics"])
    # The fine-tuned run goes back out as the classifier it now is, with its task's labels.
    assert cli(["to-hf", run_dir, str(tmp_path / "out")]) == 0
    back = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == "BertForSequenceClassification"
    from jaxformer.convert.runs import load_run

    model, cfg = load_run(run_dir)
    assert back.config.num_labels == cfg.num_labels
    tokens = TOKENS % stdlib_tokenizer.vocab_size
    ours = model.classify(jnp.asarray(tokens), attention_mask=jnp.asarray(MASK, bool))
    with torch.no_grad():
        theirs = back(
            input_ids=torch.tensor(tokens), attention_mask=torch.tensor(MASK)
        ).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=ATOL)
    # Fine-tuning moved the model away from the converted checkpoint.
    with torch.no_grad():
        before = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(MASK)).logits
    assert before.shape != theirs.shape or not np.allclose(before.numpy(), theirs, atol=1e-3)
    mean_pooled = dataclasses.replace(cfg, pooling="mean")
    with pytest.raises(ValueError, match="pooling='mean' cannot be written"):
        convert.to_hf(model, mean_pooled, tmp_path / "mean", head="classification")
