"""Chunked cross-entropy: same sums, predictions and gradients as the full loss, in less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxformer import losses
from jaxformer.losses import cross_entropy_sums, full_cross_entropy_sums

VOCAB = 50


def _problem(batch=2, length=37, dim=16, vocab=VOCAB, seed=0):
    # numpy, not jax.random: eager JAX ops each compile, which costs seconds on a busy CPU.
    rng = np.random.default_rng(seed)
    hidden_BxLxD = rng.standard_normal((batch, length, dim), np.float32)
    proj_DxV = rng.standard_normal((dim, vocab), np.float32) / 4
    targets_BxL = rng.integers(0, vocab, (batch, length), np.int32)
    # Zero weights in places (padding / prompt tokens) and a non-unit weight, both exact in float32.
    weights_BxL = np.where(rng.random((batch, length)) < 0.3, 0.0, 1.0).astype(np.float32)
    weights_BxL[0, 3] = 2.0
    return tuple(map(jnp.asarray, (hidden_BxLxD, proj_DxV, targets_BxL, weights_BxL)))


def _optax_sums(hidden_BxLxD, proj_DxV, targets_BxL, weights_BxL, z_loss=0.0):
    """Independent reference: whole logits and optax's cross-entropy."""
    logits_BxLxV = hidden_BxLxD @ proj_DxV
    nll_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
    predictions_BxL = jnp.argmax(logits_BxLxV, -1)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, -1)
    return dict(
        loss_sum=jnp.sum(nll_BxL * weights_BxL),
        weight_sum=jnp.sum(weights_BxL),
        correct_sum=jnp.sum((predictions_BxL == targets_BxL) * weights_BxL),
        z_loss_sum=z_loss * jnp.sum(lse_BxL**2 * weights_BxL),
    ), predictions_BxL


def _chunked(hidden_BxLxD, proj_DxV, targets_BxL, weights_BxL, **kwargs):
    return cross_entropy_sums(
        hidden_BxLxD, lambda h: h @ proj_DxV, targets_BxL, weights_BxL, **kwargs
    )


@pytest.mark.parametrize("chunk_size", [1, 8, 36, 37, 64])  # L=37: uneven, even-ish, one, >= L
def test_sums_and_predictions_match_optax(chunk_size):
    problem = _problem()
    expected, expected_predictions = jax.jit(_optax_sums, static_argnames="z_loss")(
        *problem, z_loss=1e-4
    )
    sums, predictions = jax.jit(
        _chunked, static_argnames=("chunk_size", "z_loss", "return_predictions")
    )(*problem, chunk_size=chunk_size, z_loss=1e-4, return_predictions=True)
    assert set(sums) == {"loss_sum", "weight_sum", "correct_sum", "z_loss_sum"}
    assert all(v.dtype == jnp.float32 and v.shape == () for v in sums.values())
    for name in ("loss_sum", "z_loss_sum"):
        np.testing.assert_allclose(sums[name], expected[name], rtol=1e-6)
    assert sums["weight_sum"] == expected["weight_sum"]
    assert sums["correct_sum"] == expected["correct_sum"]
    assert predictions.shape == problem[2].shape and predictions.dtype == jnp.int32
    np.testing.assert_array_equal(predictions, expected_predictions)


def test_no_z_loss_key_by_default_and_bad_chunk_size():
    problem = _problem()
    assert set(_chunked(*problem, chunk_size=8)) == {"loss_sum", "weight_sum", "correct_sum"}
    with pytest.raises(ValueError, match="chunk_size"):
        _chunked(*problem, chunk_size=0)


