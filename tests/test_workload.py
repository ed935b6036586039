"""A workload of one's own trains through the same Trainer: data, optimizer, initial parameters and
evaluation come from it; resume, checkpoints and metrics from the Trainer."""

import jax
import numpy as np
import optax

from jaxformer.data.objectives import SpecialIds
from jaxformer.data.pipeline import make_batcher
from jaxformer.data.token_store import ArrayTokens
from jaxformer.training.checkpoint import Checkpointer
from jaxformer.training.config import ExperimentConfig, load_experiment
from jaxformer.training.loop import Trainer
from jaxformer.training.workload import Workload, register, workload_class

QUIET = dict(show_progress=False, log=lambda _: None)
PERIOD = 7  # the stream repeats tokens 10..16, so the next token is always predictable


def initial_embeddings(shape) -> np.ndarray:
    return np.random.default_rng(0).normal(0.0, 0.05, shape).astype(np.float32)


@register
class RepeatingSequence(Workload):
    """Causal LM on 10, 11, ..., 16, 10, 11, ...; Adam; its own initial token embeddings."""

    name = "repeating_sequence"
    config_type = ExperimentConfig

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.initialized = 0
        self.evaluations = 0

    def batch_size(self, cfg):
        return cfg.data.batch_size

    def tokens_per_step(self, cfg):
        return cfg.data.batch_size * cfg.data.seq_len

    def prepare(self, cfg, meta, env):
        tokens = 10 + np.arange(20_000) % PERIOD
        stream = ArrayTokens(tokens, np.array([0, len(tokens)]))
        special = SpecialIds(
            vocab_size=self.tokenizer.vocab_size,
            pad=self.tokenizer.pad_id,
            eos=self.tokenizer.eos_id,
        )
        self.batcher = make_batcher(cfg.data, stream, special, cfg.train.seed, "causal_lm")
        self.eval_batcher = make_batcher(cfg.data, stream, special, 0, "causal_lm", shuffle=False)
        return cfg

    def optimizer(self, cfg):
        return optax.adam(0.02)

    def initialize(self, model, cfg, env):
        self.initialized += 1
        table = model.embed.token_embed.embedding
        table[...] = jax.device_put(initial_embeddings(table[...].shape), table[...].sharding)

    def evaluate(self, evaluator, cfg, num_batches):
        self.evaluations += 1
        local = self.eval_batcher.batch(0, jax.process_index(), jax.process_count())
        _, sums, _ = evaluator(local)
        sums = jax.device_get(sums)
        return dict(
            loss=float(sums["loss_sum"] / sums["weight_sum"]),
            next_token_accuracy=float(sums["correct_sum"] / sums["weight_sum"]),
        )


def test_own_workload_trains_resumes_and_evaluates(tiny_overrides, stdlib_tokenizer, tmp_path):
    overrides = tiny_overrides + [
        f"run.dir={tmp_path / 'run'}",
        "checkpoint.every=10",
        "train.eval_every=0",
    ]
    cfg = load_experiment(None, overrides + ["train.steps=50"])
    workload = RepeatingSequence(stdlib_tokenizer)
    trainer = Trainer(cfg, workload, **QUIET)
    assert workload.initialized == 1
    table = np.asarray(trainer.model().embed.token_embed.embedding[...])
    np.testing.assert_array_equal(table, initial_embeddings(table.shape))
    before = trainer.evaluate()
    try:
        result = trainer.run(until=40)
    finally:
        trainer.close()
    assert result["steps"] == 40
    # The run records which workload wrote it, and the registry finds that workload again.
    meta = Checkpointer(str(tmp_path / "run"), create=False).read_meta()
    assert meta["workload"] == "repeating_sequence"
    assert workload_class(meta["workload"]) is RepeatingSequence
    after = trainer.evaluate()
    assert after["loss"] < before["loss"] - 1.0, (before, after)
    assert after["next_token_accuracy"] > 0.9, after

    resumed_workload = RepeatingSequence(stdlib_tokenizer)
    resumed = Trainer(cfg, resumed_workload, **QUIET)
    try:
        assert resumed.start_step == 40 and resumed_workload.initialized == 0
        np.testing.assert_array_equal(
            np.asarray(resumed.model().embed.token_embed.embedding[...]),
            np.asarray(trainer.model().embed.token_embed.embedding[...]),
        )
        final = resumed.run()
    finally:
        resumed.close()
    # The final step's validation is the workload's own evaluation.
    assert set(final["validation"]) == {"loss", "next_token_accuracy"}
    assert resumed_workload.evaluations == 1
