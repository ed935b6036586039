"""Attention equals a naive numpy reference and jax.nn.dot_product_attention, forward and backward."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import attention as A


def naive_attention(
    q, k, v, *, mask=None, bias=None, causal=False, segments=None, window=None, scale=None
):
    """Loops over batch and heads in float64 numpy; masks written out element by element."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(h) if scale is None else scale
    out = np.zeros((b, t, n, h))
    full_mask = np.ones((b, n, t, s), bool)
    if mask is not None:
        full_mask &= np.broadcast_to(np.asarray(mask), (b, n, t, s))
    for bi, ni, i, j in itertools.product(range(b), range(n), range(t), range(s)):
        if causal and j > i:
            full_mask[bi, ni, i, j] = False
        if window is not None and (i - j >= window or (j - i >= window) or (causal and j > i)):
            full_mask[bi, ni, i, j] = False
        if segments is not None and segments[bi, i] != segments[bi, j]:
            full_mask[bi, ni, i, j] = False
    full_bias = (
        np.zeros((b, n, t, s))
        if bias is None
        else np.broadcast_to(np.asarray(bias, np.float64), (b, n, t, s))
    )
    for bi in range(b):
        for ni in range(n):
            kv_head = ni // (n // kh)  # query head ni reads K/V head ni // group
            logits = q[bi, :, ni] @ k[bi, :, kv_head].T * scale + full_bias[bi, ni]
            logits = np.where(full_mask[bi, ni], logits, -1e30)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[bi, :, ni] = p @ v[bi, :, kv_head]
    return out


def random_qkv(rng, b, t, s, n, k, h, dtype=jnp.float32):
    keys = jax.random.split(rng, 3)
    return (
        jax.random.normal(keys[0], (b, t, n, h), dtype),
        jax.random.normal(keys[1], (b, s, k, h), dtype),
        jax.random.normal(keys[2], (b, s, k, h), dtype),
    )


CASES = [  # (batch, q_len, kv_len, heads, kv_heads, head_dim)
    (2, 7, 7, 4, 4, 8),
    (1, 16, 16, 8, 2, 4),
    (3, 5, 9, 6, 1, 8),
    (2, 33, 33, 4, 2, 16),
]


@pytest.mark.parametrize("implementation", ["plain", "chunked"])
@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("variant", ["none", "causal", "padding", "segments", "window", "bias"])
def test_matches_naive_reference(implementation, shape, variant):
    b, t, s, n, k, h = shape
    if variant in ("causal", "segments", "window") and t != s:
        pytest.skip("structural self-attention masks need q_len == kv_len")
    rng = np.random.default_rng(sum(shape))
    q, kk, v = random_qkv(jax.random.key(sum(shape)), b, t, s, n, k, h)
    kwargs, ref_kwargs = {}, {}
    if variant == "causal":
        kwargs, ref_kwargs = dict(is_causal=True), dict(causal=True)
    elif variant == "padding":
        lengths = rng.integers(1, s + 1, size=b)
        valid = np.arange(s)[None, :] < lengths[:, None]
        kwargs = ref_kwargs = dict(mask=A.padding_mask(jnp.asarray(valid)))
        ref_kwargs = dict(mask=np.asarray(valid)[:, None, None, :])
    elif variant == "segments":
        segments = np.sort(rng.integers(1, 4, size=(b, t)), axis=1)
        kwargs, ref_kwargs = dict(segment_ids=jnp.asarray(segments)), dict(segments=segments)
    elif variant == "window":
        kwargs, ref_kwargs = dict(is_causal=True, sliding_window=3), dict(causal=True, window=3)
    elif variant == "bias":
        bias = rng.normal(size=(1, n, t, s)).astype(np.float32)
        kwargs, ref_kwargs = dict(bias=jnp.asarray(bias)), dict(bias=bias)
    out = A.dot_product_attention(
        q, kk, v, implementation=implementation, q_chunk_size=4, kv_chunk_size=8, **kwargs
    )
    ref = naive_attention(q, kk, v, **ref_kwargs)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("implementation", ["plain", "chunked"])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_jax_nn_forward_and_gradients(implementation, causal):
    b, t, n, k, h = 2, 24, 8, 2, 16
    q, kk, v = random_qkv(jax.random.key(1), b, t, t, n, k, h)
    valid = jnp.arange(t)[None, :] < jnp.array([[t], [t - 5]])
    mask = A.padding_mask(valid)

    def ours(q, kk, v):
        out = A.dot_product_attention(
            q,
            kk,
            v,
            mask=mask,
            is_causal=causal,
            implementation=implementation,
            q_chunk_size=8,
            kv_chunk_size=8,
        )
        return (out**2).sum(), out

    def reference(q, kk, v):
        out = jax.nn.dot_product_attention(q, kk, v, mask=mask, is_causal=causal)
        return (out**2).sum(), out

    (_, out), grads = jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True)(q, kk, v)
    (_, ref), ref_grads = jax.value_and_grad(reference, argnums=(0, 1, 2), has_aux=True)(q, kk, v)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    for g, rg in zip(grads, ref_grads):
        np.testing.assert_allclose(g, rg, atol=1e-4, rtol=1e-4)


