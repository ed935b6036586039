"""Fine-tuning on your own JSONL files: prompt/completion pairs, chats or input/target pairs,
checked line by line, rendered into pieces, tokenized once and packed several examples per row.

Lines (blank lines are skipped; other keys of a line, or of a message, are ignored):

completion  {"prompt": str, "completion": str}; the text is prompt + completion as given (put any
            separator in the data) and EOS, and the loss is on the completion and that EOS.
chat        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]} with at
            least one assistant turn; the loss is on every assistant turn: what rendering the
            conversation up to and including it adds to rendering the turns before it with the
            generation prompt, i.e. the answer and the end-of-turn text a template puts after it.
            Rendering is the tokenizer's chat template (`apply_chat_template`, transformers' for
            Hugging Face tokenizers) or, without one (our sentencepiece tokenizer), the built-in
            format of tokenizer.builtin_chat_text: "<|{role}|>\n{content}\n" per turn and the
            generation prompt "<|assistant|>\n"; that format has no end-of-turn text, so there
            each assistant turn ("{content}\n") is followed by the tokenizer's EOS, learned too,
            where generation stops.
text2text   {"input": str, "target": str} (encoder-decoder), batched as tasks.py's text2text rows.

Each example is a list of pieces [context, answer, context, answer, ..., tail]: pieces at odd
indices are learned; answer pieces are followed by EOS for completion and built-in chat. The
pieces of a split are the documents of one token store (keyed by the files' contents, the chat
template and the tokenizer), so nothing is re-encoded per batch. Each piece is encoded on its own
(a token never spans a piece boundary), and `tokenizer.encode` must add no special tokens.

Packed rows (completion, chat; int32, weights float32; L = max_input_len), a pure function of
(seed, step): epoch e takes the examples in the order of a permutation seeded by (seed, e) and
puts each whole into the first of the 8 newest rows it fits in, else into a new row (the oldest
open row is closed then; rows are used in the order they close); global rows step*B .. step*B+B-1
run across epoch ends and each process takes a contiguous slice. An example of n tokens fills
n - 1 positions:

inputs [B,L]          its tokens[:-1], examples one after another, then pad (0)
targets [B,L]         its tokens[1:]
loss_weights [B,L]    1 where the target is a learned token (completion / assistant text and the
                      EOS or end-of-turn text after it), 0 elsewhere
segment_ids [B,L]     1, 2, 3, ... per example in the row, 0 = padding (no attention across them)
positions [B,L]       0, 1, 2, ... restarting with each example, 0 on padding
example_weight [B]    1, or 0 for the all-padding rows that fill the last evaluation batch

An example longer than L + 1 tokens is cut to a window of L + 1 tokens around the start of its
first learned piece: the learned side keeps at least half of the window (more if the context is
short) and is cut on the right; the context before it takes the rest and is cut on the left (the
text next to the answer survives), as tasks.py cuts completion rows. Evaluation packs the examples
in file order (unshuffled), so its batches count every example once.
"""

from __future__ import annotations

import bisect
import collections
import functools
import hashlib
import json
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import numpy as np

from jaxformer.data import tasks
from jaxformer.data.token_store import ArrayTokens, TokenSource
from jaxformer.data.tokenizer import AnyTokenizer, builtin_chat_text

PACKED_KINDS = ("completion", "chat")
DEFAULT_KEYS = {  # kind -> (input_key, target_key, label_key) of a JSONL line
    "completion": ("prompt", "completion", ""),
    "chat": ("messages", "", ""),
    "text2text": ("input", "target", ""),
}
ROLES = ("system", "user", "assistant")
PIECES = "pieces"
"""The token_fields key of a packed JSONL split's piece store."""
_RENDER_VERSION = 1  # part of the store key: bump when rendering changes
PACK_OPEN_ROWS = 8
"""Rows greedy packing keeps open (first fit among them): fuller rows than one, O(examples * 8)."""

Piece = tuple[str, bool, bool]  # (text, learned, followed by EOS)


# ------------------------------------------------------------------ reading and checking lines


def _read(path: str, option: str) -> bytes:
    from etils import epath  # pylint: disable=g-import-not-at-top

    file = epath.Path(path)
    if not file.exists():
        raise ValueError(f"task.{option}: no such file {path!r}")
    return file.read_bytes()


