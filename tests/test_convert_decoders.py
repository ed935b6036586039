"""Llama-like Hugging Face decoders (Llama 2/3.x, Mistral, Qwen2, Qwen3, Gemma 2) in and out.

Each family is a tiny random transformers model: its float32 logits equal ours after from_hf,
to_hf writes a directory transformers loads back as the same class with the same logits, and
greedy generation matches transformers' generate(). Skipped without torch/transformers.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

import dataclasses  # noqa: E402

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jaxformer import convert, models  # noqa: E402
from jaxformer.convert import common  # noqa: E402
from jaxformer.convert.__main__ import main as cli  # noqa: E402
from jaxformer.inference import generate  # noqa: E402

tf.logging.set_verbosity_error()
V, S, NEW = 256, 16, 8
ATOL = 1e-4
TOKENS = np.random.default_rng(0).integers(0, V, (2, S))
PROMPTS = [[5, 17, 42, 8, 99, 3, 250], [7, 200, 31]]  # ours right-padded, in one batch
BASE = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)

# name: (config class, options, fields our config must have after from_hf)
CASES = {
    "llama3_untied": (
        "LlamaConfig",
        dict(
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=4.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
        dict(rope_scaling="llama3", rope_scaling_factor=4.0, tie_embeddings=False),
    ),
    "llama_linear_tied_biases": (
        "LlamaConfig",
        dict(
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=2.0),
        ),
        dict(rope_scaling="linear", rope_theta=500.0, tie_embeddings=True, use_bias=True),
    ),
    "mistral_window": (
        "MistralConfig",
        dict(sliding_window=5),
        dict(sliding_window=5, global_attention_every=None),
    ),
    "qwen2_bias": ("Qwen2Config", dict(), dict(use_bias=False, qkv_bias=True)),
    "qwen3_qk_norm": ("Qwen3Config", dict(head_dim=32), dict(qk_norm=True, head_dim=32)),
    "gemma2": (
        "Gemma2Config",
        dict(
            num_hidden_layers=4,
            head_dim=32,
            sliding_window=5,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=4.0,
            final_logit_softcapping=3.0,
        ),
        dict(
            post_norms=True,
            norm_unit_offset=True,
            embed_scale=True,
            sliding_window=5,
            global_attention_every=2,
            query_pre_attn_scalar=24.0,
            attn_logit_softcap=4.0,
            final_logit_softcap=3.0,
            mlp="geglu",
        ),
    ),
}
CLASSES = {"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM"}
CLASSES |= {"Qwen2Config": "Qwen2ForCausalLM", "Qwen3Config": "Qwen3ForCausalLM"}
CLASSES |= {"Gemma2Config": "Gemma2ForCausalLM"}


def hf_model(config_class, **options):
    """A tiny random model; every weight (norms and biases too) is perturbed, so each counts."""
    torch.manual_seed(0)
    config = getattr(tf, config_class)(**{**BASE, **options})
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
        if config.model_type == "gemma2":  # its inputs are embeddings * sqrt(hidden_size)
            model.get_input_embeddings().weight.mul_(config.hidden_size**-0.5)
    return model


def hf_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    config_class, options, expected = CASES[request.param]
    hf = hf_model(config_class, **options)
    model, cfg = convert.from_hf(hf)
    return request.param, hf, model, cfg, expected


def test_logit_parity_both_ways(case, tmp_path):
    name, hf, model, cfg, expected = case
    assert {k: getattr(cfg, k) for k in expected} == expected
    ref = hf_logits(hf)
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(TOKENS)))
    diff = np.abs(ours - ref).max()
    print(
        f"{name}: HF -> ours max abs logit difference {diff:.2e} (logits up to {np.abs(ref).max():.1f})"
    )
    assert diff < ATOL

    out = convert.to_hf(model, cfg, tmp_path / "hf")
    back, info = tf.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", output_loading_info=True
    )
    assert type(back).__name__ == type(hf).__name__
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    back_diff = np.abs(hf_logits(back.eval()) - ours).max()
    print(f"{name}: ours -> to_hf -> transformers max abs logit difference {back_diff:.2e}")
    assert back_diff < ATOL

    again, cfg2 = convert.from_hf(out)
    assert cfg2 == cfg
    before, after = common.flat_params(model), common.flat_params(again)
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)


def test_greedy_generation_matches_transformers(case):
    name, hf, model, cfg, _ = case
    hf.generation_config.eos_token_id = None  # generate exactly NEW tokens on both sides
    refs = []
    for prompt in PROMPTS:
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=NEW,
                do_sample=False,
                pad_token_id=0,
            )
        refs.append(out[0, len(prompt) :].tolist())
    lengths = np.array([len(p) for p in PROMPTS])
    batch = np.zeros((len(PROMPTS), lengths.max()), np.int32)
    for row, prompt in enumerate(PROMPTS):
        batch[row, : len(prompt)] = prompt
    ours = generate(model, jnp.asarray(batch), prompt_lengths=lengths, max_new_tokens=NEW)
    assert [len(r) for r in refs] == [NEW] * len(PROMPTS)
    assert np.asarray(ours).tolist() == refs, name


# ----------------------------------------------------------------------------- refusals


def _tiny(config_class, **options):
    small = dict(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    config = getattr(tf, config_class)(**{**small, **options})
    return tf.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    "config_class, options, match",
    [
        (
            "LlamaConfig",
            dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)),
            "rope_parameters.rope_type='dynamic'",
        ),
        ("LlamaConfig", dict(attention_bias=True, mlp_bias=False), "attention_bias=True"),
        ("LlamaConfig", dict(hidden_act="gelu"), "hidden_act='gelu'"),
        ("Qwen3Config", dict(attention_bias=True), "attention_bias=True"),
        (
            "Qwen2Config",
            dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
            "layer_types=.*use_sliding_window",
        ),
        (
            "Gemma2Config",
            dict(num_hidden_layers=3, layer_types=["full_attention"] + ["sliding_attention"] * 2),
            "layer_types=",
        ),
    ],
)
def test_unrepresentable_hf_models_are_refused(config_class, options, match):
    with pytest.raises(ValueError, match=match):
        convert.from_hf(_tiny(config_class, **options))


LLAMA = models.preset("llama-tiny")
GEMMA = dict(
    post_norms=True,
    norm_unit_offset=True,
    embed_scale=True,
    final_logit_softcap=30.0,
    mlp="geglu",
)


@pytest.mark.parametrize(
    "options, expected",
    [
        (dict(), "LlamaForCausalLM"),
        (dict(sliding_window=8), "MistralForCausalLM"),
        (dict(qkv_bias=True), "Qwen2ForCausalLM"),
        (dict(qkv_bias=True, sliding_window=8, global_attention_every=2), "Qwen2ForCausalLM"),
        (dict(qk_norm=True, head_dim=32), "Qwen3ForCausalLM"),
        (GEMMA, "Gemma2ForCausalLM"),
        (dict(GEMMA, sliding_window=8, global_attention_every=2), "Gemma2ForCausalLM"),
        (dict(use_bias=True, rope_scaling="linear", rope_scaling_factor=2.0), "LlamaForCausalLM"),
    ],
)
def test_architecture_follows_features(options, expected):
    config = convert.hf_config(dataclasses.replace(LLAMA, **options))
    assert config.architectures == [expected]


@pytest.mark.parametrize(
    "options, expected",
    [
        # Windows every layer but each second one, written as Qwen2's explicit layer_types.
        (dict(qkv_bias=True, sliding_window=5, global_attention_every=2), "Qwen2ForCausalLM"),
        # Gemma 2 with a window on every layer, and with none (no sliding layer).
        (dict(GEMMA, sliding_window=5), "Gemma2ForCausalLM"),
        (GEMMA, "Gemma2ForCausalLM"),
    ],
)
def test_feature_combinations_only_we_start_from(options, expected, tmp_path):
    cfg = dataclasses.replace(LLAMA, preset="", vocab_size=V, init_std=0.15, **options)
    model = models.create(cfg, rngs=nnx.Rngs(0))
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(TOKENS)))
    back = tf.AutoModelForCausalLM.from_pretrained(
        convert.to_hf(model, cfg, tmp_path / "hf"), attn_implementation="eager"
    )
    assert type(back).__name__ == expected
    np.testing.assert_allclose(hf_logits(back.eval()), ours, atol=ATOL)
    assert convert.from_hf(tmp_path / "hf")[1] == cfg


def test_other_families_keep_their_architectures():
    assert convert.hf_config(models.preset("gpt-tiny")).architectures == ["GPT2LMHeadModel"]
    assert convert.hf_config(models.preset("bert-tiny")).architectures == ["BertForMaskedLM"]
    t5 = convert.hf_config(models.preset("t5-tiny")).architectures
    assert t5 == ["T5ForConditionalGeneration"]


@pytest.mark.parametrize(
    "options, architecture, match",
    [
        # No Hugging Face architecture has RoPE with LayerNorm.
        (dict(norm="layernorm"), None, r"Llama checkpoint: ModelConfig.norm='layernorm'"),
        (dict(), "gpt2", r"GPT-2 checkpoint: .*position='rope'"),
        (dict(), "qwen3", r"Qwen3 checkpoint: ModelConfig.qk_norm=False \(needs True\)"),
        (dict(qkv_bias=True), "llama", r"Llama checkpoint: ModelConfig.qkv_bias=True"),
        (
            dict(sliding_window=8, global_attention_every=2),
            None,
            "Llama checkpoint: ModelConfig.sliding_window=8 .*global_attention_every=2",
        ),
        (dict(post_norms=True), None, "Gemma 2 checkpoint: .*norm_unit_offset=False.*embed_scale"),
        (dict(mlp="gelu"), None, r"mlp='gelu' \(needs 'swiglu' or 'geglu'\)"),
        (
            dict(qkv_bias=True, head_dim=32),
            "qwen2",
            r"Qwen2 checkpoint: ModelConfig.head_dim=32 \(needs None or 16\)$",
        ),
        (
            dict(GEMMA, query_pre_attn_scalar=24.5),
            None,
            "Gemma 2 checkpoint: its config class needs a whole ModelConfig.query_pre_attn_scalar",
        ),
        (
            dict(num_heads=3, num_kv_heads=1, head_dim=16),
            None,
            "Llama checkpoint: its config class needs ModelConfig.d_model=64 divisible by "
            "ModelConfig.num_heads=3",
        ),
        (
            dict(init_std=2.0),
            None,
            "Llama checkpoint: transformers' LlamaConfig refuses .*initializer_range",
        ),
        (dict(), "bert", r"BERT checkpoint: ModelConfig.family='decoder'"),
        (dict(), "opt", r"unknown architecture 'opt'; choose one of gpt2, bert, t5, llama"),
    ],
)
def test_to_hf_refuses_what_the_architecture_cannot_express(options, architecture, match):
    with pytest.raises(ValueError, match=match):
        convert.hf_config(dataclasses.replace(LLAMA, **options), architecture=architecture)


@pytest.mark.parametrize(
    "preset, options, match",
    [
        (
            "gpt-tiny",
            dict(qk_norm=True),
            r"GPT-2 checkpoint: ModelConfig.qk_norm=True \(needs False\)",
        ),
        ("gpt-tiny", dict(qkv_bias=False), r"ModelConfig.qkv_bias=False \(needs None or True\)"),
        ("bert-tiny", dict(attn_logit_softcap=5.0), "BERT checkpoint: .*attn_logit_softcap=5.0"),
        ("t5-tiny", dict(post_norms=True), r"T5 checkpoint: ModelConfig.post_norms=True"),
    ],
)
def test_gpt2_bert_t5_refuse_the_new_options(preset, options, match):
    with pytest.raises(ValueError, match=match):
        convert.hf_config(dataclasses.replace(models.preset(preset), **options))


def test_command_line_architecture(tmp_path):
    from jaxformer.convert import runs

    hf = hf_model("LlamaConfig")
    model, cfg = convert.from_hf(hf)
    run = runs.save_run(model, cfg, str(tmp_path / "run"))
    # Mistral without a window is Llama: the forced architecture writes and loads as Mistral.
    assert cli(["to-hf", run, str(tmp_path / "m"), "--architecture", "mistral"]) == 0
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager")
    assert type(back).__name__ == "MistralForCausalLM"
    np.testing.assert_allclose(hf_logits(back.eval()), hf_logits(hf), atol=ATOL)