def test_chunked_gradients_equal_plain_with_everything():
    b, t, n, k, h = 2, 20, 4, 2, 8
    q, kk, v = random_qkv(jax.random.key(2), b, t, t, n, k, h)
    segments = jnp.asarray(np.sort(np.random.default_rng(0).integers(1, 3, (b, t)), axis=1))
    bias = jax.random.normal(jax.random.key(3), (1, n, t, t))

    def loss(impl, q, kk, v, bias):
        out = A.dot_product_attention(
            q,
            kk,
            v,
            bias=bias,
            is_causal=True,
            segment_ids=segments,
            sliding_window=6,
            implementation=impl,
            q_chunk_size=8,
            kv_chunk_size=4,
        )
        return jnp.sum(jnp.sin(out))

    g_plain = jax.grad(lambda *a: loss("plain", *a), argnums=(0, 1, 2, 3))(q, kk, v, bias)
    g_chunk = jax.grad(lambda *a: loss("chunked", *a), argnums=(0, 1, 2, 3))(q, kk, v, bias)
    for a, c in zip(g_plain, g_chunk):
        np.testing.assert_allclose(a, c, atol=2e-5, rtol=2e-5)


def test_bfloat16_inputs_use_float32_softmax():
    q, kk, v = random_qkv(jax.random.key(4), 1, 64, 64, 2, 2, 32, dtype=jnp.bfloat16)
    ref = naive_attention(q.astype(jnp.float32), kk.astype(jnp.float32), v.astype(jnp.float32))
    for impl in ("plain", "chunked"):
        out = A.dot_product_attention(
            q, kk, v, implementation=impl, q_chunk_size=16, kv_chunk_size=16
        )
        assert out.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)


def test_gqa_with_all_heads_equals_repeated_kv():
    q, kk, v = random_qkv(jax.random.key(5), 2, 10, 10, 6, 2, 8)
    grouped = A.dot_product_attention(q, kk, v, is_causal=True)
    repeated = A.dot_product_attention(
        q, jnp.repeat(kk, 3, axis=2), jnp.repeat(v, 3, axis=2), is_causal=True
    )
    np.testing.assert_allclose(grouped, repeated, atol=1e-6)


def test_mask_builders():
    np.testing.assert_array_equal(A.causal_mask(3)[0, 0], np.tril(np.ones((3, 3), bool)))
    np.testing.assert_array_equal(
        A.sliding_window_mask(4, window=2)[0, 0],
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]],
    )
    seg = A.segment_mask(jnp.array([[1, 1, 2, 0]]))[0, 0]
    np.testing.assert_array_equal(seg[0], [1, 1, 0, 0])
    np.testing.assert_array_equal(seg[2], [0, 0, 1, 0])
    pad = A.padding_mask(jnp.array([[1, 1, 0]]))
    assert pad.shape == (1, 1, 1, 3) and not bool(pad[0, 0, 0, 2])