def test_fully_masked_chunk_and_bfloat16_hidden():
    hidden_BxLxD, proj_DxV, targets_BxL, weights_BxL = _problem(length=32)
    weights_BxL = jnp.asarray(np.asarray(weights_BxL) * (np.arange(32) // 8 != 1))  # chunk 1: all 0
    hidden_BxLxD = hidden_BxLxD.astype(jnp.bfloat16)

    def logits_fn(h_BxCxD):
        return jnp.dot(h_BxCxD, proj_DxV.astype(h_BxCxD.dtype), preferred_element_type=jnp.float32)

    full = jax.jit(full_cross_entropy_sums, static_argnums=1)(
        hidden_BxLxD, logits_fn, targets_BxL, weights_BxL
    )
    chunked = jax.jit(cross_entropy_sums, static_argnums=1, static_argnames="chunk_size")(
        hidden_BxLxD, logits_fn, targets_BxL, weights_BxL, chunk_size=8
    )
    np.testing.assert_allclose(chunked["loss_sum"], full["loss_sum"], rtol=1e-6)
    assert chunked["correct_sum"] == full["correct_sum"]


def _assert_grads_close(actual, expected):
    # The head's gradient sums h^T dlogits over all B*L positions; chunking sums per chunk and then
    # across chunks (a different float32 association), and optax's gather-based gradient adds its
    # terms in another order than our compare-and-select. Measured: at most 2.7e-7 of max|g| for
    # the head, 4.5e-8 for the hidden states. Entries that are small through cancellation differ
    # by up to ~1e-5 relative, so the bound is on the gradient's scale, not elementwise.
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(e))))


@pytest.mark.parametrize("chunk_size", [1, 8, 36])
def test_gradients_wrt_hidden_and_projection_match_full(chunk_size):
    hidden_BxLxD, proj_DxV, targets_BxL, weights_BxL = _problem()

    def loss(fn, **kwargs):
        def total(h, w):
            sums = fn(h, lambda x: x @ w, targets_BxL, weights_BxL, z_loss=1e-3, **kwargs)
            return sums["loss_sum"] + sums["z_loss_sum"]

        return jax.jit(jax.grad(total, argnums=(0, 1)))(hidden_BxLxD, proj_DxV)

    def optax_loss(h, w):
        sums = _optax_sums(h, w, targets_BxL, weights_BxL, z_loss=1e-3)[0]
        return sums["loss_sum"] + sums["z_loss_sum"]

    expected = jax.jit(jax.grad(optax_loss, argnums=(0, 1)))(hidden_BxLxD, proj_DxV)
    _assert_grads_close(loss(full_cross_entropy_sums), expected)
    _assert_grads_close(loss(cross_entropy_sums, chunk_size=chunk_size), expected)


class _TinyLM(nnx.Module):
    def __init__(self, rng: np.random.Generator):
        self.body = nnx.Param(jnp.asarray(rng.standard_normal((8, 16), np.float32)))
        self.head = nnx.Param(jnp.asarray(rng.standard_normal((16, VOCAB), np.float32) / 4))

    def hidden(self, x_BxLxI):
        return jnp.tanh(x_BxLxI @ self.body[...])

    def logits(self, h_BxCxD):
        return (h_BxCxD @ self.head[...]).astype(jnp.float32)


def test_nnx_grad_through_a_module_head_matches_full():
    """logits_fn a bound method of the model: nnx.grad reaches the head's closed-over params."""
    rng = np.random.default_rng(1)
    model = _TinyLM(rng)
    x_BxLxI = jnp.asarray(rng.standard_normal((2, 13, 8), np.float32))
    targets_BxL = jnp.asarray(rng.integers(0, VOCAB, (2, 13), np.int32))
    weights_BxL = jnp.ones((2, 13))

    def loss(fn, **kwargs):
        return lambda m: fn(m.hidden(x_BxLxI), m.logits, targets_BxL, weights_BxL, **kwargs)[
            "loss_sum"
        ]

    expected = nnx.jit(nnx.grad(loss(full_cross_entropy_sums)))(model)
    _assert_grads_close(nnx.jit(nnx.grad(loss(cross_entropy_sums, chunk_size=4)))(model), expected)
    assert float(jnp.max(jnp.abs(expected["head"][...]))) > 0


def _temp_bytes(fn, batch, length, dim, vocab, **kwargs):
    def loss(h, w, t, m):
        return fn(h, lambda x: x @ w, t, m, **kwargs)["loss_sum"]

    shapes = (
        jax.ShapeDtypeStruct((batch, length, dim), jnp.float32),
        jax.ShapeDtypeStruct((dim, vocab), jnp.float32),
        jax.ShapeDtypeStruct((batch, length), jnp.int32),
        jax.ShapeDtypeStruct((batch, length), jnp.float32),
    )
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*shapes).compile()
    stats = compiled.memory_analysis()
    assert stats is not None, "XLA gave no memory analysis on this backend"
    return stats.temp_size_in_bytes


