"""The three families: causality, packing, padding, presets, dtypes and clear errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_helpers import build, tokens

from jaxformer import attention_layer, layers, models


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_decoder_is_causal(name):
    model = build(name)
    x = tokens(0, (2, 16))
    changed = x.at[:, 9:].set(tokens(1, (2, 7)))
    a, b = model(x), model(changed)
    np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert not np.allclose(a[:, 9:], b[:, 9:])


def test_decoder_causal_through_gradients():
    # Row p of the learned position table is used only at position p, so the gradient of the
    # logits at t with respect to rows after t must vanish exactly.
    model = build("gpt-tiny")
    x = tokens(2, (1, 12))
    for t in (0, 5, 11):
        grads = nnx.grad(lambda m: m(x)[0, t].sum())(model)
        g = np.abs(np.asarray(grads["embed"]["position_embed"]["embedding"][...])).sum(-1)
        assert np.all(g[t + 1 :] == 0), f"position {t} sees the future"
        assert np.all(g[: t + 1] > 0)


def test_packed_documents_do_not_see_each_other():
    model = build("gpt-tiny")
    doc_a, doc_b, other_a = tokens(3, (1, 6)), tokens(4, (1, 10)), tokens(5, (1, 6))
    segments = jnp.array([[1] * 6 + [2] * 10])
    positions = jnp.array([list(range(6)) + list(range(10))])
    packed = model(jnp.concatenate([doc_a, doc_b], 1), segment_ids=segments, positions=positions)
    repacked = model(
        jnp.concatenate([other_a, doc_b], 1), segment_ids=segments, positions=positions
    )
    alone = model(doc_b)
    np.testing.assert_allclose(packed[:, 6:], repacked[:, 6:], atol=1e-5)
    np.testing.assert_allclose(packed[:, 6:], alone, atol=1e-5)


def test_encoder_ignores_padded_positions():
    model = build("bert-tiny")
    x = tokens(6, (2, 12))
    mask = jnp.array([[1] * 12, [1] * 7 + [0] * 5])
    other = x.at[1, 7:].set(tokens(7, (5,)))
    a = model(x, attention_mask=mask)
    b = model(other, attention_mask=mask)
    np.testing.assert_allclose(a[1, :7], b[1, :7], atol=1e-5)
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    # The encoder is bidirectional: a later real token changes earlier outputs.
    c = model(x.at[1, 6].set(5), attention_mask=mask)
    assert not np.allclose(a[1, 0], c[1, 0])
    assert model.classify(x, attention_mask=mask).shape == (2, 2)


def test_t5_decoder_is_causal_and_sees_the_whole_encoder():
    model = build("t5-tiny")
    enc, dec = tokens(8, (2, 10)), tokens(9, (2, 8))
    emask = jnp.array([[1] * 10, [1] * 6 + [0] * 4])
    base = model(enc, dec, encoder_mask=emask)
    later_dec = model(enc, dec.at[:, 5:].set(tokens(10, (2, 3))), encoder_mask=emask)
    np.testing.assert_allclose(base[:, :5], later_dec[:, :5], atol=1e-5)
    assert not np.allclose(base[:, 5:], later_dec[:, 5:])
    # The last encoder token reaches the first decoder position; padded encoder tokens do not.
    last_enc = model(enc.at[0, 9].set(4), dec, encoder_mask=emask)
    assert not np.allclose(base[0, 0], last_enc[0, 0])
    padded_enc = model(enc.at[1, 8].set(4), dec, encoder_mask=emask)
    np.testing.assert_allclose(base[1], padded_enc[1], atol=1e-5)


def test_gqa_with_full_kv_heads_equals_multi_head_attention():
    # Written against jaxformer.layers before the module moved: the old names still resolve.
    assert layers.Attention is attention_layer.Attention
    assert layers.AttentionInputs is attention_layer.AttentionInputs
    attn = attention_layer.Attention(32, 4, 4, 8, use_bias=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 9, 32))
    q, k, v = attn.query(x), attn.key(x), attn.value(x)
    assert q.shape == k.shape == v.shape == (2, 9, 4, 8)
    expected = attn.out(jax.nn.dot_product_attention(q, k, v, is_causal=True))
    np.testing.assert_allclose(
        attn(x, inputs=attention_layer.AttentionInputs(is_causal=True)), expected, atol=1e-5
    )


@pytest.mark.parametrize("name", sorted(models.PROMISED_PARAMS))
def test_presets_build_abstractly_with_promised_size(name):
    cfg = models.preset(name)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: models.create(cfg, rngs=nnx.Rngs(0)))
    n = models.count_params(abstract)
    assert abs(n - models.PROMISED_PARAMS[name]) / models.PROMISED_PARAMS[name] < 0.03, n


@pytest.mark.parametrize("name", ["gpt-tiny", "bert-tiny", "t5-tiny", "llama-tiny"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jitted_forward_and_backward(name, dtype):
    model = build(name, dtype=dtype, remat="full" if dtype == "bfloat16" else "none")
    x = tokens(11, (2, 16))

    @nnx.jit
    def loss_and_grads(model, x):
        def loss_fn(model):
            logits = model(x, x) if model.config.family == "encoder_decoder" else model(x)
            assert logits.dtype == jnp.float32
            return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        return nnx.value_and_grad(loss_fn)(model)

    loss, grads = loss_and_grads(model, x)
    assert np.isfinite(float(loss))
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


def test_remat_does_not_change_gradients():
    x = tokens(12, (2, 16))
    results = []
    for remat in ("none", "full", "dots_saveable"):
        model = build("gpt-tiny", remat=remat)
        grads = nnx.grad(lambda m: m(x).mean())(model)
        results.append(jax.tree.leaves(grads))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", ["llama-tiny", "t5-tiny", "bert-tiny"])
def test_unrolled_layers_equal_scanned_layers(name):
    """scan_layers=False runs the same stacked parameters in a Python loop: same values, same
    gradients; and the stacked layout is what the optimizer, converters and checkpoints see."""
    x = tokens(14, (2, 12))
    results = []
    for scan in (True, False):
        model = build(name, scan_layers=scan, remat="full")
        call = (lambda m: m(x, x)) if model.config.family == "encoder_decoder" else (lambda m: m(x))
        logits, grads = call(model), nnx.grad(lambda m: call(m).mean())(model)
        results.append((logits, jax.tree.leaves(grads)))
    np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, atol=1e-6)
    depth = models.preset(name).num_layers
    blocks = model.decoder_blocks if name == "t5-tiny" else model.blocks
    assert blocks.self_attn.query.kernel[...].shape[0] == depth


def test_chunked_attention_model_matches_plain():
    x = tokens(13, (2, 40))
    plain = build("llama-tiny")(x)
    chunked = build("llama-tiny", attention_impl="chunked")(x)
    np.testing.assert_allclose(plain, chunked, atol=1e-5)


def test_clear_errors():
    with pytest.raises(ValueError, match="gpt2-124m"):
        models.preset("gpt2-125m")
    with pytest.raises(ValueError, match="num_kv_heads"):
        dataclasses.replace(models.preset("gpt-tiny"), num_kv_heads=3)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        dataclasses.replace(models.preset("gpt-tiny"), num_heads=5)
    with pytest.raises(ValueError, match="max_len"):
        build("gpt-tiny")(tokens(0, (1, 129)))


def test_tied_logits_gradient_equals_autodiff():
    """The tied head's custom gradient ((x.T @ dlogits).T) is the autodiff one of x @ table.T."""
    from jaxformer.models.block import tied_logits

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(11, 8)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)

    def loss(fn):
        return lambda x, table: jnp.sum(jnp.tanh(fn(x, table)) * weights)

    plain = jax.grad(loss(lambda x, t: jnp.einsum("bld,vd->blv", x, t)), argnums=(0, 1))(x, table)
    custom = jax.grad(loss(tied_logits), argnums=(0, 1))(x, table)
    np.testing.assert_allclose(tied_logits(x, table), jnp.einsum("bld,vd->blv", x, table))
    for want, got in zip(plain, custom):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