def test_relative_position_buckets_match_t5_definition():
    rel = jnp.arange(-200, 201)
    buckets = np.asarray(
        A.relative_position_buckets(rel, bidirectional=True, num_buckets=32, max_distance=128)
    )
    # Small distances get exact buckets; keys after the query use the upper half.
    assert buckets[200] == 0 and buckets[201] == 17 and buckets[199] == 1
    assert buckets.min() >= 0 and buckets.max() <= 31
    assert np.all(np.diff(buckets[201:]) >= 0)  # monotone in distance
    causal = np.asarray(A.relative_position_buckets(rel, bidirectional=False))
    assert np.all(causal[201:] == 0)  # future keys collapse to bucket 0 in a decoder


def test_bad_shapes_raise_clear_errors():
    q = jnp.zeros((1, 4, 6, 8))
    with pytest.raises(ValueError, match="not a multiple"):
        A.dot_product_attention(q, jnp.zeros((1, 4, 4, 8)), jnp.zeros((1, 4, 4, 8)))
    with pytest.raises(ValueError, match="same shape"):
        A.dot_product_attention(q, jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 5, 2, 8)))
    with pytest.raises(ValueError, match="implementation"):
        A.dot_product_attention(q, q, q, implementation="flash")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
            A.dot_product_attention(q, q, q, implementation="cudnn")


# ----------------------------------------------------------------------------- auto + block skipping


def _shape(b, t, heads, h=8):
    return jax.ShapeDtypeStruct((b, t, heads, h), jnp.float32)


def test_auto_picks_plain_for_short_and_chunked_for_long_on_cpu():
    assert jax.default_backend() == "cpu"
    short, _ = A.select_implementation(_shape(2, 512, 4), _shape(2, 512, 2))
    long, reason = A.select_implementation(_shape(2, 1024, 4), _shape(2, 1024, 2), is_causal=True)
    assert (short, long) == ("plain", "chunked") and "1024 x 1024" in reason
    # Cross-attention counts T x S: a short query over a long memory stays plain.
    assert A.select_implementation(_shape(1, 8, 4), _shape(1, 4096, 4))[0] == "plain"


def test_auto_runs_the_selected_implementation():
    q, kk, v = random_qkv(jax.random.key(6), 1, 1024, 1024, 2, 1, 8)
    run = jax.jit(A.dot_product_attention, static_argnames=("is_causal", "implementation"))
    auto = run(q, kk, v, is_causal=True, implementation="auto")
    chunked = run(q, kk, v, is_causal=True, implementation="chunked")
    np.testing.assert_array_equal(auto, chunked)
    short = [x[:, :64] for x in (q, kk, v)]
    np.testing.assert_array_equal(
        A.dot_product_attention(*short, implementation="auto"),
        A.dot_product_attention(*short, implementation="plain"),
    )