def test_chunked_gradient_needs_far_less_memory_than_the_logits():
    batch, length, dim, vocab, chunk = 4, 2048, 64, 32000, 128
    logits_bytes = batch * length * vocab * 4
    chunk_logits_bytes = batch * chunk * vocab * 4
    full = _temp_bytes(full_cross_entropy_sums, batch, length, dim, vocab)
    chunked = _temp_bytes(cross_entropy_sums, batch, length, dim, vocab, chunk_size=chunk)
    # Measured on CPU (jax 0.10.2): full 3000 MiB (3x the 1000 MiB logits: logits, softmax and
    # their gradient), chunked 190 MiB (3x one 62.5 MiB chunk of logits).
    assert full >= logits_bytes
    assert chunked < logits_bytes / 4
    assert chunked < full / 10
    assert chunked < 6 * chunk_logits_bytes  # bounded by the chunk, not by the length


def test_batch_sharded_over_a_mesh_matches_unsharded():
    hidden_BxLxD, proj_DxV, targets_BxL, weights_BxL = _problem(batch=8)

    def sums_predictions_grads(h, w, t, m):
        def loss(h, w):
            sums, predictions = cross_entropy_sums(
                h, lambda x: x @ w, t, m, chunk_size=8, return_predictions=True
            )
            return sums["loss_sum"], (sums, predictions)

        grads, (sums, predictions) = jax.grad(loss, argnums=(0, 1), has_aux=True)(h, w)
        return sums, predictions, grads

    expected = jax.jit(sums_predictions_grads)(hidden_BxLxD, proj_DxV, targets_BxL, weights_BxL)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        by_row = NamedSharding(mesh, P("data"))
        replicated = NamedSharding(mesh, P())
        args = (
            jax.device_put(hidden_BxLxD, by_row),
            jax.device_put(proj_DxV, replicated),
            jax.device_put(targets_BxL, by_row),
            jax.device_put(weights_BxL, by_row),
        )
        step = jax.jit(sums_predictions_grads).lower(*args).compile()
        sums, predictions, grads = step(*args)
        hlo = step.as_text()
    # The batch axis stays split: no device gathers another's rows, and per-row outputs stay split.
    assert "all-gather" not in hlo
    assert predictions.sharding.spec == P("data") and grads[0].sharding.spec == P("data")
    for name in expected[0]:
        np.testing.assert_allclose(sums[name], expected[0][name], rtol=1e-6)
    assert sums["correct_sum"] == expected[0]["correct_sum"]
    np.testing.assert_array_equal(predictions, expected[1])
    _assert_grads_close(grads, expected[2])


def test_vocabulary_sharded_head_matches_and_never_gathers_logits():
    """Vocabulary-sharded head (tensor parallel): each device keeps its slice of the logits."""
    hidden_BxLxD, proj_DxV, targets_BxL, weights_BxL = _problem(length=32, vocab=8 * 16)

    def grads(h, w):
        return jax.grad(
            lambda h, w: cross_entropy_sums(
                h, lambda x: x @ w, targets_BxL, weights_BxL, chunk_size=8
            )["loss_sum"],
            argnums=(0, 1),
        )(h, w)

    expected = jax.jit(grads)(hidden_BxLxD, proj_DxV)
    mesh = jax.make_mesh((8,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        proj_DxV = jax.device_put(proj_DxV, NamedSharding(mesh, P(None, "tensor")))
        step = jax.jit(grads).lower(hidden_BxLxD, proj_DxV).compile()
        actual = step(hidden_BxLxD, proj_DxV)
    assert "all-gather" not in step.as_text()
    _assert_grads_close(actual, expected)


def test_first_argmax_is_jnp_argmax_ties_included():
    values = np.random.default_rng(0).normal(size=(6, 40, 300)).astype(np.float32)
    values[0, 3, [5, 7, 200]] = 9.0  # ties: the first index wins, as in jnp.argmax
    values[1, 4] = 0.0  # all equal
    values = jnp.asarray(values)
    np.testing.assert_array_equal(losses.first_argmax(values), jnp.argmax(values, axis=-1))
    assert losses.first_argmax(values).dtype == jnp.int32
