"""ModelConfig options for Llama-3.1, Mistral, Qwen2/3 and Gemma 2 checkpoints: each one changes
what it should, the defaults change nothing (see also the golden sharding files), and the KV-cached
decode of a model with all of them on equals its full forward pass."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_helpers import build as build_fresh
from model_helpers import tokens

from jaxformer import attention as A
from jaxformer import attention_kernels as K
from jaxformer import attention_layer, layers, models, positional
from jaxformer import sharding as shard_lib
from jaxformer.models.config import GLOBAL_WINDOW, ModelConfig

# Building is slower than running; only test_post_norms_parameters_and_placement mutates a model.
build = functools.lru_cache(maxsize=None)(build_fresh)

# Every new option on, on a llama-tiny-sized decoder (head_dim 16, 4 query / 2 K/V heads).
ALL_OPTIONS = dict(
    rope_scaling="llama3",
    rope_scaling_factor=8.0,
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_max_len=16,
    qk_norm=True,
    attn_logit_softcap=5.0,
    final_logit_softcap=3.0,
    post_norms=True,
    norm_unit_offset=True,
    embed_scale=True,
    query_pre_attn_scalar=24.0,
    sliding_window=4,
    global_attention_every=2,
    use_bias=False,
    qkv_bias=True,
    mlp="geglu",
)


def _params(model) -> dict[str, jax.Array]:
    return {
        ".".join(map(str, path)): v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def _reference_attention(q, k, v, *, scale, cap, window=None):
    """Causal attention written out: cap * tanh(scaled logits / cap), then the masks, softmax."""
    n, kh = q.shape[2], k.shape[2]
    k, v = np.repeat(k, n // kh, axis=2), np.repeat(v, n // kh, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if cap is not None:
        logits = cap * np.tanh(logits / cap)
    t, s = q.shape[1], k.shape[1]
    dist = np.arange(t)[:, None] - np.arange(s)[None, :]
    allowed = dist >= 0 if window is None else (dist >= 0) & (dist < window)
    logits = np.where(allowed, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v)


def _qkv(t=24, n=4, k=2, h=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    # Large logits, so the soft-cap changes them noticeably.
    q = 3.0 * jax.random.normal(keys[0], (2, t, n, h))
    return q, jax.random.normal(keys[1], (2, t, k, h)), jax.random.normal(keys[2], (2, t, k, h))


# ----------------------------------------------------------------------------- attention


def test_logit_softcap_plain_and_chunked_equal_reference():
    q, k, v = _qkv()
    want = _reference_attention(*map(np.asarray, (q, k, v)), scale=0.5, cap=2.0)
    uncapped = _reference_attention(*map(np.asarray, (q, k, v)), scale=0.5, cap=None)
    assert np.abs(want - uncapped).max() > 0.1  # the cap matters at these logits
    for impl in ("plain", "chunked"):
        got = A.dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            scale=0.5,
            logit_softcap=2.0,
            implementation=impl,
            q_chunk_size=8,
            kv_chunk_size=8,
        )
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=impl)
    np.testing.assert_allclose(A.softcap(jnp.array([1e6, -1e6, 0.0]), 2.0), [2.0, -2.0, 0.0])


def test_traced_window_equals_static_window_in_plain_and_chunked():
    q, k, v = _qkv()
    want = _reference_attention(*map(np.asarray, (q, k, v)), scale=0.5, cap=None, window=5)

    @functools.partial(jax.jit, static_argnames="impl")
    def traced(window, impl):
        return A.dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            sliding_window=window,
            scale=0.5,
            implementation=impl,
            q_chunk_size=8,
            kv_chunk_size=8,
        )

    for impl in ("plain", "chunked"):
        np.testing.assert_allclose(traced(5, impl), want, atol=1e-5, rtol=1e-5, err_msg=impl)
        full = _reference_attention(*map(np.asarray, (q, k, v)), scale=0.5, cap=None)
        np.testing.assert_allclose(traced(GLOBAL_WINDOW, impl), full, atol=1e-5, rtol=1e-5)


def test_kernels_are_not_picked_for_options_they_cannot_run(monkeypatch):
    q = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
    traced_window = jnp.int32(8)  # an Array, not an int: what a scanned layer's window is
    monkeypatch.setattr(K, "current_platform", lambda: "gpu")
    assert A.select_implementation(q, q, is_causal=True)[0] == "cudnn"
    name, reason = A.select_implementation(q, q, is_causal=True, logit_softcap=50.0)
    assert name == "plain" and "soft-cap" in reason
    name, reason = A.select_implementation(q, q, is_causal=True, sliding_window=traced_window)
    assert name == "plain" and "traced" in reason
    assert A.select_implementation(q, q, is_causal=True, sliding_window=8)[0] == "cudnn"
    x = jnp.zeros((1, 8, 2, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match="implementation='cudnn'.*soft-cap"):
        A.dot_product_attention(x, x, x, logit_softcap=5.0, implementation="cudnn")
    monkeypatch.setattr(K, "current_platform", lambda: "tpu")
    assert A.select_implementation(q, q, is_causal=True, logit_softcap=50.0)[0] == "splash"
    name, reason = A.select_implementation(q, q, is_causal=True, sliding_window=traced_window)
    assert name == "plain" and "traced" in reason
    y = jnp.zeros((1, 128, 2, 8))
    with pytest.raises(ValueError, match="implementation='splash'.*traced"):
        A.dot_product_attention(
            y, y, y, is_causal=True, sliding_window=traced_window, implementation="splash"
        )


def test_splash_logit_softcap_matches_plain_in_interpreter(monkeypatch):
    monkeypatch.setattr(K, "current_platform", lambda: "tpu")
    monkeypatch.setattr(K, "SPLASH_INTERPRET", True)
    q, k, v = _qkv(t=128, n=2, k=1, h=16)
    kw = dict(is_causal=True, scale=0.5, logit_softcap=2.0)
    got = A.dot_product_attention(q, k, v, implementation="splash", **kw)
    want = A.dot_product_attention(q, k, v, implementation="plain", **kw)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def test_splash_logit_softcap_compiles_for_v5e():
    """Soft-capped splash attention (fwd + bwd) compiles ahead of time for a TPU v5e (libtpu)."""
    import os

    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxformer.training.compile_only import topology_devices, without_persistent_cache

    try:
        devices = topology_devices("v5e:2x2")
    except Exception as e:  # no libtpu, or one that can't describe the topology
        pytest.skip(f"no TPU compiler for AOT (install jax[tpu]): {type(e).__name__}: {e}")
    axes = ("data", "fsdp", "tensor")
    mesh = jax.sharding.Mesh(
        np.array(devices).reshape(1, 2, 2), axes, axis_types=(AxisType.Auto,) * 3
    )
    act = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    q = jax.ShapeDtypeStruct((4, 512, 4, 128), jnp.bfloat16, sharding=act)
    kv = jax.ShapeDtypeStruct((4, 512, 2, 128), jnp.bfloat16, sharding=act)

    def loss(q, k, v):
        out = A.dot_product_attention(
            q, k, v, is_causal=True, logit_softcap=50.0, implementation="auto"
        )
        return jnp.sum(out.astype(jnp.float32))

    with jax.set_mesh(mesh):
        assert A.select_implementation(q, kv, is_causal=True, logit_softcap=50.0)[0] == "splash"
        with without_persistent_cache():
            hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile().as_text()
    assert "splash_mha_fwd" in hlo and "splash_mha_dq" in hlo and "splash_mha_dkv" in hlo


# ----------------------------------------------------------------------------- projections


def test_qkv_bias_biases_query_key_value_only():
    params = _params(build("llama-tiny", use_bias=False, qkv_bias=True))
    for name in ("query", "key", "value"):
        assert params[f"blocks.self_attn.{name}.bias"].shape[0] == 2  # stacked over layers
    assert "blocks.self_attn.out.bias" not in params
    assert not any(p.startswith("blocks.mlp.") and p.endswith("bias") for p in params)
    params = _params(build("gpt-tiny", qkv_bias=False))
    assert "blocks.self_attn.query.bias" not in params and "blocks.self_attn.out.bias" in params


def test_qk_norm_normalises_each_head_before_rope():
    cfg = dataclasses.replace(models.preset("llama-tiny"), qk_norm=True)
    model = build("llama-tiny", qk_norm=True)
    params = _params(model)
    for name in ("query_norm", "key_norm"):
        p = params[f"blocks.self_attn.{name}.scale"]
        assert p.shape == (cfg.num_layers, cfg.dims_per_head)
        assert p.get_metadata()["out_sharding"] == ("layers", "head_dim")
    attn = attention_layer.Attention(
        32, 4, 2, 8, use_bias=False, qk_norm="rmsnorm", norm_eps=1e-6, rngs=nnx.Rngs(0)
    )
    x = 10.0 * jax.random.normal(jax.random.key(1), (2, 5, 32))
    q = attn._query(x, None)
    k, _ = attn.project_kv(x)
    for h in (q, k):  # unit RMS over head_dim in every head
        np.testing.assert_allclose(jnp.sqrt(jnp.mean(h**2, -1)), 1.0, rtol=1e-4)
    plain = build("llama-tiny")
    x_tokens = tokens(0, (2, 8))
    assert not np.allclose(model(x_tokens), plain(x_tokens), atol=1e-3)


def test_query_pre_attn_scalar_sets_the_logit_scale():
    model = build("llama-tiny", query_pre_attn_scalar=256.0)
    assert model.blocks.self_attn.scale == 256.0**-0.5
    same = build("llama-tiny", query_pre_attn_scalar=16.0)  # head_dim 16: today's scale
    x = tokens(0, (2, 8))
    np.testing.assert_allclose(same(x), build("llama-tiny")(x), atol=1e-6)
    assert not np.allclose(model(x), same(x), atol=1e-4)


# ----------------------------------------------------------------------------- norms


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_unit_offset_norm_at_zero_equals_plain_norm_and_gemma_formula(kind):
    kw = dict(eps=1e-6, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    offset = layers.norm(kind, 16, unit_offset=True, **kw)
    plain = layers.norm(kind, 16, **kw)
    assert offset.scale.get_metadata()["out_sharding"] == ("embed",)
    np.testing.assert_array_equal(offset.scale[...], 0.0)
    x = 3.0 * jax.random.normal(jax.random.key(0), (4, 16)) + 1.0
    np.testing.assert_allclose(offset(x), plain(x), atol=2e-5, rtol=2e-5)
    w = jax.random.normal(jax.random.key(1), (16,))
    offset.scale[...] = w
    xn = np.asarray(x, np.float32)
    if kind == "layernorm":
        xn = xn - xn.mean(-1, keepdims=True)
    want = xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-6) * (1 + np.asarray(w))
    np.testing.assert_allclose(offset(x), want, atol=1e-5, rtol=1e-5)


def test_unit_offset_parameters_keep_their_names_and_axes():
    params = _params(build("llama-tiny", norm_unit_offset=True, qk_norm=True))
    for name in ("blocks.self_attn_norm.scale", "blocks.mlp_norm.scale", "final_norm.scale"):
        assert params[name].get_metadata()["out_sharding"][-1] == "embed"
        np.testing.assert_array_equal(params[name][...], 0.0)
    assert params["blocks.self_attn.query_norm.scale"].get_metadata()["out_sharding"] == (
        "layers",
        "head_dim",
    )


def test_post_norms_parameters_and_placement():
    params = _params(build("llama-tiny", post_norms=True))
    for name in ("post_self_attn_norm", "post_mlp_norm"):
        assert params[f"blocks.{name}.scale"].shape == (2, 64)
    assert not any("post_cross" in p for p in params)
    t5 = _params(build("t5-tiny", post_norms=True))
    assert "decoder_blocks.post_cross_attn_norm.scale" in t5
    assert "encoder_blocks.post_cross_attn_norm.scale" not in t5
    # Zeroed post-norm scales silence both sub-blocks: every block is the identity.
    model = build_fresh("llama-tiny", post_norms=True)
    x = tokens(0, (2, 8))
    h = model.embed(x)
    assert not np.allclose(model.hidden(x), h, atol=1e-3)
    for norm in (model.blocks.post_self_attn_norm, model.blocks.post_mlp_norm):
        norm.scale[...] = jnp.zeros_like(norm.scale[...])
    np.testing.assert_allclose(model.hidden(x), h, atol=1e-6)
    with pytest.raises(ValueError, match="post_norms.*norm_position='pre'"):
        dataclasses.replace(models.preset("bert-tiny"), post_norms=True)


# ----------------------------------------------------------------------------- embeddings, head


def test_embed_scale_multiplies_by_sqrt_d_model_in_the_compute_dtype():
    model = build("llama-tiny", embed_scale=True, d_model=48, num_heads=3, num_kv_heads=1)
    x = tokens(0, (2, 5))
    table = model.embed.token_embed.embedding[...]
    np.testing.assert_allclose(model.embed(x), table[x] * 48**0.5, rtol=1e-6)
    bf16 = build(
        "llama-tiny", embed_scale=True, d_model=48, num_heads=3, num_kv_heads=1, dtype="bfloat16"
    )
    table = bf16.embed.token_embed.embedding[...].astype(jnp.bfloat16)
    normalizer = jnp.asarray(48**0.5, jnp.bfloat16)  # 6.9375, not 6.928...
    np.testing.assert_array_equal(bf16.embed(x), table[x] * normalizer)


@pytest.mark.parametrize("preset", ["llama-tiny", "bert-tiny"])
def test_final_logit_softcap_bounds_logits(preset):
    capped, plain = build(preset, final_logit_softcap=0.05), build(preset)
    x = tokens(0, (2, 8))
    uncapped = plain(x)
    got = capped(x)
    assert jnp.abs(uncapped).max() > 0.5 and jnp.abs(got).max() <= 0.05
    np.testing.assert_allclose(got, 0.05 * np.tanh(np.asarray(uncapped) / 0.05), rtol=1e-5)


# ----------------------------------------------------------------------------- rope scaling


def test_rope_scaling_frequencies():
    base = np.asarray(positional.rope_frequencies(128, 500000.0))
    linear = positional.RopeScaling("linear", 4.0)
    np.testing.assert_allclose(positional.rope_frequencies(128, 500000.0, linear), base / 4.0)
    llama3 = positional.RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    got = np.asarray(positional.rope_frequencies(128, 500000.0, llama3))
    wavelen = 2 * np.pi / base.astype(np.float64)
    high, low = wavelen < 8192 / 4, wavelen > 8192 / 1
    np.testing.assert_array_equal(got[high], base[high])  # short wavelengths kept
    np.testing.assert_allclose(got[low], base[low] / 8, rtol=1e-6)  # long ones divided
    mid = ~high & ~low
    assert mid.any()
    smooth = (8192 / wavelen[mid] - 1) / 3
    np.testing.assert_allclose(got[mid], (1 - smooth) * base[mid] / 8 + smooth * base[mid], 1e-6)
    # Linear scaling is positions / factor.
    x = jax.random.normal(jax.random.key(0), (1, 6, 2, 16))
    pos = jnp.arange(6)[None]
    np.testing.assert_allclose(
        positional.apply_rope(x, 2 * pos, scaling=positional.RopeScaling("linear", 2.0)),
        positional.apply_rope(x, pos),
        atol=1e-5,
    )


@pytest.mark.parametrize("kind", ["linear", "llama3"])
def test_rope_scaling_matches_transformers(kind):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(rope_type=kind, rope_theta=500000.0, factor=8.0)
    if kind == "llama3":
        params.update(
            low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
        )
    hf_cfg = transformers.LlamaConfig(
        hidden_size=256,
        num_attention_heads=2,
        max_position_embeddings=131072,
        rope_parameters=params,
    )
    want, _ = ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu")
    ours = positional.RopeScaling(kind, 8.0, 1.0, 4.0, 8192)
    got = positional.rope_frequencies(128, 500000.0, ours)
    # XLA and torch may round a float32 operation differently: one ulp.
    np.testing.assert_allclose(got, want.numpy(), rtol=2e-7, atol=0)


# ----------------------------------------------------------------------------- windows


def test_layer_windows_pattern():
    cfg = dataclasses.replace(models.preset("llama-tiny"), sliding_window=4)
    assert cfg.layer_windows(4) is None
    cfg = dataclasses.replace(cfg, global_attention_every=2)
    assert cfg.layer_windows(4) == (4, GLOBAL_WINDOW, 4, GLOBAL_WINDOW)
    assert dataclasses.replace(cfg, global_attention_every=3).layer_windows(3) == (
        4,
        4,
        GLOBAL_WINDOW,
    )


def test_global_layers_see_beyond_the_window_scanned_and_unrolled():
    """Window 2 over 2 layers: position 7 can't see token 0 unless a layer is global."""
    x = tokens(0, (1, 8))
    x_changed = x.at[0, 0].set(7)

    def sees_token_0(model):
        return not np.allclose(model(x)[0, 7], model(x_changed)[0, 7], atol=1e-6)

    local = dict(sliding_window=2)
    assert not sees_token_0(build("llama-tiny", **local))
    assert not sees_token_0(build("llama-tiny", **local, num_layers=1, global_attention_every=2))
    for scan in (True, False):
        assert sees_token_0(
            build("llama-tiny", **local, global_attention_every=2, scan_layers=scan)
        )
    a = build("llama-tiny", **local, global_attention_every=2, scan_layers=True)
    b = build("llama-tiny", **local, global_attention_every=2, scan_layers=False)
    np.testing.assert_allclose(a(x), b(x), atol=1e-5)


