"""Attention equals a naive numpy reference and jax.nn.dot_product_attention, forward and backward."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import attention as A


def naive_attention(q, k, v, *, mask=None, bias=None, causal=False, segments=None, window=None,
                    scale=None):
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
    full_bias = np.zeros((b, n, t, s)) if bias is None else np.broadcast_to(np.asarray(bias, np.float64), (b, n, t, s))
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
    return (jax.random.normal(keys[0], (b, t, n, h), dtype),
            jax.random.normal(keys[1], (b, s, k, h), dtype),
            jax.random.normal(keys[2], (b, s, k, h), dtype))


CASES = [  # (batch, q_len, kv_len, heads, kv_heads, head_dim)
    (2, 7, 7, 4, 4, 8), (1, 16, 16, 8, 2, 4), (3, 5, 9, 6, 1, 8), (2, 33, 33, 4, 2, 16),
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
    out = A.dot_product_attention(q, kk, v, implementation=implementation, q_chunk_size=4,
                                  kv_chunk_size=8, **kwargs)
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
        out = A.dot_product_attention(q, kk, v, mask=mask, is_causal=causal,
                                      implementation=implementation, q_chunk_size=8,
                                      kv_chunk_size=8)
        return (out ** 2).sum(), out

    def reference(q, kk, v):
        out = jax.nn.dot_product_attention(q, kk, v, mask=mask, is_causal=causal)
        return (out ** 2).sum(), out

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
        out = A.dot_product_attention(q, kk, v, bias=bias, is_causal=True, segment_ids=segments,
                                      sliding_window=6, implementation=impl, q_chunk_size=8,
                                      kv_chunk_size=4)
        return jnp.sum(jnp.sin(out))

    g_plain = jax.grad(lambda *a: loss("plain", *a), argnums=(0, 1, 2, 3))(q, kk, v, bias)
    g_chunk = jax.grad(lambda *a: loss("chunked", *a), argnums=(0, 1, 2, 3))(q, kk, v, bias)
    for a, c in zip(g_plain, g_chunk):
        np.testing.assert_allclose(a, c, atol=2e-5, rtol=2e-5)


def test_bfloat16_inputs_use_float32_softmax():
    q, kk, v = random_qkv(jax.random.key(4), 1, 64, 64, 2, 2, 32, dtype=jnp.bfloat16)
    ref = naive_attention(q.astype(jnp.float32), kk.astype(jnp.float32), v.astype(jnp.float32))
    for impl in ("plain", "chunked"):
        out = A.dot_product_attention(q, kk, v, implementation=impl, q_chunk_size=16,
                                      kv_chunk_size=16)
        assert out.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)


def test_gqa_with_all_heads_equals_repeated_kv():
    q, kk, v = random_qkv(jax.random.key(5), 2, 10, 10, 6, 2, 8)
    grouped = A.dot_product_attention(q, kk, v, is_causal=True)
    repeated = A.dot_product_attention(q, jnp.repeat(kk, 3, axis=2), jnp.repeat(v, 3, axis=2),
                                       is_causal=True)
    np.testing.assert_allclose(grouped, repeated, atol=1e-6)


def test_mask_builders():
    np.testing.assert_array_equal(A.causal_mask(3)[0, 0], np.tril(np.ones((3, 3), bool)))
    np.testing.assert_array_equal(A.sliding_window_mask(4, window=2)[0, 0],
                                  [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]])
    seg = A.segment_mask(jnp.array([[1, 1, 2, 0]]))[0, 0]
    np.testing.assert_array_equal(seg[0], [1, 1, 0, 0])
    np.testing.assert_array_equal(seg[2], [0, 0, 1, 0])
    pad = A.padding_mask(jnp.array([[1, 1, 0]]))
    assert pad.shape == (1, 1, 1, 3) and not bool(pad[0, 0, 0, 2])


def test_relative_position_buckets_match_t5_definition():
    rel = jnp.arange(-200, 201)
    buckets = np.asarray(A.relative_position_buckets(rel, bidirectional=True, num_buckets=32,
                                                     max_distance=128))
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
