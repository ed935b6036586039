"""Task metrics for fine-tuned models: accuracy and macro-F1, ROUGE-L, BLEU and exact match,
entity F1 (token classification) and SQuAD exact match / F1 (question answering)."""

from __future__ import annotations

import collections
import math
import re
import string
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


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, first, last) chunks of one sentence's IOB1/IOB2/IOBES tags, as conlleval and
    seqeval's default mode read them: an I- tag after O or after another type starts a chunk."""
    found, start, prev_prefix, prev_type = set(), None, "O", ""
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, kind = tag.partition("-") if tag != "O" else ("O", "", "")
        ends = prev_prefix != "O" and (
            prev_prefix in ("E", "S")
            or prefix in ("B", "S", "O")
            or (prefix in ("I", "E") and kind != prev_type)
        )
        if ends:
            found.add((prev_type, start, i - 1))
            start = None
        begins = prefix != "O" and (
            prefix in ("B", "S")
            or prev_prefix in ("E", "S", "O")
            or kind != prev_type
            or start is None
        )
        if begins:
            start = i
        prev_prefix, prev_type = prefix, kind
    return found


def entity_metrics(
    references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Micro-averaged entity precision, recall and F1 (percent) over sentences of BIO tags, as
    seqeval's default (conlleval) mode: a chunk counts only with its type and both ends right."""
    correct = found = gold = 0
    for ref, pred in zip(references, predictions):
        ref_chunks, pred_chunks = entities(ref), entities(pred)
        correct += len(ref_chunks & pred_chunks)
        found += len(pred_chunks)
        gold += len(ref_chunks)
    precision = correct / found if found else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(entity_precision=100 * precision, entity_recall=100 * recall, entity_f1=100 * f1)


def normalize_answer(text: str) -> str:
    """SQuAD's official normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def squad_scores(prediction: str, references: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one predicted answer: the best over the reference answers."""
    pred = normalize_answer(prediction)
    exact = max(float(pred == normalize_answer(r)) for r in references)
    return exact, max(_token_f1(pred.split(), normalize_answer(r).split()) for r in references)


def _token_f1(pred: list[str], ref: list[str]) -> float:
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(references: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict:
    """SQuAD v1.1 exact match and F1 in percent (examples without a reference are skipped)."""
    scores = [squad_scores(p, r) for p, r in zip(predictions, references) if r]
    if not scores:
        return dict(exact_match=0.0, f1=0.0)
    return dict(
        exact_match=100 * float(np.mean([s[0] for s in scores])),
        f1=100 * float(np.mean([s[1] for s in scores])),
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
    of greedy outputs for the first `max_generations` examples; entity F1 of the words in the
    window (token_classification); SQuAD exact match / F1 of the best valid span (`best_spans`:
    start <= end inside the context, at most task.max_answer_tokens long) against every reference
    (question_answering; `position_accuracy` is that of the start and end argmaxes)."""
    totals = dict(loss_sum=0.0, weight_sum=0.0, correct_sum=0.0)
    labels, predictions, sources, references = [], [], [], []
    process = (jax.process_index(), jax.process_count())
    names = getattr(batcher.examples, "label_names", None)
    for step, local in enumerate(batcher.eval_batches(num_batches, *process)):
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
                "token_labels",
                "label_weights",
                "token_types",
            )
            if k in batch
        }
        real = rows["example_weight"] > 0
        if kind == "classification":
            labels.extend(rows["labels"][real].tolist())
            predictions.extend(_global(preds)[real].tolist())
        elif kind == "token_classification":
            preds_BxL = _global(preds)
            for r in np.flatnonzero(real):
                first = rows["label_weights"][r] > 0
                labels.append([names[t] for t in rows["token_labels"][r][first]])
                predictions.append([names[t] for t in preds_BxL[r][first]])
        elif kind == "question_answering":
            first_row, logits_Bx2xL = step * batcher.cfg.batch_size, _global(preds)
            spans_Bx2 = best_spans(
                logits_Bx2xL[:, 0],
                logits_Bx2xL[:, 1],
                rows["token_types"] > 0,  # the context's tokens in the window
                batcher.cfg.max_answer_tokens,
            )
            predictions.extend(
                (first_row + int(r), int(spans_Bx2[r, 0]), int(spans_Bx2[r, 1]))
                for r in np.flatnonzero(real)
            )
        elif kind == "text2text" and len(sources) < max_generations:
            sources.extend(zip(rows["encoder_inputs"][real], rows["encoder_segment_ids"][real]))
            references.extend(rows["targets"][real])
    weight = max(totals["weight_sum"], 1.0)
    result = dict(loss=totals["loss_sum"] / weight)
    if kind == "classification":
        result.update(classification_metrics(labels, predictions))
    elif kind == "token_classification":
        result["token_accuracy"] = totals["correct_sum"] / weight
        result.update(entity_metrics(labels, predictions))
    elif kind == "question_answering":
        result["position_accuracy"] = totals["correct_sum"] / weight
        result.update(_answer_metrics(batcher, predictions))
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


def best_spans(
    start_BxL: np.ndarray, end_BxL: np.ndarray, context_BxL: np.ndarray, max_answer_tokens: int
) -> np.ndarray:
    """[B, 2] (start, end) of each row's best answer span: the highest start + end logit over the
    spans with start <= end < start + max_answer_tokens, both in the context (as Hugging Face's
    SQuAD postprocessing chooses; independent argmaxes may give an end before the start or a
    question token). A row with no context token gets (0, 0), which answers ''."""
    start_BxL = np.asarray(start_BxL, np.float32)
    end_BxL = np.asarray(end_BxL, np.float32)
    context_BxL = np.asarray(context_BxL, bool)
    B, L = start_BxL.shape
    offset_LxL = np.arange(L)[None, :] - np.arange(L)[:, None]  # end - start
    allowed_BxLxL = (
        ((offset_LxL >= 0) & (offset_LxL < max_answer_tokens))[None]
        & context_BxL[:, :, None]
        & context_BxL[:, None, :]
    )
    scores_BxLxL = np.where(allowed_BxLxL, start_BxL[:, :, None] + end_BxL[:, None, :], -np.inf)
    best_B = scores_BxLxL.reshape(B, L * L).argmax(axis=1)
    spans_Bx2 = np.stack([best_B // L, best_B % L], axis=1).astype(np.int64)
    spans_Bx2[~allowed_BxLxL.reshape(B, -1).any(axis=1)] = 0
    return spans_Bx2


def _answer_metrics(batcher: TaskBatcher, predictions: list[tuple[int, int, int]]) -> dict:
    """SQuAD metrics of (example index, start, end) predictions; the examples are encoded again
    on the host, so each token's span of the context text is known."""
    refs, texts = [], []
    for k in range(0, len(predictions), 256):
        chunk = predictions[k : k + 256]
        encoded = batcher.encode_questions([batcher.examples[i] for i, _, _ in chunk])
        for q, (_, start, end) in zip(encoded, chunk):
            refs.append([text for text, _ in q.answers])
            texts.append(q.answer_text(start, end))
    return squad_metrics(refs, texts)


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