def _lines(data: bytes, path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines (a leading UTF-8 BOM is dropped)."""
    for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{number}: not UTF-8 text ({err.reason})") from None
        if text.strip():
            yield number, text


def _object(text: str, where: str) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _kind_of(keys: Sequence[str], where: str) -> str:
    if "messages" in keys:
        return "chat"
    for kind in ("completion", "text2text"):
        if all(k in keys for k in DEFAULT_KEYS[kind][:2]):
            return kind
    raise ValueError(
        f"{where}: cannot tell the task kind from the keys {sorted(keys)}: expected 'messages' "
        "(chat), 'prompt' and 'completion' (completion) or 'input' and 'target' (text2text); "
        "or set task.kind"
    )


@functools.lru_cache(maxsize=16)
def sniff_kind(files: tuple[str, ...]) -> str:
    """task.kind=auto of a JSONL task: the kind the first line of the first train file has."""
    path = files[0]
    for number, text in _lines(_read(path, "train_files"), path):
        where = f"{path}:{number}"
        return _kind_of(list(_object(text, where)), where)
    raise ValueError(f"task.train_files: {path!r} holds no examples (only blank lines)")


def _text(obj: Mapping[str, Any], key: str, where: str) -> str:
    if key not in obj:
        raise ValueError(f"{where}: missing key {key!r} (keys: {sorted(obj)})")
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _messages(obj: Mapping[str, Any], key: str, where: str) -> tuple[tuple[str, str], ...]:
    if key not in obj:
        raise ValueError(f"{where}: missing key {key!r} (keys: {sorted(obj)})")
    messages = obj[key]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: {key!r} must be a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        at = f"{where}: message {i}"
        if not isinstance(message, dict):
            raise ValueError(f"{at} must be an object, got {type(message).__name__}")
        role = _text(message, "role", at)
        if role not in ROLES:
            raise ValueError(f"{at}: unknown role {role!r} (roles: {', '.join(ROLES)})")
        out.append((role, _text(message, "content", at)))
    if not any(role == "assistant" for role, _ in out):
        raise ValueError(f"{where}: the conversation has no assistant turn (nothing to learn)")
    return tuple(out)


class JsonlExamples(Sequence):
    """The checked examples of one split's JSONL files: dicts of the task's keys (chat: messages)."""

    num_labels = None
    label_names = None

    def __init__(
        self,
        cfg: tasks.TaskConfig,
        split: str,
        records: list[tuple],
        origins: list[tuple[int, int]],
        files: tuple[str, ...],
        digest: str,
    ):
        self.cfg, self.split, self.files = cfg, split, files
        self._records, self._origins = records, origins
        self.digest = digest
        """Of the files' contents, the kind, keys and max_examples."""

    @property
    def store_name(self) -> str:
        """The dataset name its token stores are kept under (the contents decide it)."""
        return f"jsonl_{self.digest}"

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):  # type: ignore[override]
        record = self._records[index]
        if self.cfg.kind == "chat":
            return {self.cfg.input_key: [{"role": r, "content": c} for r, c in record]}
        return {self.cfg.input_key: record[0], self.cfg.target_key: record[1]}

    def record(self, index: int) -> tuple:
        """(prompt, completion), (input, target) or ((role, content), ...) of an example."""
        return self._records[index]

    def where(self, index: int) -> str:
        """'file:line' of an example."""
        file, line = self._origins[index]
        return f"{self.files[file]}:{line}"

    def num_answers(self, index: int) -> int:
        """Learned pieces of an example (assistant turns; 1 for a completion)."""
        if self.cfg.kind == "chat":
            return sum(role == "assistant" for role, _ in self._records[index])
        return 1


def split_files(cfg: tasks.TaskConfig, split: str) -> tuple[str, tuple[str, ...]]:
    """(option name, files) of a JSONL task's split: train_split or eval_split."""
    if split == cfg.train_split:
        return "train_files", tuple(cfg.train_files)
    if split == cfg.eval_split:
        return "eval_files", tuple(cfg.eval_files)
    raise ValueError(
        f"a jsonl task has the splits {cfg.train_split!r} (task.train_files) and "
        f"{cfg.eval_split!r} (task.eval_files), not {split!r}"
    )


def load_jsonl(cfg: tasks.TaskConfig, split: str) -> JsonlExamples:
    """Every line of the split's files, checked: an error names the file and the line."""
    cfg = cfg.resolved()
    option, files = split_files(cfg, split)
    records, origins = [], []
    digest = hashlib.sha256(
        json.dumps([cfg.kind, cfg.input_key, cfg.target_key, cfg.max_examples]).encode()
    )
    for f, path in enumerate(files):
        data = _read(path, option)
        digest.update(hashlib.sha256(data).digest())
        for number, text in _lines(data, path):
            if cfg.max_examples is not None and len(records) >= cfg.max_examples:
                break
            where = f"{path}:{number}"
            obj = _object(text, where)
            if cfg.kind == "chat":
                records.append(_messages(obj, cfg.input_key, where))
            else:
                records.append(
                    (_text(obj, cfg.input_key, where), _text(obj, cfg.target_key, where))
                )
            origins.append((f, number))
    if not records:
        raise ValueError(f"task.{option}: no examples in {', '.join(files)}")
    return JsonlExamples(cfg, split, records, origins, files, digest.hexdigest()[:16])