@pytest.mark.parametrize("preset", ["bert-tiny", "t5-tiny"])
def test_per_layer_windows_scanned_equal_unrolled(preset):
    opts = dict(sliding_window=2, global_attention_every=2)
    a, b = build(preset, **opts), build(preset, **opts, scan_layers=False)
    local = build(preset, sliding_window=2)
    x = tokens(0, (2, 8))
    args = (x, x) if preset == "t5-tiny" else (x,)
    np.testing.assert_allclose(a(*args), b(*args), atol=1e-5)
    assert not np.allclose(a(*args), local(*args), atol=1e-4)


def test_config_checks_name_the_option():
    base = models.preset("llama-tiny")
    for change, match in [
        (dict(global_attention_every=2), "global_attention_every.*sliding_window"),
        (dict(sliding_window=0), "sliding_window must be >= 1"),
        (dict(attn_logit_softcap=0.0), "attn_logit_softcap must be > 0"),
        (dict(final_logit_softcap=-1.0), "final_logit_softcap must be > 0"),
        (dict(query_pre_attn_scalar=64.0, scale_attention=False), "query_pre_attn_scalar"),
        (dict(rope_scaling="yarn"), "rope_scaling"),
        (dict(rope_scaling="llama3", rope_high_freq_factor=1.0), "high_freq_factor"),
        (dict(rope_scaling="linear", rope_scaling_factor=0.0), "factor must be > 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(base, **change)
    with pytest.raises(ValueError, match="rope_scaling='linear' needs position='rope'"):
        dataclasses.replace(models.preset("gpt-tiny"), rope_scaling="linear")


# ----------------------------------------------------------------------------- everything at once


def test_all_options_shard_and_decode_with_cache_equal_full_forward():
    model = build("llama-tiny", **ALL_OPTIONS)
    cfg = model.config
    # Every new parameter's logical names are in the rule table.
    mesh = shard_lib.make_mesh(shard_lib.MeshConfig(shape=(2, 2, 2)))
    state = nnx.state(model, nnx.Param)
    shardings = shard_lib.state_shardings(state, mesh, shard_lib.DEFAULT_RULES)
    flat = dict(nnx.to_flat_state(shardings))
    assert tuple(flat[("blocks", "post_mlp_norm", "scale")].get_value().spec) == (None, "fsdp")
    key_norm = flat[("blocks", "self_attn", "key_norm", "scale")].get_value().spec
    assert tuple(key_norm) in ((), (None,), (None, None))

    x = tokens(0, (2, 12))
    full = model(x)
    prompt = 7
    logits, cache = model.decode_step(x[:, :prompt], model.init_cache(2, 12), index=0)
    steps = [logits]
    for i in range(prompt, 12):
        logits, cache = model.decode_step(x[:, i : i + 1], cache, index=jnp.int32(i))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=2e-5)
    # The options are live in that comparison: without the window pattern the logits differ.
    assert cfg.layer_windows(2) == (4, GLOBAL_WINDOW)
    other = build("llama-tiny", **{**ALL_OPTIONS, "global_attention_every": None})
    assert not np.allclose(other(x)[:, 5:], full[:, 5:], atol=1e-4)


def test_default_config_is_unchanged():
    cfg = ModelConfig()
    assert (cfg.qkv_bias, cfg.qk_norm, cfg.post_norms, cfg.norm_unit_offset) == (
        None,
        False,
        False,
        False,
    )
    assert cfg.rope_scaling_spec is None and cfg.layer_windows(2) is None


def test_all_options_generate_with_cache_equals_recompute():
    """Greedy generation (left-aligned prompts of different lengths, cached) vs recomputing."""
    from jaxformer.inference import generate

    model = build("llama-tiny", **ALL_OPTIONS, init_std=0.3)
    lengths = np.array([7, 3])
    prompt = np.array(tokens(1, (2, 7)))
    prompt[1, 3:] = 0
    out = generate(model, jnp.asarray(prompt), prompt_lengths=lengths, max_new_tokens=5)
    forward = nnx.jit(lambda m, x: m(x))
    for row, length in enumerate(lengths):
        seq = prompt[row, :length].tolist()
        for _ in range(5):  # a fixed-width buffer: one compilation; causality hides the tail
            buffer = jnp.array([seq + [0] * (12 - len(seq))])
            seq.append(int(jnp.argmax(forward(model, buffer)[0, len(seq) - 1])))
        assert out[row].tolist() == seq[length:], f"row {row}"


def test_encoder_decoder_options_decode_with_cache_equals_full_forward():
    opts = {
        k: v
        for k, v in ALL_OPTIONS.items()
        if not k.startswith("rope") and k not in ("use_bias", "mlp")
    }
    model = build("t5-tiny", **opts, scale_attention=True)
    enc, dec = tokens(0, (2, 9)), tokens(1, (2, 8))
    full = model(enc, dec)
    cache = model.init_cache(model.encode(enc), 8)
    steps = []
    for i in range(8):
        logits, cache = model.decode_step(dec[:, i : i + 1], cache, index=jnp.int32(i))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=2e-5)
