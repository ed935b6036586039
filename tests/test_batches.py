"""Typed batches: from_rows per producer, each family's loss_inputs, and the aux-loss seam."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxformer import batches, losses, models
from jaxformer.data import objectives as obj
from jaxformer.data.tasks import TaskBatcher, TaskConfig
from jaxformer.training.step import loss_sums, make_train_step

SPECIAL = obj.SpecialIds(vocab_size=64, pad=0, eos=1, mask=2, sentinels=tuple(range(50, 60)))


class _CharTokenizer:
    """Just what TaskBatcher calls: ids 3..52 per character, and the special ids."""

    pad_id, eos_id, bos_id = 0, 1, 2

    def encode_batch(self, texts):
        return [[3 + ord(c) % 50 for c in t] for t in texts]


def _stack(rows):
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _objective_rows(name):
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 50, 17)
    seg, pos = np.ones(17, np.int32), np.arange(17, dtype=np.int32)
    if name == "causal_lm":
        return _stack([obj.causal_lm(tokens, seg, pos)] * 2)
    if name == "masked_lm":
        return _stack([obj.masked_lm(tokens[:16], seg[:16], pos[:16], rng, SPECIAL)] * 2)
    return _stack([obj.span_corruption(tokens[:16], rng, SPECIAL, 16, 8)] * 2)


def _task_rows(kind):
    examples = [
        dict(
            text="def f(): pass", label=1, source="x = 1", target="one", prompt="a", completion="b"
        )
    ] * 2
    cfg = TaskConfig(name="t", kind=kind, max_input_len=12, max_target_len=6, batch_size=2)
    return TaskBatcher(cfg, examples, _CharTokenizer(), seed=0).batch(0)


@pytest.mark.parametrize(
    "rows, expected",
    [
        (lambda: _objective_rows("causal_lm"), batches.CausalLMBatch),
        (lambda: _objective_rows("masked_lm"), batches.MaskedLMBatch),
        (lambda: _objective_rows("span_corruption"), batches.SpanCorruptionBatch),
        (lambda: _task_rows("classification"), batches.ClassificationBatch),
        (lambda: _task_rows("text2text"), batches.Text2TextBatch),
        (lambda: _task_rows("completion"), batches.CompletionBatch),
    ],
    ids=["causal_lm", "masked_lm", "span_corruption", "classification", "text2text", "completion"],
)
def test_from_rows_types_every_producers_batch(rows, expected):
    rows = rows()
    batch = batches.from_rows(rows)
    assert type(batch) is expected
    # Every key the producer wrote is kept, unchanged, in the field of that name.
    for key, value in rows.items():
        np.testing.assert_array_equal(getattr(batch, key), value)
    assert batches.from_rows(batch) is batch


def test_from_rows_names_missing_and_unknown_keys():
    rows = _objective_rows("causal_lm")
    with pytest.raises(ValueError, match=r"TokenBatch, missing \['loss_weights'\], unknown \[\]"):
        batches.from_rows({k: v for k, v in rows.items() if k != "loss_weights"})
    with pytest.raises(ValueError, match=r"missing \[\], unknown \['extra'\]"):
        batches.from_rows(dict(rows, extra=rows["inputs"]))
    classification = _task_rows("classification")
    with pytest.raises(ValueError, match=r"ClassificationBatch, missing \['labels'\]"):
        batches.from_rows({k: v for k, v in classification.items() if k != "labels"})


def test_a_family_refuses_a_batch_of_another_shape():
    model = _build("gpt-tiny")
    with pytest.raises(TypeError, match="Seq2SeqBatch"):
        model.loss_inputs(batches.from_rows(_objective_rows("span_corruption")))


# ------------------------------------------------------------------ losses through the seam


def _cfg(name, **overrides):
    return dataclasses.replace(models.preset(name), dropout_rate=0.0, **overrides)


def _build(name, cls=None, **overrides):
    cfg = _cfg(name, **overrides)
    with nnx.use_eager_sharding(False):
        return (cls or models.FAMILIES[cfg.family])(cfg, rngs=nnx.Rngs(0))


def _direct_sums(model, rows):
    """The step's loss as it was computed before typed batches: straight from hidden/classify."""
    if "labels" in rows:
        logits_BxC = model.classify(rows["inputs"], attention_mask=rows["segment_ids"] > 0)
        nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, rows["labels"])
        return dict(loss_sum=jnp.sum(nll_B * rows["example_weight"]))
    if "encoder_inputs" in rows:
        hidden = model.hidden(
            rows["encoder_inputs"],
            rows["decoder_inputs"],
            encoder_mask=rows["encoder_segment_ids"] > 0,
            decoder_mask=rows["decoder_segment_ids"] > 0,
        )
    elif model.config.family == "encoder":
        hidden = model.hidden(
            rows["inputs"],
            attention_mask=rows["segment_ids"] > 0,
            segment_ids=rows["segment_ids"],
            positions=rows["positions"],
        )
    else:
        hidden = model.hidden(
            rows["inputs"], segment_ids=rows["segment_ids"], positions=rows["positions"]
        )
    return losses.full_cross_entropy_sums(
        hidden, model.logits, rows["targets"], rows["loss_weights"]
    )