def test_auto_with_segments_and_window_matches_plain_with_gradients():
    b, t, n, k, h = 1, 1024, 2, 1, 8
    q, kk, v = random_qkv(jax.random.key(7), b, t, t, n, k, h)
    segments = jnp.asarray(np.sort(np.random.default_rng(1).integers(0, 4, (b, t)), axis=1))

    def loss(impl, q, kk, v):
        out = A.dot_product_attention(
            q, kk, v, is_causal=True, segment_ids=segments, sliding_window=300, implementation=impl
        )
        return jnp.sum(jnp.sin(out))

    assert A.select_implementation(q, kk, segment_ids=segments, sliding_window=300)[0] == "chunked"
    g_auto = jax.jit(jax.grad(functools.partial(loss, "auto"), argnums=(0, 1, 2)))(q, kk, v)
    g_plain = jax.jit(jax.grad(functools.partial(loss, "plain"), argnums=(0, 1, 2)))(q, kk, v)
    for a, p in zip(g_auto, g_plain):
        np.testing.assert_allclose(a, p, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("structure", ["causal", "causal_window", "window", "cross_causal"])
def test_block_skipping_changes_nothing(structure):
    """Structural masks (which skip hidden kv blocks) equal the same mask passed as an array."""
    t, s = (40, 56) if structure == "cross_causal" else (40, 40)
    q, kk, v = random_qkv(jax.random.key(8), 2, t, s, 4, 2, 8)
    kwargs = dict(is_causal=structure != "window")
    mask = A.causal_mask(t, s)
    if "window" in structure:
        kwargs["sliding_window"] = 9
        mask = A.sliding_window_mask(t, s, window=9, causal=kwargs["is_causal"])

    def run(q, kk, v, skip):
        if skip:
            return A.dot_product_attention(
                q, kk, v, implementation="chunked", q_chunk_size=8, kv_chunk_size=8, **kwargs
            )
        return A.dot_product_attention(
            q, kk, v, mask=mask, implementation="chunked", q_chunk_size=8, kv_chunk_size=8
        )

    @jax.jit
    def value_and_grads(q, kk, v):
        return [
            jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(run(*a, skip))), argnums=(0, 1, 2))(
                q, kk, v
            )
            for skip in (True, False)
        ]

    skipped, full = value_and_grads(q, kk, v)
    for a, c in zip(jax.tree.leaves(skipped), jax.tree.leaves(full)):
        np.testing.assert_allclose(a, c, atol=1e-6, rtol=1e-6)


def _dots_outside_cond(jaxpr, in_cond=False):
    """(dot_generals outside any cond, inside one) in a jaxpr and all its sub-jaxprs."""
    outside = inside = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            inside, outside = (inside + 1, outside) if in_cond else (inside, outside + 1)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    o, i = _dots_outside_cond(sub, in_cond or eqn.primitive.name == "cond")
                    outside, inside = outside + o, inside + i
    return outside, inside


def test_causal_chunked_matmuls_sit_in_a_real_conditional_forward_and_backward():
    q = jnp.zeros((1, 64, 2, 8))
    grad = jax.grad(
        lambda q, kk, v: jnp.sum(
            A.dot_product_attention(
                q,
                kk,
                v,
                is_causal=True,
                implementation="chunked",
                q_chunk_size=16,
                kv_chunk_size=16,
            )
        ),
        argnums=(0, 1, 2),
    )
    outside, inside = _dots_outside_cond(jax.make_jaxpr(grad)(q, q, q).jaxpr)
    assert outside == 0 and inside >= 6  # fwd, recomputed fwd and bwd matmuls are all skippable
    hlo = jax.jit(grad).lower(q, q, q).compile().as_text()
    assert " conditional(" in hlo  # XLA kept the branch: skipped blocks really cost no matmul


def test_rows_that_see_no_key_stay_finite():
    q, kk, v = random_qkv(jax.random.key(9), 1, 24, 24, 2, 2, 8)
    no_first_rows = (jnp.arange(24) >= 12)[None, None, :, None]  # queries 0..11 see nothing
    for impl in ("plain", "chunked"):
        out = A.dot_product_attention(
            q,
            kk,
            v,
            mask=no_first_rows,
            is_causal=True,
            implementation=impl,
            q_chunk_size=8,
            kv_chunk_size=8,
        )
        assert bool(jnp.all(jnp.isfinite(out)))


def test_splash_and_unknown_kernels_explain_themselves_off_tpu():
    q = jnp.zeros((1, 128, 2, 8))
    with pytest.raises(ValueError, match="splash kernel needs a TPU"):
        A.dot_product_attention(q, q, q, implementation="splash")
    _, reason = A.select_implementation(q, q, bias=jnp.zeros((1, 2, 128, 128)))
    assert "logits per head" in reason


