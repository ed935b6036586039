"""Task metrics for fine-tuned models: accuracy and macro-F1, ROUGE-L, BLEU and exact match."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

import jax
import numpy as np

from jaxformer.data.tasks import TaskBatcher
from jaxformer.data.tokenizer import AnyTokenizer
from jaxformer.training.workload import Evaluator


def classification_metrics(labels: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-averaged F1 (scikit-learn)."""
    from sklearn.metrics import accuracy_score, f1_score

    return dict(
        accuracy=float(accuracy_score(labels, predictions)),
        macro_f1=float(f1_score(labels, predictions, average="macro", zero_division=0)),
    )


def text_metrics(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """ROUGE-L F-measure (rouge-score), corpus BLEU (sacrebleu) and exact match, in percent."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(references, hypotheses)]
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score
    exact = [r.strip() == h.strip() for r, h in zip(references, hypotheses)]
    return dict(
        rouge_l=100 * float(np.mean(rouge)),
        bleu=float(bleu),
        exact_match=100 * float(np.mean(exact)),
    )


def evaluate_task(
    evaluator: Evaluator,
    kind: str,
    batcher: TaskBatcher,
    tokenizer: AnyTokenizer,
    max_target_len: int,
    num_batches: Optional[int] = None,
    max_generations: int = 64,
) -> dict[str, float]:
    """Loss plus the task's metrics over a task's validation batches: accuracy and macro-F1
    (classification), token accuracy and perplexity, and for text2text ROUGE-L/BLEU/exact match
    of greedy outputs for the first `max_generations` examples."""
    totals = dict(loss_sum=0.0, weight_sum=0.0, correct_sum=0.0)
    labels, predictions, sources, references = [], [], [], []
    process = (jax.process_index(), jax.process_count())
    for local in batcher.eval_batches(num_batches, *process):
        batch, sums, preds = evaluator(local)
        for k in totals:
            totals[k] += float(jax.device_get(sums[k]))
        # Every host computes the metrics of the whole global batch.
        rows = {
            k: _global(batch[k])
            for k in (
                "example_weight",
                "labels",
                "encoder_inputs",
                "encoder_segment_ids",
                "targets",
            )
            if k in batch
        }
        real = rows["example_weight"] > 0
        if kind == "classification":
            labels.extend(rows["labels"][real].tolist())
            predictions.extend(_global(preds)[real].tolist())
        elif kind == "text2text" and len(sources) < max_generations:
            sources.extend(zip(rows["encoder_inputs"][real], rows["encoder_segment_ids"][real]))
            references.extend(rows["targets"][real])
    weight = max(totals["weight_sum"], 1.0)
    result = dict(loss=totals["loss_sum"] / weight)
    if kind == "classification":
        result.update(classification_metrics(labels, predictions))
    else:
        result["token_accuracy"] = totals["correct_sum"] / weight
        result["perplexity"] = math.exp(min(result["loss"], 50.0))
    if kind == "text2text" and sources:
        result.update(
            _generation_metrics(
                evaluator.model(),
                tokenizer,
                max_target_len,
                sources[:max_generations],
                references[:max_generations],
            )
        )
    return result


def _global(x: jax.Array) -> np.ndarray:
    """The whole (possibly multi-host) array as numpy on this host."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _generation_metrics(
    model, tok: AnyTokenizer, max_target_len: int, sources: list, references: list
) -> dict[str, Any]:
    from jaxformer.inference import generate

    tokens = np.stack([s[0] for s in sources])
    mask = np.stack([s[1] > 0 for s in sources])
    out = np.asarray(
        generate(
            model,
            tokens,
            encoder_mask=mask,
            max_new_tokens=max_target_len,
            method="greedy",
            eos_id=tok.eos_id,
        )
    )
    hypotheses = [tok.decode(until_eos(row, tok.eos_id)) for row in out]
    refs = [tok.decode(until_eos(row, tok.eos_id)) for row in references]
    return text_metrics(refs, hypotheses)


def until_eos(ids, eos_id: Union[int, Iterable[int]]) -> list[int]:
    """Token ids up to (not including) the first EOS (the first of any of several EOS ids)."""
    stops = {int(eos_id)} if isinstance(eos_id, (int, np.integer)) else {int(i) for i in eos_id}
    ids = [int(i) for i in ids]
    return next((ids[:k] for k, i in enumerate(ids) if i in stops), ids)