# ------------------------------------------------------------------ rendering into pieces


def chat_template(tokenizer: AnyTokenizer) -> Optional[str]:
    """The tokenizer's chat template, None when it has none (then the built-in format renders)."""
    return getattr(tokenizer, "chat_template", None) or None


def chat_renderer(tokenizer: AnyTokenizer) -> Callable[[list[dict], bool], str]:
    """(messages, add_generation_prompt) -> text: the tokenizer's template, else the built-in
    format (the one our sentencepiece Tokenizer.apply_chat_template renders)."""
    if chat_template(tokenizer) is None:
        return builtin_chat_text
    return lambda messages, generation_prompt: tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation_prompt
    )


def completion_pieces(prompt: str, completion: str) -> list[Piece]:
    """[prompt, completion (then EOS), '']."""
    return [(prompt, False, False), (completion, True, True), ("", False, False)]


def chat_pieces(
    messages: Sequence[tuple[str, str]],
    render: Callable[[list[dict], bool], str],
    eos_after_answers: bool,
) -> list[Piece]:
    """[context, answer, ..., tail] of a rendered conversation: an assistant span is what its
    turn adds to the turns before it rendered with the generation prompt (so the end-of-turn text
    a template puts after the answer is learned too)."""
    dicts = [{"role": r, "content": c} for r, c in messages]
    pieces: list[Piece] = []
    done = ""
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        prompt, full = render(dicts[:i], True), render(dicts[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError(
                f"the chat template does not render message {i} as an extension of the turns "
                "before it, so its assistant span cannot be told apart"
            )
        pieces += [
            (prompt[len(done) :], False, False),
            (full[len(prompt) :], True, eos_after_answers),
        ]
        done = full
    whole = render(dicts, False)
    if not whole.startswith(done):
        raise ValueError("the chat template renders the whole conversation differently")
    return pieces + [(whole[len(done) :], False, False)]


def example_pieces(examples: JsonlExamples, index: int, tokenizer: AnyTokenizer) -> list[Piece]:
    """The pieces of one example (2 * answers + 1 of them); an error names its file:line."""
    record = examples.record(index)
    if examples.cfg.kind == "completion":
        return completion_pieces(*record)
    try:
        return chat_pieces(record, chat_renderer(tokenizer), chat_template(tokenizer) is None)
    except Exception as err:  # pylint: disable=broad-except  (a template may raise anything)
        raise ValueError(f"{examples.where(index)}: {err}") from None


class _PieceTexts(Sequence):
    """Every example's piece texts in order (random access, rendering one example at a time)."""

    def __init__(self, examples: JsonlExamples, tokenizer: AnyTokenizer, first_piece: np.ndarray):
        self._examples, self._tokenizer, self._first = examples, tokenizer, first_piece
        self._cached: tuple[int, list[Piece]] = (-1, [])

    def __len__(self) -> int:
        return int(self._first[-1])

    def __getitem__(self, index):  # type: ignore[override]
        example = int(np.searchsorted(self._first, index, side="right")) - 1
        if self._cached[0] != example:
            self._cached = (example, example_pieces(self._examples, example, self._tokenizer))
        return self._cached[1][index - int(self._first[example])][0]


def piece_layout(
    examples: JsonlExamples, tokenizer: AnyTokenizer
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first piece of each example [n + 1], learned [P], followed by EOS [P]), without
    rendering: piece j of an example is learned iff j is odd, and only completions and chats in
    the built-in format put EOS after a learned piece."""
    counts = np.asarray([2 * examples.num_answers(i) + 1 for i in range(len(examples))])
    first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    local = np.arange(first[-1]) - np.repeat(first[:-1], counts)
    learned = local % 2 == 1
    with_eos = examples.cfg.kind == "completion" or chat_template(tokenizer) is None
    return first, learned, learned & with_eos


def tokenize_pieces(
    cfg: tasks.TaskConfig,
    examples: JsonlExamples,
    tokenizer: AnyTokenizer,
    *,
    show_progress: bool = True,
    log=print,
) -> TokenSource:
    """The split's pieces tokenized once into a token store (piece j is document j), reused by
    later runs with the same files, template and tokenizer."""
    from jaxformer.data import prepare  # pylint: disable=g-import-not-at-top
    from jaxformer.data.config import DataConfig, SourceConfig  # pylint: disable=g-import-not-at-top

    first, _, _ = piece_layout(examples, tokenizer)
    template = chat_template(tokenizer) if cfg.kind == "chat" else None
    key = hashlib.sha256(f"{examples.digest}|{_RENDER_VERSION}|{template!r}".encode())
    source = SourceConfig(dataset=f"jsonl_{key.hexdigest()[:16]}", text_key=PIECES)
    return prepare.tokenize_split(
        DataConfig(data_dir=cfg.data_dir),
        source,
        examples.split,
        tokenizer,
        texts=_PieceTexts(examples, tokenizer, first),
        show_progress=show_progress,
        log=log,
    )


def pieces_in_memory(examples: JsonlExamples, tokenizer: AnyTokenizer) -> ArrayTokens:
    """The same pieces as `tokenize_pieces` (each followed by EOS), encoded in memory."""
    first, _, _ = piece_layout(examples, tokenizer)
    texts = _PieceTexts(examples, tokenizer, first)
    ids = tokenizer.encode_batch([texts[j] for j in range(len(texts))])
    docs = [np.asarray(d + [tokenizer.eos_id], np.int64) for d in ids]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    return ArrayTokens(np.concatenate(docs), offsets)


# ------------------------------------------------------------------ packed batches


def cut_window(context: int, length: int, budget: int) -> tuple[int, int]:
    """[start, end) of an example of `length` tokens whose learned part starts at `context`, in
    at most `budget` tokens (tasks.py's completion rule: the learned side keeps half or more)."""
    if length <= budget:
        return 0, length
    tail = length - context
    keep_tail = min(tail, max(budget // 2, budget - context))
    keep_head = min(context, budget - keep_tail)
    return context - keep_head, context + keep_tail


def greedy_pack(
    widths: np.ndarray, order: np.ndarray, row_len: int, open_rows: int = PACK_OPEN_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """(members, bounds [R + 1]): row i holds examples members[bounds[i]:bounds[i + 1]].

    Examples go, in `order`, into the first of the last `open_rows` rows where they fit, else into
    a new row (the oldest open row is then closed); rows are listed in the order they close.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    closed: list[list[int]] = []
    for e in order.tolist():
        w = int(widths[e])
        for j, space in enumerate(free):
            if w <= space:
                rows[j].append(e)
                free[j] -= w
                break
        else:
            if len(rows) == open_rows:
                closed.append(rows.pop(0))
                free.pop(0)
            rows.append([e])
            free.append(row_len - w)
    closed += rows
    bounds = np.cumsum([0] + [len(r) for r in closed]).astype(np.int64)
    return np.asarray([e for r in closed for e in r], np.int64), bounds


class PackedTaskBatcher(tasks.TaskBatcher):
    """batch(step) -> packed rows of a JSONL completion / chat task (format: module docstring)."""

    def __init__(
        self,
        cfg: tasks.TaskConfig,
        examples: JsonlExamples,
        tokenizer: AnyTokenizer,
        seed: int,
        shuffle: bool = True,
        token_fields: Optional[Mapping[str, TokenSource]] = None,
    ):
        """`token_fields[PIECES]` is the split's piece store (tokenize_pieces); without it the
        pieces are encoded here, in memory."""
        super().__init__(cfg, examples, tokenizer, seed, shuffle, token_fields)
        store = self.token_fields.get(PIECES)
        if store is None:
            store = pieces_in_memory(examples, tokenizer)
        self.store = store
        self._first, learned, with_eos = piece_layout(examples, tokenizer)
        starts = np.concatenate([[0], store.doc_starts(0, store.num_tokens), [store.num_tokens]])
        self._starts = starts.astype(np.int64)  # of piece j in the store's stream
        lengths = np.diff(self._starts)
        if len(lengths) != len(learned):
            raise ValueError(
                f"token store {getattr(store, 'root', '(in memory)')} holds {len(lengths)} pieces; "
                f"the examples have {len(learned)}"
            )
        self._learned, self._with_eos = learned, with_eos
        kept = lengths - 1 + with_eos  # a piece's tokens, and its EOS where it keeps one
        ends = np.cumsum(np.concatenate([[0], kept]))
        self._length = ends[self._first[1:]] - ends[self._first[:-1]]
        context = kept[self._first[:-1]]  # piece 0 of every example is its (unlearned) context
        windows = [
            cut_window(int(c), int(n), self.cfg.max_input_len + 1)
            for c, n in zip(context, self._length)
        ]
        self._window = np.asarray(windows, np.int64).reshape(-1, 2)
        self._width = np.maximum(self._window[:, 1] - self._window[:, 0] - 1, 0)
        self._packs: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._epoch_starts = [0]  # global row where each packed epoch begins
        self._lock = threading.RLock()

    def _pack(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(members, bounds) of the epoch's rows (greedy_pack)."""
        with self._lock:  # prefetch threads ask for batches at once
            if epoch not in self._packs:
                self._packs[epoch] = greedy_pack(
                    self._width, self._permutation(epoch), self.cfg.max_input_len
                )
                while len(self._packs) > 2:
                    self._packs.popitem(last=False)
            self._packs.move_to_end(epoch)
            return self._packs[epoch]

    def _row(self, epoch: int, row: int) -> np.ndarray:
        members, bounds = self._pack(epoch)
        return members[bounds[row] : bounds[row + 1]]

    @property
    def num_rows_per_epoch(self) -> int:
        """Packed rows of the first epoch (every epoch's count differs a little when shuffled)."""
        return len(self._pack(0)[1]) - 1

    @property
    def num_batches_per_epoch(self) -> int:
        return math.ceil(self.num_rows_per_epoch / self.cfg.batch_size)

    def _locate(self, row: int) -> tuple[int, int]:
        """(epoch, row within it) of a global training row."""
        with self._lock:
            while self._epoch_starts[-1] <= row:
                epoch = len(self._epoch_starts) - 1
                self._epoch_starts.append(self._epoch_starts[-1] + len(self._pack(epoch)[1]) - 1)
            epoch = bisect.bisect_right(self._epoch_starts, row) - 1
            return epoch, row - self._epoch_starts[epoch]

    def batch(
        self, step: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This process's share ([B / process_count, L]) of the global training rows at `step`."""
        rows = []
        for r in self._local_range(step, process_index, process_count):
            rows.append(self._row(*self._locate(r)))
        return self._rows(rows, [1.0] * len(rows))

    def eval_batches(
        self, num_batches: Optional[int] = None, process_index: int = 0, process_count: int = 1
    ) -> Iterator[dict[str, np.ndarray]]:
        """Rows of the examples in order; rows past the last are all padding with weight 0.

        With the default num_batches (num_batches_per_epoch) every example is counted exactly once.
        """
        available = self.num_batches_per_epoch
        num_batches = available if num_batches is None else num_batches
        if not 0 <= num_batches <= available:
            raise ValueError(
                f"eval set holds {available} batches of {self.cfg.batch_size}, {num_batches} requested"
            )
        total = self.num_rows_per_epoch
        for step in range(num_batches):
            rows = self._local_range(step, process_index, process_count)
            members = [self._row(0, r) if r < total else np.zeros(0, np.int64) for r in rows]
            yield self._rows(members, [float(r < total) for r in rows])

    def example_tokens(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, learned mask) of a whole example, before any cut."""
        p0, p1 = int(self._first[index]), int(self._first[index + 1])
        base, end = int(self._starts[p0]), int(self._starts[p1])
        ids = self.store.tokens(base, end)
        lengths = np.diff(self._starts[p0 : p1 + 1])
        learned = np.repeat(self._learned[p0:p1], lengths)
        keep = np.ones(end - base, bool)
        keep[(self._starts[p0 + 1 : p1 + 1] - 1 - base)[~self._with_eos[p0:p1]]] = False
        return ids[keep], learned[keep]

    def _rows(self, rows: list[np.ndarray], weights: list[float]) -> dict[str, np.ndarray]:
        B, L = len(rows), self.cfg.max_input_len
        out = {k: np.zeros((B, L), np.int32) for k in ("inputs", "targets", "segment_ids")}
        out["positions"] = np.zeros((B, L), np.int32)
        out["loss_weights"] = np.zeros((B, L), np.float32)
        for b, members in enumerate(rows):
            used = segment = 0
            for e in members.tolist():
                lo, hi = self._window[e]
                width = int(self._width[e])
                if width == 0:
                    continue
                segment += 1
                ids, learned = self.example_tokens(e)
                ids, learned = ids[lo:hi], learned[lo:hi]
                span = slice(used, used + width)
                out["inputs"][b, span] = ids[:-1]
                out["targets"][b, span] = ids[1:]
                out["loss_weights"][b, span] = learned[1:]
                out["segment_ids"][b, span] = segment
                out["positions"][b, span] = np.arange(width)
                used += width
        w_B = np.asarray(weights, np.float32)
        out["example_weight"] = w_B
        out["loss_weights"] *= w_B[:, None]
        return out