def test_auto_on_gpu_picks_cudnn_only_where_it_can(monkeypatch):
    monkeypatch.setattr(A.kernels, "current_platform", lambda: "gpu")
    bf16 = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
    assert A.select_implementation(bf16, bf16, is_causal=True, sliding_window=64)[0] == "cudnn"
    assert A.select_implementation(bf16, bf16, mask=A.causal_mask(256))[0] == "cudnn"
    f32 = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.float32)
    wide = jax.ShapeDtypeStruct((2, 256, 4, 192), jnp.bfloat16)
    for args, kwargs, why in (
        (f32, {}, "bf16/fp16"),
        (wide, {}, "head_dim"),
        (bf16, dict(bias=jnp.zeros((1, 4, 256, 256))), "bias"),
        (bf16, dict(sliding_window=64), "non-causal"),
    ):
        name, reason = A.select_implementation(args, args, **kwargs)
        assert name == "plain" and why in reason, reason


@pytest.mark.parametrize("cap", [None, 2.0])
@pytest.mark.parametrize("bias_shape", [None, (1, 2, 3, 10, 12), (2, 1, 1, 10, 12)])
def test_plain_custom_backward_equals_autodiff(cap, bias_shape):
    """attention_plain.attend's FlashAttention-style VJP (row term from the output) against autodiff
    of the same math: GQA groups, a mask with a fully masked row, soft-capping and a broadcast bias."""
    from jaxformer import attention_plain

    b, kv, g, t, s, h = 2, 2, 3, 10, 12, 8
    keys = jax.random.split(jax.random.key(7), 5)
    q = jax.random.normal(keys[0], (b, kv, g, t, h)) * 2
    k = jax.random.normal(keys[1], (b, kv, s, h))
    v = jax.random.normal(keys[2], (b, kv, s, h))
    bias = None if bias_shape is None else jax.random.normal(keys[3], bias_shape)
    mask = jax.random.bernoulli(keys[4], 0.7, (b, 1, 1, t, s)).at[0, 0, 0, 3].set(False)
    weights = jax.random.normal(jax.random.key(8), (b, kv, g, t, h))

    def reference(q, k, v, bias):
        logits = jnp.einsum("bkgth,bksh->bkgts", q, k) * 0.3
        logits = logits if cap is None else cap * jnp.tanh(logits / cap)
        logits = logits if bias is None else logits + bias
        p = jax.nn.softmax(jnp.where(mask, logits, A._MASK_VALUE), axis=-1)
        return jnp.einsum("bkgts,bksh->bkgth", p, v)

    def ours(q, k, v, bias):
        return attention_plain.attend(q, k, v, bias, mask, 0.3, cap, A._MASK_VALUE)

    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    for fn in (ours, reference):
        assert fn(q, k, v, bias).shape == (b, kv, g, t, h)
    np.testing.assert_allclose(ours(q, k, v, bias), reference(q, k, v, bias), atol=1e-5)
    got = jax.grad(lambda *a: jnp.sum(ours(*a) * weights), argnums)(q, k, v, bias)
    want = jax.grad(lambda *a: jnp.sum(reference(*a) * weights), argnums)(q, k, v, bias)
    for name, x, y in zip("qkv" + "b", got, want):
        assert x.shape == y.shape, name
        np.testing.assert_allclose(x, y, atol=2e-5, rtol=2e-5, err_msg=name)


