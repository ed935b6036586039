"""Encoder task heads: token classification and extractive QA batches, losses, metrics, fine-tuning."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxformer import models
from jaxformer.batches import SpanBatch, TokenClassificationBatch, from_rows
from jaxformer.data import task_builders
from jaxformer.data.tasks import TaskBatcher, TaskConfig
from jaxformer.training import task_metrics
from jaxformer.training.config import load_experiment
from jaxformer.training.finetune import Finetuning, load_finetune
from jaxformer.training.loop import Trainer
from jaxformer.training.step import loss_sums

QUIET = dict(show_progress=False, log=lambda _: None)
WORDS = ["def", "parse_args", "(", "argv", "=", "None", ")", ":"]
TAGS = ["B-KEYWORD", "B-NAME", "O", "B-NAME", "B-OPERATOR", "B-KEYWORD", "O", "O"]
CONTEXT = (
    "def area(width, height=2):\n"
    "    unused = [width, height, width + height, width - height, height - width]\n"
    "    return width * height\n"
)


def tag_ids(tags):
    return [task_builders.TOKEN_TAGS.index(t) for t in tags]


def token_batcher(tokenizer, length, examples=None):
    cfg = TaskConfig(name="code_tokens", max_input_len=length, batch_size=2)
    examples = examples or [{"tokens": WORDS, "tags": tag_ids(TAGS)}] * 2
    return TaskBatcher(cfg, examples, tokenizer, seed=0, shuffle=False)


def qa_batcher(tokenizer, length, answers=("width * height",)):
    cfg = TaskConfig(name="code_qa", max_input_len=length, batch_size=2)
    item = {
        "question": "What does area return?",
        "context": CONTEXT,
        "answers": {"text": list(answers), "answer_start": [CONTEXT.index(a) for a in answers]},
    }
    return TaskBatcher(cfg, [item, item], tokenizer, seed=0, shuffle=False)


def test_code_lines_are_tagged_by_token_kind():
    line = "if x.y is not None and len(z) > 3: s = 'a' 'b'\n"
    ((_, words, tags),) = task_builders.code_lines(line)
    assert words == "if x . y is not None and len ( z ) > 3 : s = 'a' 'b'".split()
    assert tags == [
        "B-KEYWORD",
        "B-NAME",
        "I-NAME",
        "I-NAME",
        "B-KEYWORD",
        "I-KEYWORD",
        "B-KEYWORD",
        "B-KEYWORD",
        "B-BUILTIN",
        "O",
        "B-NAME",
        "O",
        "B-OPERATOR",
        "B-NUMBER",
        "O",
        "B-NAME",
        "B-OPERATOR",
        "B-STRING",
        "I-STRING",
    ]


def test_function_questions_answer_with_spans_of_the_source():
    found = task_builders.function_questions(CONTEXT, "area")
    assert found == [
        ("What does area return?", "width * height", CONTEXT.index("width * height")),
        ("Which argument of area defaults to 2?", "height", CONTEXT.index("height")),
    ]
    for _, text, start in found:
        assert CONTEXT[start : start + len(text)] == text


def test_word_labels_go_on_first_pieces(stdlib_tokenizer):
    tok = stdlib_tokenizer
    rows = token_batcher(tok, 64).batch(0)
    assert type(from_rows(rows)) is TokenClassificationBatch
    first = rows["label_weights"][0] > 0
    assert first.sum() == len(WORDS) and not first[0]  # bos is never scored
    np.testing.assert_array_equal(rows["token_labels"][0][first], tag_ids(TAGS))
    assert (rows["token_labels"][0][~first] == 0).all()
    # The pieces between two first pieces decode to exactly that word (with its space).
    starts = list(np.flatnonzero(first)) + [int(rows["segment_ids"][0].sum())]
    pieces = [tok.decode(rows["inputs"][0][a:b]) for a, b in zip(starts, starts[1:])]
    assert pieces == [WORDS[0]] + [" " + w for w in WORDS[1:]]
    assert len(tok.encode(" parse_args")) > 1  # the case that needs alignment: several pieces
    # A window that cuts the line scores only the words whose first piece it holds.
    cut = token_batcher(tok, int(starts[3])).batch(0)
    assert cut["label_weights"][0].sum() == 3
    np.testing.assert_array_equal(
        cut["token_labels"][0][cut["label_weights"][0] > 0], tag_ids(TAGS)[:3]
    )
    # Eval padding rows get weight 0 everywhere.
    (last,) = token_batcher(tok, 64, [{"tokens": WORDS, "tags": tag_ids(TAGS)}]).eval_batches()
    assert last["label_weights"][1].sum() == 0 and last["label_weights"][0].sum() == len(WORDS)


def test_word_label_count_must_match(stdlib_tokenizer):
    batcher = token_batcher(stdlib_tokenizer, 32, [{"tokens": WORDS, "tags": [0]}])
    with pytest.raises(ValueError, match="8 words in 'tokens' but 1 labels in 'tags'"):
        batcher.batch(0)


def test_answer_positions_point_at_the_answer(stdlib_tokenizer):
    batcher = qa_batcher(stdlib_tokenizer, 96)
    rows = batcher.batch(0)
    assert type(from_rows(rows)) is SpanBatch
    (q, _) = batcher.encode_questions(batcher.examples)
    start, end = int(rows["start_positions"][0]), int(rows["end_positions"][0])
    assert q.context_start <= start <= end
    assert q.answer_text(start, end) == "width * height"
    types = rows["token_types"][0]
    assert not types[: q.context_start].any() and types[q.context_start : len(q.ids)].all()
    assert not types[len(q.ids) :].any()
    assert rows["inputs"][0][q.context_start - 1] == stdlib_tokenizer.eos_id
    assert q.answer_text(0, end) == ""  # a span starting in the question is no answer
    # An answer cut by the window is no target: both positions point at the bos (0).
    assert q.context_start <= end // 2 - 1  # a window of `end` tokens keeps the whole question
    short = qa_batcher(stdlib_tokenizer, end)  # but not the answer's last token
    rows = short.batch(0)
    assert rows["start_positions"][0] == rows["end_positions"][0] == 0


def tiny_bert(tokenizer, num_labels, seed):
    cfg = dataclasses.replace(
        models.preset("bert-tiny"), vocab_size=tokenizer.vocab_size, num_labels=num_labels
    )
    model = models.create(cfg, rngs=nnx.Rngs(seed))
    model.eval()
    return model


@pytest.fixture(scope="module")
def bert(stdlib_tokenizer):
    return tiny_bert(stdlib_tokenizer, len(task_builders.TOKEN_TAGS), 0)


def test_token_loss_counts_only_first_pieces(bert, stdlib_tokenizer):
    rows = token_batcher(stdlib_tokenizer, 32).batch(0)
    sums = loss_sums(bert, rows)
    assert float(sums["weight_sum"]) == 2 * len(WORDS)
    logits = np.asarray(
        bert.token_logits(
            jnp.asarray(rows["inputs"]), attention_mask=jnp.asarray(rows["segment_ids"] > 0)
        )
    )
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, rows["token_labels"])
    expected = float((np.asarray(nll) * rows["label_weights"]).sum())
    assert float(sums["loss_sum"]) == pytest.approx(expected, rel=1e-5)
    # Labels where the weight is 0 do not matter.
    other = dict(rows, token_labels=np.where(rows["label_weights"] > 0, rows["token_labels"], 3))
    assert float(loss_sums(bert, other)["loss_sum"]) == float(sums["loss_sum"])


def test_span_loss_is_the_mean_of_start_and_end(stdlib_tokenizer):
    model = tiny_bert(stdlib_tokenizer, 2, 1)
    rows = qa_batcher(stdlib_tokenizer, 48).batch(0)
    sums = loss_sums(model, rows)
    assert float(sums["weight_sum"]) == 4  # start and end of 2 rows
    real = rows["segment_ids"] > 0
    start, end = model.span_logits(
        jnp.asarray(rows["inputs"]),
        attention_mask=jnp.asarray(real),
        token_types=jnp.asarray(rows["token_types"]),
    )
    expected = 0.0
    for logits, target in ((start, rows["start_positions"]), (end, rows["end_positions"])):
        masked = np.where(real, np.asarray(logits), -np.inf)  # padding is never an answer
        expected += float((optax.softmax_cross_entropy_with_integer_labels(masked, target)).sum())
    assert float(sums["loss_sum"]) == pytest.approx(expected, rel=1e-5)


def test_entity_f1_counts_whole_typed_chunks():
    refs = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    preds = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "B-ORG"]]
    # Gold chunks: PER 0-1, LOC 3, ORG 0; predicted: PER 0 (wrong end), LOC 3, ORG 0, ORG 1.
    got = task_metrics.entity_metrics(refs, preds)
    precision, recall = 2 / 4, 2 / 3
    assert got["entity_precision"] == pytest.approx(100 * precision)
    assert got["entity_recall"] == pytest.approx(100 * recall)
    assert got["entity_f1"] == pytest.approx(100 * 2 * precision * recall / (precision + recall))
    # conlleval: an I- tag after O or after another type opens a chunk of its own type.
    assert task_metrics.entities(["O", "I-A", "I-A", "I-B", "B-B"]) == {
        ("A", 1, 2),
        ("B", 3, 3),
        ("B", 4, 4),
    }
    seqeval = pytest.importorskip("seqeval.metrics")
    rng = np.random.default_rng(0)
    tags = ["O", "B-A", "I-A", "B-B", "I-B"]
    refs = [list(rng.choice(tags, 9)) for _ in range(40)]
    preds = [list(rng.choice(tags, 9)) for _ in range(40)]
    ours = task_metrics.entity_metrics(refs, preds)["entity_f1"]
    assert ours == pytest.approx(100 * seqeval.f1_score(refs, preds))


def test_squad_normalisation_and_scores():
    assert task_metrics.normalize_answer("The  Cat's, hat!") == "cats hat"
    assert task_metrics.normalize_answer("an apple a day") == "apple day"
    assert task_metrics.squad_scores("the width * height", ["width*height", "Width * Height"]) == (
        1.0,
        1.0,
    )
    # "red big dog" vs "the big dog": 2 shared tokens, precision 2/3, recall 2/2.
    exact, f1 = task_metrics.squad_scores("red big dog", ["nothing", "the big dog"])
    assert exact == 0.0 and f1 == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    got = task_metrics.squad_metrics([["a b"], ["c"]], ["a b", "d"])
    assert got == dict(exact_match=50.0, f1=50.0)


def test_the_answer_is_the_best_valid_span_not_two_argmaxes():
    """Start and end are chosen together (start + end logit over the valid spans), as HF's SQuAD
    postprocessing does: independent argmaxes here give an end before the start, a question
    token, and an over-long span."""
    L, question = 8, 3  # tokens 0..2: bos, question, eos; 3..6 the context; 7 padding
    context = np.zeros((4, L), bool)
    context[:3, question:7] = True
    start, end = np.full((4, L), -5.0), np.full((4, L), -5.0)
    start[0, [4, 5]], end[0, [4, 6]] = [2.0, 3.0], [4.0, 1.0]  # argmaxes: start 5 > end 4
    start[1, [1, 3]], end[1, [1, 5]] = [9.0, 1.0], [9.0, 1.0]  # argmaxes: the question's token 1
    start[2, 3], end[2, [4, 6]] = 5.0, [1.0, 5.0]  # best pair (3, 6) is 4 tokens long
    start[3, 1] = end[3, 1] = 9.0  # no context in the window (cut): no answer
    independent = np.stack([start.argmax(1), end.argmax(1)], axis=1)
    assert independent[:3].tolist() == [[5, 4], [1, 1], [3, 6]]
    spans = task_metrics.best_spans(start, end, context, max_answer_tokens=3)
    assert spans.tolist() == [[4, 4], [3, 5], [3, 4], [0, 0]]
    assert task_metrics.best_spans(start, end, context, max_answer_tokens=4)[2].tolist() == [3, 6]


@pytest.fixture(scope="module")
def pretrained_bert(stdlib_data_dir, stdlib_tokenizer, tmp_path_factory):
    """A few steps of bert-tiny masked-LM pretraining: a run to fine-tune from, not a good model."""
    root = tmp_path_factory.mktemp("pretrained_bert")
    stdlib_tokenizer.save(str(root / "tok.model"))
    cfg = load_experiment(
        None,
        [
            "model.preset=bert-tiny",
            "model.max_len=128",
            f"data.data_dir={stdlib_data_dir}",
            f"data.tokenizer_path={root / 'tok.model'}",
            "data.seq_len=64",
            "data.batch_size=8",
            "train.steps=5",
            "optimizer.warmup_steps=2",
            "train.eval_every=0",
            "train.eval_batches=1",
            "checkpoint.async_save=false",
            f"run.dir={root / 'bert'}",
        ],
    )
    trainer = Trainer(cfg, **QUIET)
    trainer.run()
    trainer.close()
    return str(root / "bert")


@pytest.mark.parametrize(
    "config, head, metric",
    [("code_tokens", "token_classification", "entity_f1"), ("code_qa", "question_answering", "f1")],
)
def test_builtin_demo_fine_tunes(pretrained_bert, stdlib_data_dir, tmp_path, config, head, metric):
    from jaxformer.convert.runs import run_head

    run_dir = str(tmp_path / config)
    overrides = [
        f"task.data_dir={stdlib_data_dir}",
        "task.max_input_len=96",
        "task.batch_size=8",
        "task.max_examples=40",
        f"run.dir={run_dir}",
        "train.steps=6",
        "train.eval_every=0",
        "optimizer.warmup_steps=2",
        "checkpoint.async_save=false",
    ]
    cfg, meta = load_finetune(pretrained_bert, None, f"configs/finetune/{config}.yaml", overrides)
    trainer = Trainer(cfg, Finetuning(meta), **QUIET)
    assert trainer.workload.kind == head
    expected_labels = 2 if head == "question_answering" else len(task_builders.TOKEN_TAGS)
    assert trainer.cfg.model.num_labels == expected_labels
    # A fresh classifier, unless pretraining's (never trained, num_labels 2) has the QA shape.
    assert set(trainer.workload.new_parameters) <= {"classifier.bias", "classifier.kernel"}
    result = trainer.run()
    trainer.close()
    val = result["validation"]
    print(config, val)
    assert metric in val and 0.0 <= val[metric] <= 100.0 and math.isfinite(val["loss"])
    assert run_head(run_dir) == head  # to-hf writes the task's Hugging Face class


@pytest.mark.parametrize("name, label", [("conll2003", "ner"), ("squad", "")])
def test_tfds_configs_read_the_tfds_features(name, label, stdlib_tokenizer, tmp_path):
    """The TFDS configs name features of the real builders (their specs need no download), and
    records as a TFDS data source returns them (numpy bytes arrays, dicts of sequences) batch."""
    from jaxformer.config import load_config
    from jaxformer.data.tasks import TaskExamples, _tfds_builder
    from jaxformer.training.finetune import FinetuneExperiment

    task = load_config(FinetuneExperiment, f"configs/finetune/{name}.yaml", []).task.resolved()
    features = _tfds_builder(name, str(tmp_path)).info.features
    keys = [task.input_key, task.target_key, task.label_key, task.context_key]
    assert {k for k in keys if k} <= set(features) and task.label_key == label
    task = dataclasses.replace(task, batch_size=2, max_input_len=48)
    if name == "conll2003":
        record = {
            "tokens": np.array([b"EU", b"rejects", b"German", b"call"], dtype=object),
            "ner": np.array([3, 0, 7, 0]),
        }
        names = features["ner"].feature.names
        examples = TaskExamples([record], task, "dev", 1, label_names=names)
        assert examples[0] == {"tokens": ["EU", "rejects", "German", "call"], "ner": [3, 0, 7, 0]}
        rows = TaskBatcher(task, examples, stdlib_tokenizer, 0).batch(0)
        np.testing.assert_array_equal(
            rows["token_labels"][0][rows["label_weights"][0] > 0], [3, 0, 7, 0]
        )
    else:
        context = "Paris is the capital of France."
        record = {
            "question": b"What is the capital of France?",
            "context": context.encode(),
            "answers": {
                "text": np.array([b"Paris", b"Paris"], dtype=object),
                "answer_start": np.array([0, 0], np.int32),
            },
        }
        examples = TaskExamples([record], task, "validation", 1)
        batcher = TaskBatcher(task, examples, stdlib_tokenizer, 0)
        rows = batcher.batch(0)
        (q,) = batcher.encode_questions([examples[0]])
        assert q.answers == [("Paris", 0), ("Paris", 0)]
        assert q.answer_text(rows["start_positions"][0], rows["end_positions"][0]) == "Paris"
