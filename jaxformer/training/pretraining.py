"""The pretraining workload: token stores, packed (or mixed) batches, language-model validation."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax

from jaxformer.data.mixture import MixtureBatcher
from jaxformer.data.pipeline import make_batcher
from jaxformer.data.prepare import prepare_data
from jaxformer.data.tokenizer import check_objective_ids, model_vocab_size
from jaxformer.training import metrics as metrics_lib
from jaxformer.training.config import ExperimentConfig
from jaxformer.training.workload import Evaluator, RunEnv, Workload, register

EVAL_SEED = 0
# Continuations `eval.py` shows for a decoder pretrained on the built-in (Python) corpus.
SAMPLE_PROMPTS = ("def fibonacci(n):", "import os\n", "class Stack:\n")


@register
class Pretraining(Workload):
    """Language-model pretraining on the config's data section (one dataset or a mixture)."""

    name = "pretraining"
    config_type = ExperimentConfig

    def with_eval_split(self, cfg: ExperimentConfig, split: str) -> ExperimentConfig:
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_split=split))

    def batch_size(self, cfg: ExperimentConfig) -> int:
        return cfg.data.batch_size

    def tokens_per_step(self, cfg: ExperimentConfig) -> int:
        length = cfg.data.target_len if cfg.objective == "span_corruption" else cfg.data.seq_len
        return cfg.data.batch_size * length

    def row_lengths(self, cfg: ExperimentConfig) -> tuple[int, int]:
        seq2seq = cfg.model.family == "encoder_decoder"
        return cfg.data.seq_len, cfg.data.target_len if seq2seq else 0

    def prepare(self, cfg: ExperimentConfig, meta: Optional[dict], env: RunEnv) -> ExperimentConfig:
        env.log(
            f"[data] preparing {', '.join(s.dataset for s in cfg.data.sources())} "
            "(tokenizer, token shards)"
        )
        self.data = prepare_data(
            cfg.data,
            env.run_dir,
            show_progress=env.show_progress,
            log=env.log,
            tokenizer_model=None if meta is None else meta["tokenizer"],
        )
        self.tokenizer = self.data.tokenizer
        check_objective_ids(self.tokenizer, cfg.objective)
        # A checkpoint's model (a converted one) may have more embedding rows than its tokenizer.
        stored = None if meta is None else meta["config"]["model"]["vocab_size"]
        vocab_size = model_vocab_size(self.tokenizer, stored)
        model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab_size)
        model_cfg.check_length(cfg.data.seq_len, "data.seq_len")
        cfg = dataclasses.replace(cfg, model=model_cfg)
        special, sources = self.data.special_ids, self.data.sources
        batchers = [
            make_batcher(cfg.data, s.train, special, cfg.train.seed, cfg.objective, source_index=i)
            for i, s in enumerate(sources)
        ]
        self.batcher = (
            batchers[0]
            if len(batchers) == 1
            else MixtureBatcher(batchers, [s.weight for s in sources], cfg.train.seed)
        )
        # Validation rows are spread over the whole split with a fixed seed, so every run (and
        # every training seed) is measured on the same tokens; each source is measured alone.
        self.eval_batchers = {
            s.name: make_batcher(
                cfg.data, s.eval, special, EVAL_SEED, cfg.objective, source_index=i
            )
            for i, s in enumerate(sources)
        }
        self.token_bytes = metrics_lib.token_byte_lengths(self.tokenizer)
        self.unigram_log_probs = metrics_lib.unigram_log_probs_from_counts(
            self.data.train_token_counts()
        )
        return cfg

    def evaluate(
        self, evaluator: Evaluator, cfg: ExperimentConfig, num_batches: Optional[int]
    ) -> dict[str, float]:
        """Validation loss, accuracy, perplexity and bits per byte over the first batches of each
        source; with several sources, also each one's as '<source>/<metric>'."""
        num_batches = num_batches or cfg.train.eval_batches
        process = (jax.process_index(), jax.process_count())
        # The device sums are global already; the host-side ones (bytes, unigram -log p) count
        # only this process's rows until summed over all processes below.
        device_totals, local_bytes = {}, {}
        unigram_nll, unigram_count = 0.0, 0
        for name, batcher in self.eval_batchers.items():
            totals = dict(loss_sum=0.0, weight_sum=0.0, correct_sum=0.0)
            local_bytes[name] = 0.0
            # Stay within one pass over the validation split.
            count = max(1, min(num_batches, batcher.stream.rows_per_epoch // cfg.data.batch_size))
            for i in range(count):
                local = batcher.batch(i, *process)
                _, sums, _ = evaluator(local)
                for k, v in jax.device_get(sums).items():  # replicated: readable on every host
                    totals[k] += float(v)
                targets = local["targets"][local["loss_weights"] > 0]
                local_bytes[name] += float(self.token_bytes[targets].sum())
                unigram_nll -= float(self.unigram_log_probs[targets].sum())
                unigram_count += targets.size
            device_totals[name] = totals
        *byte_sums, unigram_nll, unigram_count = metrics_lib.sum_over_processes(
            [*local_bytes.values(), unigram_nll, unigram_count]
        )
        overall = dict(loss_sum=0.0, weight_sum=0.0, correct_sum=0.0, byte_sum=0.0)
        summary = {}
        for (name, totals), byte_sum in zip(device_totals.items(), byte_sums):
            totals = dict(totals, byte_sum=float(byte_sum))
            for k, v in totals.items():
                overall[k] += v
            if len(self.eval_batchers) > 1:
                summary.update(
                    {f"{name}/{k}": v for k, v in metrics_lib.summarize_eval(totals).items()}
                )
        summary = dict(metrics_lib.summarize_eval(overall), **summary)
        if unigram_count:
            summary["unigram_loss"] = float(unigram_nll / unigram_count)
        return summary

    def prefetch_options(self, cfg: ExperimentConfig) -> dict[str, int]:
        return dict(threads=cfg.data.prefetch_threads, buffer=cfg.data.prefetch)

    def sample_prompts(self, cfg: ExperimentConfig) -> tuple[str, ...]:
        return SAMPLE_PROMPTS if cfg.model.family == "decoder" else ()
