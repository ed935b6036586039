"""jaxformer.dense: bfloat16 projections on CPUs give nnx.Linear / nnx.Einsum's numbers and
gradients through bf16 x bf16 -> float32 matmuls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import dense


def _close(a, b, rtol):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    scale = np.abs(b).max()
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize(
    "spec, x_shape, w_shape",
    [
        ("btd,dnh->btnh", (2, 5, 16), (16, 4, 8)),  # query/key/value
        ("btnh,nhd->btd", (2, 5, 4, 8), (4, 8, 16)),  # attention output
        ("aby,yz->abz", (3, 7, 16), (16, 24)),  # Dense
    ],
)
def test_mixed_einsum_equals_autodiff_of_the_bfloat16_einsum(spec, x_shape, w_shape):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape, jnp.bfloat16)
    w = jax.random.normal(kw, w_shape, jnp.bfloat16)
    y_ref, vjp_ref = jax.vjp(lambda x, w: jnp.einsum(spec, x, w), x, w)
    y, vjp = jax.vjp(lambda x, w: dense.mixed_einsum(spec, x, w), x, w)
    dy = jax.random.normal(kg, y.shape, jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    # One float32 accumulation rounded once to bfloat16 either way: at most an ulp apart.
    _close(y, y_ref, 2**-7)
    for got, want in zip(vjp(dy), vjp_ref(dy)):
        assert got.dtype == want.dtype == jnp.bfloat16
        _close(got, want, 2**-7)


def _pair(make, bias_shape):
    """(ours, flax's) built from the same parameters, computing in bfloat16."""
    ours = make(dense, rngs=nnx.Rngs(0))
    theirs = make(nnx, rngs=nnx.Rngs(0))
    assert ours.bias.shape == bias_shape
    # Non-zero biases, so their gradients and the forward's bias add are both checked.
    for m in (ours, theirs):
        m.bias[...] = jnp.linspace(-1.0, 1.0, m.bias.size).reshape(bias_shape)
    return ours, theirs


@pytest.mark.parametrize("kind", ["dense", "projection"])
def test_dense_and_projection_equal_flax_in_bfloat16(kind):
    if kind == "dense":
        ours, theirs = _pair(
            lambda lib, rngs: getattr(lib, "Dense" if lib is dense else "Linear")(
                16, 24, dtype=jnp.bfloat16, rngs=rngs
            ),
            (24,),
        )
    else:
        ours, theirs = _pair(
            lambda lib, rngs: getattr(lib, "Projection" if lib is dense else "Einsum")(
                "BTD,DNH->BTNH", (16, 4, 8), (4, 8), dtype=jnp.bfloat16, rngs=rngs
            ),
            (4, 8),
        )
    assert dense.cpu_bfloat16(jnp.bfloat16)  # tests run on CPUs: the mixed path
    assert not dense.cpu_bfloat16(jnp.float32)
    x = jax.random.normal(jax.random.key(1), (2, 6, 16), jnp.float32)

    def loss(module, x):
        return jnp.sum(jnp.sin(module(x).astype(jnp.float32)))

    # The mixed path is the one taken: the jaxpr holds its custom VJPs.
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda x: ours(x))(x))
    assert "custom_vjp_call" not in str(jax.make_jaxpr(lambda x: theirs(x))(x))
    _close(ours(x), theirs(x), 2**-7)
    grads = [nnx.grad(loss, argnums=(0, 1))(m, x) for m in (ours, theirs)]
    (g_ours, dx_ours), (g_theirs, dx_theirs) = grads
    _close(dx_ours, dx_theirs, 2**-7)
    for name in ("kernel", "bias"):
        got, want = g_ours[name][...], g_theirs[name][...]
        assert got.dtype == want.dtype == jnp.float32
        _close(got, want, 2**-7)


def test_float32_projections_are_flax_s_own():
    ours = dense.Dense(8, 4, rngs=nnx.Rngs(0))
    theirs = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    x = jnp.ones((3, 8))
    assert "custom_vjp_call" not in str(jax.make_jaxpr(lambda x: ours(x))(x))
    np.testing.assert_array_equal(ours(x), theirs(x))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merged_heads_is_the_per_head_projection(dtype):
    out = dense.Projection("BTNH,NHD->BTD", (4, 8, 16), (16,), dtype=dtype, rngs=nnx.Rngs(0))
    out.bias[...] = jax.random.normal(jax.random.key(2), (16,))
    x = jax.random.normal(jax.random.key(1), (2, 3, 4, 8), jnp.float32)
    merged, per_head = out.merged_heads(x), out(x)
    assert merged.shape == per_head.shape == (2, 3, 16) and merged.dtype == per_head.dtype
    # One matmul over the same 32 products per output either way: float32 rounding apart.
    _close(merged, per_head, 1e-6 if dtype == jnp.float32 else 2**-7)
    # The merged form is one 2-D contraction; another spec falls back to the module's own call.
    assert "dot_general" in str(jax.make_jaxpr(out.merged_heads)(x))
    query = dense.Projection("BTD,DNH->BTNH", (16, 4, 8), rngs=nnx.Rngs(0))
    y = jnp.ones((2, 3, 16))
    np.testing.assert_array_equal(query.merged_heads(y), query(y))
