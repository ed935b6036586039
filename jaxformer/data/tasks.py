"""Fine-tuning tasks: TaskConfig, random-access examples (built-in or any TFDS dataset) and their batches.

Batches are a pure function of (seed, step): epoch e visits the examples in a permutation seeded by
(seed, e); global rows step*B .. step*B+B-1 run across epoch ends; each process takes a contiguous
slice. Formats (int32, weights float32; L = max_input_len, Ld = max_target_len):

classification  inputs [B,L] = bos + tokens[:L-1] + pad, segment_ids, positions, labels [B],
                example_weight [B]
text2text       encoder_inputs [B,L] = tokens[:L-1] + eos + pad (the encoder always sees its end),
                targets [B,Ld] = (tokens + eos)[:Ld] (a cut target has no eos: the model is not taught
                to stop at an arbitrary cut), decoder_inputs = 0 + targets[:-1], loss_weights (1 on
                real targets), encoder_/decoder_segment_ids, encoder_/decoder_positions, example_weight
completion      seq = prompt + bos (separator) + completion + eos, at most L+1 tokens; inputs = seq[:-1],
                targets = seq[1:] [B,L], loss_weights 1 on completion targets (its eos included),
                segment_ids, positions, prompt_lengths [B] (inputs up to and including the separator),
                example_weight. max_target_len is unused. When too long, the completion keeps at least
                half of the L+1 budget (more if the prompt is short) and is cut on the right; the prompt
                takes the rest and is cut on the left, so the text next to the separator survives.
token_classification  a list of words with a label each (e.g. conll2003 tokens / ner). Word i is
                encoded on its own, as " " + word after the first, so its pieces are its own;
                inputs [B,L] = bos + the words' pieces[:L-1] + pad, segment_ids, positions,
                token_labels [B,L] (the word's label on its first piece, 0 elsewhere),
                label_weights [B,L] (1 on first pieces in the window), example_weight. Words cut
                off by the window are neither trained nor scored.
question_answering  a question, a context and SQuAD-style answers ({text: [...], answer_start:
                [...]}, character offsets). The context is split into words (a run of word
                characters, or one other non-space character, each with the whitespace before it)
                encoded one by one, so every token belongs to one word and a predicted span is a
                slice of the context text. inputs [B,L] = bos + question[:L/2] + eos + context +
                pad, token_types (1 on the context), segment_ids, positions, start_positions /
                end_positions [B] (the first / last token of the first answer's words; 0, the bos,
                when the answer lies past the window, as Hugging Face's run_qa), example_weight.

Your own JSONL files (name 'jsonl', train_files / eval_files) are read by jaxformer.data.jsonl_tasks:
their completion and chat kinds pack several examples per row (its docstring gives that format);
their text2text kind makes the rows above.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import math
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import numpy as np
import tensorflow_datasets as tfds

from jaxformer.data import corpus
from jaxformer.data.config import DataConfig, SourceConfig
from jaxformer.data.task_builders import BUILDERS, build_task_dataset
from jaxformer.data.token_store import TokenSource
from jaxformer.data.tokenizer import Tokenizer

KINDS = (
    "classification",
    "text2text",
    "completion",
    "chat",
    "token_classification",
    "question_answering",
)
BUILTIN_KINDS = {
    "code_package": "classification",
    "code_docstring": "text2text",
    "code_completion": "completion",
    "code_tokens": "token_classification",
    "code_qa": "question_answering",
}
DEFAULT_KEYS = {  # kind -> (input_key, target_key, label_key)
    "classification": ("text", "", "label"),
    "text2text": ("source", "target", ""),
    "completion": ("prompt", "completion", ""),
    "token_classification": ("tokens", "", "tags"),
    "question_answering": ("question", "answers", ""),
}
LABELLED_KINDS = ("classification", "token_classification")
"""Kinds whose label_key is a ClassLabel feature (per row, or a sequence of them per word)."""
WORD_KINDS = ("token_classification", "question_answering")
"""Kinds encoded word by word per batch (alignment needs each word's pieces), not token stores."""
# TFDS dataset collections registered only on import (the rest register by folder).
_LEGACY_COLLECTIONS = (
    "text",
    "summarization",
    "question_answering",
    "translate",
    "text_simplification",
)
_PERMUTATION_SALT = 0x7A5C
JSONL = "jsonl"
"""The task name of your own JSONL files (jaxformer.data.jsonl_tasks)."""


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """A fine-tuning dataset and the shapes of its batches."""

    name: str = "code_package"
    """'code_package', 'code_docstring', 'code_completion', 'code_tokens', 'code_qa', 'jsonl' (your
    own files: train_files, eval_files) or a TFDS name such as 'glue/sst2'."""
    kind: str = "auto"
    """'auto' (known for the built-ins; for jsonl, from the first line's keys), 'classification',
    'text2text', 'completion', 'token_classification', 'question_answering' or 'chat' (jsonl
    only)."""
    input_key: str = ""
    """Feature holding the input text; '' -> text / source / prompt / tokens (a list of words) /
    question by kind (jsonl: prompt / input / messages)."""
    target_key: str = ""
    """Feature holding the target text (text2text, completion) or the answers (question_answering,
    SQuAD's {text, answer_start}); '' -> target / completion / answers by kind."""
    label_key: str = ""
    """ClassLabel feature (classification; token_classification: a sequence of them, one per
    word); '' -> label / tags."""
    context_key: str = ""
    """Feature holding the context the answer is cut from (question_answering); '' -> context."""
    data_dir: str = ""
    """TFDS data directory; '' -> ~/.cache/jaxformer/tfds (as corpus.resolve_data_dir)."""
    train_split: str = "train"
    """Split to fine-tune on."""
    eval_split: str = "validation"
    """Split to evaluate on."""
    max_input_len: int = 128
    """Classifier / encoder length; for completion the decoder's whole sequence length."""
    max_target_len: int = 32
    """Decoder length for text2text (unused for the other kinds)."""
    batch_size: int = 16
    """Global batch size (all processes together)."""
    max_examples: Optional[int] = None
    """Use only the first max_examples examples of each split (None: all)."""
    max_answer_tokens: int = 30
    """question_answering: the longest answer span (in tokens) evaluation may predict; the answer
    is the context span of best start + end logit within it (HF's SQuAD max_answer_length). A
    context is cut to max_input_len (no document stride): an answer past the cut scores 0."""
    train_files: tuple[str, ...] = ()
    """JSONL files to fine-tune on (name 'jsonl'; local paths or gs://...), read in order."""
    eval_files: tuple[str, ...] = ()
    """JSONL files to evaluate on (name 'jsonl'); give the train files to evaluate on those."""

    def __post_init__(self) -> None:
        if self.kind not in ("auto",) + KINDS:
            raise ValueError(f"task kind {self.kind!r} is not one of auto, {', '.join(KINDS)}")
        if self.name == JSONL:
            for field in ("train_files", "eval_files"):
                if not getattr(self, field):
                    raise ValueError(
                        f"task.name=jsonl needs task.{field}: a list of JSONL files, e.g. "
                        f"task.{field}=[data/{field.split('_')[0]}.jsonl]"
                    )
            if self.kind in LABELLED_KINDS + WORD_KINDS:
                raise ValueError("task.name=jsonl reads completion, chat or text2text files")
        else:
            given = [f for f in ("train_files", "eval_files") if getattr(self, f)]
            if given:
                raise ValueError(
                    f"task.{given[0]} is read only with task.name=jsonl (task.name is {self.name!r})"
                )
            if self.kind == "chat":
                raise ValueError("task.kind=chat reads JSONL files: set task.name=jsonl")
        if self.kind == "auto" and self.name not in BUILTIN_KINDS and self.name != JSONL:
            raise ValueError(
                f"task {self.name!r} is not a built-in ({', '.join(BUILTIN_KINDS)}): set kind to one of "
                f"{', '.join(KINDS)}"
            )
        for field in ("max_input_len", "max_target_len", "batch_size", "max_answer_tokens"):
            if getattr(self, field) < 1:
                raise ValueError(f"task {field} must be positive, got {getattr(self, field)}")
        if self.max_input_len < 2:
            raise ValueError(f"task max_input_len must be >= 2, got {self.max_input_len}")
        if self.max_examples is not None and self.max_examples < 0:
            raise ValueError(f"task max_examples must be >= 0 or None, got {self.max_examples}")

    def resolved(self) -> TaskConfig:
        """A copy with kind and the feature keys filled in (jsonl 'auto': from the first line)."""
        if self.name == JSONL:
            from jaxformer.data import jsonl_tasks  # pylint: disable=g-import-not-at-top

            kind = jsonl_tasks.sniff_kind(self.train_files) if self.kind == "auto" else self.kind
            keys = jsonl_tasks.DEFAULT_KEYS[kind]
        else:
            kind = BUILTIN_KINDS[self.name] if self.kind == "auto" else self.kind
            keys = DEFAULT_KEYS[kind]
        labelled = kind in LABELLED_KINDS
        return dataclasses.replace(
            self,
            kind=kind,
            input_key=self.input_key or keys[0],
            target_key=(self.target_key or keys[1]) if not labelled else "",
            label_key=(self.label_key or keys[2]) if labelled else "",
            context_key=(self.context_key or "context") if kind == "question_answering" else "",
        )


class TaskExamples(corpus.RandomAccessView):
    """Random-access examples of one split: dicts of the task's keys (str texts, int labels)."""

    item_name = "example"

    def __init__(
        self,
        source: Sequence[Any],
        cfg: TaskConfig,
        split: str,
        length: int,
        label_names: Optional[list[str]] = None,
    ):
        super().__init__(source, length)
        self.cfg, self.split = cfg, split
        self.keys = tuple(
            k for k in (cfg.input_key, cfg.target_key, cfg.label_key, cfg.context_key) if k
        )
        self.label_names = label_names

    @property
    def num_labels(self) -> Optional[int]:
        """Number of classes (classification), else None."""
        return None if self.label_names is None else len(self.label_names)

    def _convert(self, record: Any) -> dict:
        return {k: _plain(record[k]) for k in self.keys}


def _plain(value: Any) -> Any:
    """A TFDS feature value as plain Python, sequences (lists) and dicts of features included."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim):
        return [_plain(v) for v in value]
    return corpus.python_value(value)


class _TextField(Sequence):
    """One text feature of task examples, as a random-access sequence of str."""

    def __init__(self, examples: Sequence[Mapping[str, Any]], key: str):
        self._examples, self._key = examples, key

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index):  # type: ignore[override]
        return str(self._examples[index][self._key])


def tokenize_task_fields(
    cfg: TaskConfig,
    examples: TaskExamples,
    tokenizer: Tokenizer,
    *,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, TokenSource]:
    """The split's text fields tokenized once into token stores (example i is document i), kept
    beside the TFDS data and reused by later runs with the same tokenizer."""
    from jaxformer.data import jsonl_tasks, prepare  # pylint: disable=g-import-not-at-top

    cfg = cfg.resolved()
    if cfg.kind in WORD_KINDS:
        return {}  # encoded word by word per batch (see the module docstring)
    if cfg.name == JSONL and cfg.kind in jsonl_tasks.PACKED_KINDS:
        store = jsonl_tasks.tokenize_pieces(
            cfg, examples, tokenizer, show_progress=show_progress, log=log
        )
        return {jsonl_tasks.PIECES: store}
    # A JSONL split's stores are keyed by its files' contents, not by the name 'jsonl'.
    dataset = examples.store_name if cfg.name == JSONL else cfg.name
    data = DataConfig(data_dir=cfg.data_dir)
    stores: dict[str, TokenSource] = {}
    for key in (cfg.input_key, cfg.target_key):
        if key:
            source = SourceConfig(
                dataset=dataset,
                text_key=key,
                data_dir=cfg.data_dir,
                max_documents=cfg.max_examples,
            )
            stores[key] = prepare.tokenize_split(
                data,
                source,
                examples.split,
                tokenizer,
                texts=_TextField(examples, key),
                show_progress=show_progress,
                log=log,
            )
    return stores


def _tfds_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    try:
        return tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError:
        pass
    for collection in _LEGACY_COLLECTIONS:
        try:
            importlib.import_module(f"tensorflow_datasets.{collection}")
        except Exception:  # pylint: disable=broad-except  (a collection may need TensorFlow)
            continue
    try:
        return tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"unknown TFDS dataset {name!r} ({first_line})") from None


def load_task(cfg: TaskConfig, split: str) -> TaskExamples:
    """The examples of one split of cfg's dataset (built-ins are prepared on first use; jsonl:
    the split's files, read and checked line by line)."""
    cfg = cfg.resolved()
    if cfg.name == JSONL:
        from jaxformer.data import jsonl_tasks  # pylint: disable=g-import-not-at-top

        return jsonl_tasks.load_jsonl(cfg, split)
    data_dir = corpus.resolve_data_dir(cfg.data_dir)
    if cfg.name in BUILDERS:
        builder = build_task_dataset(cfg.name, data_dir)
    else:
        builder = _tfds_builder(cfg.name, data_dir)
    features = builder.info.features
    keys = [k for k in (cfg.input_key, cfg.target_key, cfg.label_key, cfg.context_key) if k]
    for key in keys:
        if key not in features:
            raise ValueError(
                f"feature {key!r} not in dataset {cfg.name!r}; available: {', '.join(sorted(features))}"
            )
    label_names = None
    if cfg.kind == "classification":
        label = features[cfg.label_key]
        if not isinstance(label, tfds.features.ClassLabel):
            raise ValueError(
                f"classification needs a ClassLabel feature; {cfg.name!r}[{cfg.label_key!r}] is {label}"
            )
        label_names = list(label.names)
    elif cfg.kind == "token_classification":
        label = features[cfg.label_key]
        inner = getattr(label, "feature", None)
        if not isinstance(label, tfds.features.Sequence) or not isinstance(
            inner, tfds.features.ClassLabel
        ):
            raise ValueError(
                "token_classification needs a sequence of ClassLabel features (one per word); "
                f"{cfg.name!r}[{cfg.label_key!r}] is {label}"
            )
        label_names = list(inner.names)
    if cfg.name in BUILDERS:
        if split not in builder.info.splits:
            raise ValueError(
                f"split {split!r} not in dataset {cfg.name!r}; "
                f"available: {', '.join(sorted(builder.info.splits))}"
            )
        source = builder.as_data_source(split=split)
    else:
        # Shares corpus's errors for an unprepared dataset or a missing split.
        source = corpus._tfds_source(  # pylint: disable=protected-access
            cfg.name, split, data_dir, cfg.input_key
        )
    length = len(source) if cfg.max_examples is None else min(len(source), cfg.max_examples)
    if length == 0:
        raise ValueError(f"dataset {cfg.name!r} split {split!r} has no examples")
    return TaskExamples(source, cfg, split, length, label_names)


# A context word: a run of word characters, or one other non-space character, with the whitespace
# before it (so words encoded one by one decode back to the context).
_CONTEXT_WORD = re.compile(r"\s*(\w+|[^\w\s])")


@dataclasses.dataclass(frozen=True)
class EncodedQuestion:
    """One question_answering example as the model sees it, for metrics on the host."""

    ids: list[int]  # bos, question, eos, context tokens (cut to max_input_len)
    context_start: int  # index of the first context token
    # Each token's word's character span in the context ((0, 0) before it), for the whole
    # sequence: tokens past the window too, so an answer cut inside a word is seen as cut.
    spans: list[tuple[int, int]]
    context: str
    answers: list[tuple[str, int]]  # (text, character offset) of each reference answer

    def answer_text(self, start: int, end: int) -> str:
        """The context text of tokens start..end (inclusive); '' for a span outside the context."""
        if not self.context_start <= start <= end < len(self.ids):
            return ""
        return self.context[self.spans[start][0] : self.spans[end][1]]


def _answers(value: Any, cfg: TaskConfig) -> list[tuple[str, int]]:
    """(text, character offset) pairs of a SQuAD-style answers feature."""
    try:
        texts, starts = value["text"], value["answer_start"]
    except (TypeError, KeyError):
        raise ValueError(
            f"task {cfg.name!r}: question_answering needs {cfg.target_key!r} to hold "
            f"{{'text': [...], 'answer_start': [...]}} (as TFDS squad); got {value!r:.80}"
        ) from None
    return [(str(t), int(s)) for t, s in zip(texts, starts)]


def _pad(ids: Sequence[int], length: int) -> np.ndarray:
    out = np.zeros(length, np.int32)  # pad id 0
    out[: len(ids)] = ids
    return out


def task_batcher(
    cfg: TaskConfig,
    examples: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    seed: int,
    shuffle: bool = True,
    token_fields: Optional[Mapping[str, TokenSource]] = None,
) -> TaskBatcher:
    """The batcher of cfg's task: a TaskBatcher, or a packing one for JSONL completion / chat."""
    cfg = cfg.resolved()
    if cfg.name == JSONL:
        from jaxformer.data import jsonl_tasks  # pylint: disable=g-import-not-at-top

        if cfg.kind in jsonl_tasks.PACKED_KINDS:
            return jsonl_tasks.PackedTaskBatcher(
                cfg, examples, tokenizer, seed, shuffle, token_fields
            )
    return TaskBatcher(cfg, examples, tokenizer, seed, shuffle, token_fields)


class TaskBatcher:
    """batch(step) -> dict of arrays for one task: a pure function of (seed, step), sliced per process."""

    def __init__(
        self,
        cfg: TaskConfig,
        examples: Sequence[Mapping[str, Any]],
        tokenizer: Tokenizer,
        seed: int,
        shuffle: bool = True,
        token_fields: Optional[Mapping[str, TokenSource]] = None,
    ):
        """`token_fields` maps a text key to a token store holding example i's ids (then EOS) as
        document i, tokenized once (jaxformer.data.prepare); other text keys are encoded per batch."""
        self.cfg = cfg.resolved()
        self.token_fields = dict(token_fields or {})
        if len(examples) == 0:
            raise ValueError("a task batcher needs at least one example")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.examples, self.tokenizer, self.seed, self.shuffle = (
            examples,
            tokenizer,
            int(seed),
            shuffle,
        )
        self.num_labels: Optional[int] = getattr(examples, "num_labels", None)
        self._perms: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._perms_lock = threading.Lock()

    @property
    def num_batches_per_epoch(self) -> int:
        """Batches that cover every example once (the last one partial in eval_batches)."""
        return math.ceil(len(self.examples) / self.cfg.batch_size)

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._perms_lock:  # prefetch threads ask for batches at once
            if epoch not in self._perms:
                n = len(self.examples)
                rng = np.random.default_rng([self.seed, epoch, _PERMUTATION_SALT])
                self._perms[epoch] = rng.permutation(n) if self.shuffle else np.arange(n)
                while len(self._perms) > 2:
                    self._perms.popitem(last=False)
            self._perms.move_to_end(epoch)
            return self._perms[epoch]

    def _local_range(self, step: int, process_index: int, process_count: int) -> range:
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(
                f"need 0 <= process_index < process_count, got {process_index}, {process_count}"
            )
        if self.cfg.batch_size % process_count:
            raise ValueError(
                f"global batch size {self.cfg.batch_size} is not divisible by the process count "
                f"{process_count}"
            )
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        local = self.cfg.batch_size // process_count
        first = step * self.cfg.batch_size + process_index * local
        return range(first, first + local)

    def batch(
        self, step: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This process's share ([B / process_count, ...]) of the global training batch at `step`."""
        n = len(self.examples)
        rows = self._local_range(step, process_index, process_count)
        indices = [int(self._permutation(r // n)[r % n]) for r in rows]
        return self._rows(indices, [1.0] * len(indices))

    def eval_batches(
        self, num_batches: Optional[int] = None, process_index: int = 0, process_count: int = 1
    ) -> Iterator[dict[str, np.ndarray]]:
        """Examples in order, unshuffled; rows past the end repeat example i % n with all weights 0.

        With the default num_batches (num_batches_per_epoch) every example is counted exactly once.
        """
        available = self.num_batches_per_epoch
        num_batches = available if num_batches is None else num_batches
        if not 0 <= num_batches <= available:
            raise ValueError(
                f"eval set holds {available} batches of {self.cfg.batch_size}, {num_batches} requested"
            )
        n = len(self.examples)
        for step in range(num_batches):
            rows = self._local_range(step, process_index, process_count)
            yield self._rows([r % n for r in rows], [float(r < n) for r in rows])

    def _rows(self, indices: list[int], weights: list[float]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        items = [self.examples[i] for i in indices]
        if cfg.kind == "token_classification":
            rows = self._token_classification(items)
        elif cfg.kind == "question_answering":
            rows = [self._span_row(q) for q in self.encode_questions(items)]
        else:
            rows = self._text_rows(indices, items)
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        w_B = np.asarray(weights, np.float32)
        batch["example_weight"] = w_B
        for key in ("loss_weights", "label_weights"):
            if key in batch:
                batch[key] = batch[key] * w_B[:, None]
        return batch

    def _text_rows(self, indices: list[int], items: list[Mapping[str, Any]]) -> list[dict]:
        cfg = self.cfg
        inputs = self._token_ids(cfg.input_key, indices, items)
        if cfg.kind == "classification":
            rows = [
                self._classification(ids, item[cfg.label_key]) for ids, item in zip(inputs, items)
            ]
        else:
            targets = self._token_ids(cfg.target_key, indices, items)
            make = self._text2text if cfg.kind == "text2text" else self._completion
            rows = [make(a, b) for a, b in zip(inputs, targets)]
        return rows

    def _token_classification(self, items: list[Mapping[str, Any]]) -> list[dict]:
        cfg, L = self.cfg, self.cfg.max_input_len
        words = [[str(w) for w in item[cfg.input_key]] for item in items]
        labels = [[int(t) for t in item[cfg.label_key]] for item in items]
        pieces = self._encode_words(
            [[w if i == 0 else " " + w for i, w in enumerate(row)] for row in words]
        )
        rows = []
        for row_words, row_labels, row_pieces in zip(words, labels, pieces):
            if len(row_labels) != len(row_words):
                raise ValueError(
                    f"task {cfg.name!r}: {len(row_words)} words in {cfg.input_key!r} but "
                    f"{len(row_labels)} labels in {cfg.label_key!r}"
                )
            seq, tags, firsts = [self.tokenizer.bos_id], [0], [0.0]
            for ids, label in zip(row_pieces, row_labels):
                if self.num_labels is not None and not 0 <= label < self.num_labels:
                    raise ValueError(
                        f"label {label} of task {cfg.name!r} is outside [0, {self.num_labels})"
                    )
                if not ids:  # a word with no pieces (whitespace to the tokenizer) has no place
                    continue
                seq += ids
                tags += [label] + [0] * (len(ids) - 1)
                firsts += [1.0] + [0.0] * (len(ids) - 1)
            n = min(len(seq), L)
            real_L = (np.arange(L) < n).astype(np.int32)
            weights_L = np.zeros(L, np.float32)
            weights_L[:n] = firsts[:n]
            rows.append(
                {
                    "inputs": _pad(seq[:n], L),
                    "segment_ids": real_L,
                    "positions": np.arange(L, dtype=np.int32) * real_L,
                    "token_labels": _pad(tags[:n], L),
                    "label_weights": weights_L,
                }
            )
        return rows

    def _encode_words(self, rows: list[list[str]]) -> list[list[list[int]]]:
        """Each row's words encoded one by one, in one tokenizer call for the whole batch."""
        flat = self.tokenizer.encode_batch([w for row in rows for w in row]) if rows else []
        out, k = [], 0
        for row in rows:
            out.append(flat[k : k + len(row)])
            k += len(row)
        return out

    def encode_questions(self, items: list[Mapping[str, Any]]) -> list[EncodedQuestion]:
        """The rows of question_answering examples, with each context token's character span."""
        cfg, L, tok = self.cfg, self.cfg.max_input_len, self.tokenizer
        questions = tok.encode_batch([str(item[cfg.input_key]) for item in items])
        contexts = [str(item[cfg.context_key]) for item in items]
        words = [list(_CONTEXT_WORD.finditer(c)) for c in contexts]
        pieces = self._encode_words([[m.group(0) for m in row] for row in words])
        out = []
        for item, question, context, row_words, row_pieces in zip(
            items, questions, contexts, words, pieces
        ):
            head = [tok.bos_id] + question[: max(L // 2 - 2, 0)] + [tok.eos_id]
            seq, spans = list(head), [(0, 0)] * len(head)
            for m, ids in zip(row_words, row_pieces):
                seq += ids
                spans += [(m.start(1), m.end(1))] * len(ids)
            answers = _answers(item[cfg.target_key], cfg)
            out.append(EncodedQuestion(seq[:L], len(head), spans, context, answers))
        return out

    def _span_row(self, q: EncodedQuestion) -> dict[str, np.ndarray]:
        L, n = self.cfg.max_input_len, len(q.ids)
        start = end = 0
        if q.answers:
            text, offset = q.answers[0]
            first = offset + len(text) - len(text.lstrip())
            last = offset + len(text.rstrip())  # one past the answer's last non-space character
            inside = [
                i
                for i in range(q.context_start, len(q.spans))
                if q.spans[i][1] > first and q.spans[i][0] < last
            ]
            # Only a whole answer is a target: a cut one would teach a wrong end.
            if inside and inside[-1] < n:
                start, end = inside[0], inside[-1]
        real_L = (np.arange(L) < n).astype(np.int32)
        types_L = ((np.arange(L) >= q.context_start) & (real_L > 0)).astype(np.int32)
        return {
            "inputs": _pad(q.ids, L),
            "segment_ids": real_L,
            "positions": np.arange(L, dtype=np.int32) * real_L,
            "token_types": types_L,
            "start_positions": np.int32(start),
            "end_positions": np.int32(end),
        }

    def _token_ids(
        self, key: str, indices: list[int], items: list[Mapping[str, Any]]
    ) -> list[list[int]]:
        store = self.token_fields.get(key)
        if store is None:
            return self.tokenizer.encode_batch([str(item[key]) for item in items])
        return [store.document(i)[:-1].tolist() for i in indices]

    def _classification(self, ids: list[int], label: Any) -> dict[str, np.ndarray]:
        L = self.cfg.max_input_len
        label = int(label)
        if self.num_labels is not None and not 0 <= label < self.num_labels:
            raise ValueError(
                f"label {label} of task {self.cfg.name!r} is outside [0, {self.num_labels}) "
                "(an unlabelled test split?)"
            )
        seq = [self.tokenizer.bos_id] + ids[: L - 1]
        real_L = (np.arange(L) < len(seq)).astype(np.int32)
        return {
            "inputs": _pad(seq, L),
            "segment_ids": real_L,
            "positions": np.arange(L, dtype=np.int32) * real_L,
            "labels": np.int32(label),
        }

    def _text2text(self, source: list[int], target: list[int]) -> dict[str, np.ndarray]:
        Le, Ld, eos = self.cfg.max_input_len, self.cfg.max_target_len, self.tokenizer.eos_id
        enc = source[: Le - 1] + [eos]
        dec = (target + [eos])[:Ld]
        real_E = (np.arange(Le) < len(enc)).astype(np.int32)
        real_D = (np.arange(Ld) < len(dec)).astype(np.int32)
        return {
            "encoder_inputs": _pad(enc, Le),
            "encoder_segment_ids": real_E,
            "encoder_positions": np.arange(Le, dtype=np.int32) * real_E,
            "decoder_inputs": _pad([self.tokenizer.pad_id] + dec[:-1], Ld),
            "targets": _pad(dec, Ld),
            "loss_weights": real_D.astype(np.float32),
            "decoder_segment_ids": real_D,
            "decoder_positions": np.arange(Ld, dtype=np.int32) * real_D,
        }

    def _completion(self, prompt: list[int], completion: list[int]) -> dict[str, np.ndarray]:
        L, tok = self.cfg.max_input_len, self.tokenizer
        head = prompt + [tok.bos_id]
        tail = completion + [tok.eos_id]
        keep_tail = min(len(tail), max((L + 1) // 2, L + 1 - len(head)))
        keep_head = min(len(head), L + 1 - keep_tail)
        seq = head[len(head) - keep_head :] + tail[:keep_tail]
        n = len(seq) - 1  # real input (and target) positions
        idx_L = np.arange(L)
        real_L = (idx_L < n).astype(np.int32)
        return {
            "inputs": _pad(seq[:-1], L),
            "targets": _pad(seq[1:], L),
            "loss_weights": ((idx_L >= keep_head - 1) & (idx_L < n)).astype(np.float32),
            "segment_ids": real_L,
            "positions": idx_L.astype(np.int32) * real_L,
            "prompt_lengths": np.int32(keep_head),
        }