@pytest.mark.parametrize(
    "name, rows, overrides",
    [
        ("gpt-tiny", lambda: _objective_rows("causal_lm"), {}),
        ("bert-tiny", lambda: _objective_rows("masked_lm"), {}),
        ("t5-tiny", lambda: _objective_rows("span_corruption"), {}),
        ("bert-tiny", lambda: _task_rows("classification"), dict(num_labels=2)),
    ],
    ids=["decoder", "encoder-mlm", "encoder-decoder", "encoder-classify"],
)
def test_loss_through_loss_inputs_equals_the_direct_math(name, rows, overrides):
    model, rows = _build(name, **overrides), rows()
    new = nnx.jit(loss_sums)(model, rows)
    old = nnx.jit(_direct_sums)(model, rows)
    assert float(new["loss_sum"]) > 0.0
    np.testing.assert_array_equal(new["loss_sum"], old["loss_sum"])


class _AuxDecoder(models.DecoderLM):
    """A decoder with an auxiliary loss on its hidden states (as a mixture-of-experts router's)."""

    def loss_inputs(self, batch):
        inputs = super().loss_inputs(batch)
        aux = 0.5 * jnp.mean(jnp.square(inputs.hidden_BxLxD.astype(jnp.float32)))
        return dataclasses.replace(inputs, aux_losses={"hidden_l2": aux})


def _one_step(model, rows):
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    state, metrics = make_train_step(graphdef)(state, rows)
    return nnx.state(nnx.merge(graphdef, state)[0], nnx.Param), metrics


def test_aux_loss_is_added_to_the_loss_logged_and_trained():
    rows = _objective_rows("causal_lm")
    aux_model = _build("gpt-tiny", cls=_AuxDecoder)
    inputs = nnx.jit(lambda m, b: m.loss_inputs(batches.from_rows(b)).aux_losses)(aux_model, rows)
    expected_aux = float(inputs["hidden_l2"])
    assert expected_aux > 0.0
    sums = nnx.jit(loss_sums)(aux_model, rows)
    np.testing.assert_allclose(sums["aux_hidden_l2_sum"], expected_aux * sums["weight_sum"])

    plain_params, plain = _one_step(_build("gpt-tiny"), rows)
    aux_params, with_aux = _one_step(aux_model, rows)
    assert "aux_hidden_l2" not in plain
    np.testing.assert_allclose(with_aux["aux_hidden_l2"], expected_aux, rtol=1e-6)
    # Equal up to the float32 rounding of a loss near 6 (the aux itself is about 1e-3).
    ulp = np.spacing(np.float32(plain["loss"]))
    np.testing.assert_allclose(with_aux["loss"] - plain["loss"], expected_aux, rtol=0, atol=2 * ulp)
    # The aux loss has a gradient: the same start and batch give another update.
    differs = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(plain_params), jax.tree.leaves(aux_params))
    ]
    assert any(differs)