@pytest.mark.parametrize("t, blocks, bias", [(130, 2, False), (130, 2, True), (390, 3, False)])
def test_plain_causal_query_blocks_equal_the_whole(monkeypatch, t, blocks, bias):
    """From CAUSAL_SPLIT_MIN_LENGTH on, plain causal self-attention runs blocks of query rows
    apart (each against the keys up to its last row): same outputs and gradients as in one
    piece, with GQA, packed segments, key padding, a bias and soft-capping."""
    b, n, kv, h = 2, 4, 2, 8
    keys = jax.random.split(jax.random.key(11), 5)
    q, k, v = (jax.random.normal(kk, (b, t, heads, h)) for kk, heads in zip(keys, (n, kv, kv)))
    bias = jax.random.normal(keys[3], (1, n, t, t)) if bias else None
    segments = (jnp.arange(t)[None, :] >= 70).astype(jnp.int32) + jnp.ones((b, 1), jnp.int32)
    padding = jnp.arange(t)[None, None, None, :] < jnp.array([t, t - 10])[:, None, None, None]
    weights = jax.random.normal(keys[4], (b, t, n, h))
    opts = dict(is_causal=True, segment_ids=segments, mask=padding, logit_softcap=5.0)

    def loss(q, k, v, bias):
        out = A.dot_product_attention(q, k, v, bias=bias, implementation="plain", **opts)
        return jnp.sum(out * weights), out

    def kernel_calls():
        fresh = lambda *a: loss(*a)  # noqa: E731 - make_jaxpr caches traces by function
        return str(jax.make_jaxpr(fresh)(q, k, v, bias)).count("= custom_vjp_call[")

    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    assert kernel_calls() == blocks
    halves = jax.value_and_grad(loss, argnums, has_aux=True)(q, k, v, bias)
    monkeypatch.setattr(A, "CAUSAL_SPLIT_MIN_LENGTH", t + 1)
    assert kernel_calls() == 1
    whole = jax.value_and_grad(loss, argnums, has_aux=True)(q, k, v, bias)
    np.testing.assert_allclose(halves[0][1], whole[0][1], atol=1e-5)
    for name, x, y in zip("qkvb", halves[1], whole[1]):
        np.testing.assert_allclose(x, y, atol=2e-5, rtol=2e-5, err_msg=name)


def test_plain_matmul_dtype_returns_float32_gradients_of_the_bfloat16_matmuls():
    """attend(float32 q, k, v, matmul_dtype=bf16) computes what attend of the bf16-rounded inputs
    does, but hands back the gradients unrounded: rounded to bf16 they are that call's exactly.
    So causal query blocks of a bf16 attention sum their partial dk/dv in float32."""
    from jaxformer import attention_plain

    b, kv, g, t, s, h = 2, 2, 2, 8, 12, 16
    keys = jax.random.split(jax.random.key(3), 4)
    q32, k32, v32 = (
        jax.random.normal(kk, shape).astype(jnp.bfloat16).astype(jnp.float32)
        for kk, shape in zip(keys, ((b, kv, g, t, h), (b, kv, s, h), (b, kv, s, h)))
    )
    mask = jnp.tril(jnp.ones((t, s), bool), k=s - t)[None, None, None]
    weights = jax.random.normal(keys[3], (b, kv, g, t, h))

    def grads(matmul_dtype, *qkv):
        def loss(q, k, v):
            out = attention_plain.attend(q, k, v, None, mask, 0.25, None, -1e9, matmul_dtype)
            return jnp.sum(out * weights), out

        return jax.grad(loss, (0, 1, 2), has_aux=True)(*qkv)

    (dq, dk, dv), out = grads(jnp.bfloat16, q32, k32, v32)
    (dq16, dk16, dv16), out16 = grads(None, *(x.astype(jnp.bfloat16) for x in (q32, k32, v32)))
    assert {x.dtype for x in (dq, dk, dv)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_array_equal(out, out16)
    for name, x, y in zip("qkv", (dq, dk, dv), (dq16, dk16, dv16)):
        assert y.dtype == jnp.bfloat16, name
        np.testing.assert_array_equal(x.astype(jnp.bfloat16), y, err_msg=name)
    with pytest.raises(ValueError, match="float32 q, k, v"):
        grads(jnp.bfloat16, *(x.astype(jnp.bfloat16) for x in (q32, k32, v32)))
