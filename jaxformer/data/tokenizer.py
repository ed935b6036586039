"""A sentencepiece tokenizer that round-trips any text exactly, code included.

sentencepiece is line-based and treats U+2581 ("▁") as its escaped space, so neither "\\n" nor a
literal "▁" survives a plain encode/decode. We cut the text at those two characters ourselves,
encode the pieces in between with sentencepiece (identity normalisation, no dummy prefix, no
whitespace folding, byte fallback), and put a dedicated control id where each cut was. Control
pieces are never matched from input text, so the cut ids cannot be produced any other way, and
decode reverses the cuts exactly.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import sentencepiece as spm

if TYPE_CHECKING:
    from jaxformer.data.hf_tokenizer import HfTokenizer

PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3
NEWLINE_PIECE = "<newline>"
SPACE_MARK_PIECE = "<U+2581>"  # a literal "▁" in the text, not an encoded space
MASK_PIECE = "<mask>"
NUM_SENTINELS = 100
_SPACE_MARK = "\u2581"
_CUT = re.compile("([\n\u2581])")


def sentinel_piece(i: int) -> str:
    """Returns the T5 sentinel piece for index i ('<extra_id_i>')."""
    return f"<extra_id_{i}>"


class Tokenizer:
    """An exact-round-trip wrapper around a sentencepiece model with pad/eos/unk/bos, mask and sentinels."""

    def __init__(self, processor: spm.SentencePieceProcessor):
        self._sp = processor
        self.newline_id = self._require(NEWLINE_PIECE)
        self.space_mark_id = self._require(SPACE_MARK_PIECE)
        self.mask_id = self._require(MASK_PIECE)
        self._sentinel_ids = [self._require(sentinel_piece(i)) for i in range(NUM_SENTINELS)]
        self._cut_ids = {self.newline_id: "\n", self.space_mark_id: _SPACE_MARK}

    def _require(self, piece: str) -> int:
        i = self._sp.piece_to_id(piece)
        if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i):
            raise ValueError(
                f"sentencepiece model lacks the piece {piece!r}; train it with train_tokenizer"
            )
        return i

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: eos only."""
        return (self.eos_id,)

    @property
    def num_sentinels(self) -> int:
        return NUM_SENTINELS

    def sentinel_id(self, i: int) -> int:
        """Returns the id of T5 sentinel i, for 0 <= i < num_sentinels."""
        if not 0 <= i < NUM_SENTINELS:
            raise ValueError(f"sentinel index {i} out of range [0, {NUM_SENTINELS})")
        return self._sentinel_ids[i]

    def encode(self, text: str) -> list[int]:
        """Returns the ids of text (no eos added); decode(encode(text)) == text."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes many texts in one sentencepiece call."""
        parts_per_text = [_CUT.split(t) for t in texts]
        # Every odd part is a cut character; even parts are plain text for sentencepiece.
        flat = [p for parts in parts_per_text for p in parts[::2]]
        encoded = iter(self._sp.encode(flat, out_type=int))
        result = []
        for parts in parts_per_text:
            ids: list[int] = []
            for j, part in enumerate(parts):
                if j % 2:
                    ids.append(self.newline_id if part == "\n" else self.space_mark_id)
                else:
                    ids.extend(next(encoded))
            result.append(ids)
        return result

    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of ids, skipping pad ids."""
        pad = self.pad_id
        chunks: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i == pad:
                continue
            cut = self._cut_ids.get(i)
            if cut is None:
                run.append(i)
            else:
                chunks.append(self._sp.decode(run))
                chunks.append(cut)
                run = []
        chunks.append(self._sp.decode(run))
        return "".join(chunks)

    def id_to_piece(self, i: int) -> str:
        """Returns the sentencepiece piece string of one id."""
        return self._sp.id_to_piece(int(i))

    chat_template: Optional[str] = None
    """No model-specific template: apply_chat_template uses the built-in format."""

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = False
    ) -> str:
        """The built-in chat format: '<|role|>\\n' + content + '\\n' per message, then
        '<|assistant|>\\n' when add_generation_prompt (so a conversation's text starts with the
        text of its prefix rendered with add_generation_prompt)."""
        return builtin_chat_text(messages, add_generation_prompt)

    def token_byte_lengths(self) -> np.ndarray:
        """[vocab] float64: UTF-8 bytes each id stands for (0 for pad, eos, bos, mask, sentinels
        and other control pieces)."""
        lengths = np.zeros(self.vocab_size, np.float64)
        special = {self.pad_id, self.eos_id, self.bos_id, self.mask_id, *self._sentinel_ids}
        for i in range(self.vocab_size):
            if i in special:
                continue
            piece = self.id_to_piece(i)
            if i == self.newline_id:
                lengths[i] = 1
            elif i == self.space_mark_id:
                lengths[i] = len(_SPACE_MARK.encode("utf-8"))
            elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
                lengths[i] = 1  # byte-fallback piece
            elif piece.startswith("<") and piece.endswith(">"):
                lengths[i] = 0  # other control symbols
            else:
                lengths[i] = len(piece.replace(_SPACE_MARK, " ").encode("utf-8"))
        return lengths

    def serialized_model(self) -> bytes:
        """Returns the sentencepiece model proto bytes (to store in a checkpoint)."""
        return self._sp.serialized_model_proto()

    @classmethod
    def from_bytes(cls, model: bytes) -> Tokenizer:
        """Builds a tokenizer from serialized model proto bytes."""
        return cls(spm.SentencePieceProcessor(model_proto=model))

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        """Loads a tokenizer from a .model file."""
        with open(os.path.expanduser(path), "rb") as f:
            return cls.from_bytes(f.read())

    def save(self, path: str) -> None:
        """Writes the .model file atomically."""
        _atomic_write(os.path.expanduser(path), self.serialized_model())


AnyTokenizer = Union[Tokenizer, "HfTokenizer"]


def load_tokenizer(data: bytes) -> AnyTokenizer:
    """The tokenizer of stored bytes (a checkpoint's meta["tokenizer"], a tokenizer file): our
    sentencepiece model, or a converted checkpoint's Hugging Face bundle (needs transformers)."""
    from jaxformer.data import hf_tokenizer  # light; imports transformers only to build one

    if hf_tokenizer.is_bundle(data):
        return hf_tokenizer.HfTokenizer.from_bytes(data)
    return Tokenizer.from_bytes(data)


def load_tokenizer_file(path: str) -> AnyTokenizer:
    """The tokenizer of a file (a sentencepiece .model or a saved bundle) or of a Hugging Face
    save_pretrained directory."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        from jaxformer.data.hf_tokenizer import HfTokenizer

        return HfTokenizer.from_directory(path)
    with open(path, "rb") as f:
        return load_tokenizer(f.read())


def model_vocab_size(tokenizer: AnyTokenizer, stored: Optional[int] = None) -> int:
    """The model vocabulary of a run with `tokenizer`: the tokenizer's size, or `stored` (the
    vocabulary of the checkpoint the tokenizer came with) when it is at least that: Hugging Face
    models pad their embeddings past the tokenizer (for speed), and a converted one keeps them."""
    if stored is not None and stored >= tokenizer.vocab_size:
        return stored
    return tokenizer.vocab_size


def check_objective_ids(tokenizer: AnyTokenizer, objective: str) -> None:
    """ValueError naming what a tokenizer lacks for a pretraining objective: masked_lm needs a
    mask token, span_corruption sentinels (<extra_id_i>); causal_lm needs neither."""
    if objective == "masked_lm" and tokenizer.mask_id is None:
        raise ValueError(
            "data.objective masked_lm needs a mask token, and the run's tokenizer (a converted "
            "checkpoint's) has none; use causal_lm, or a tokenizer with a mask token"
        )
    if objective == "span_corruption" and tokenizer.num_sentinels == 0:
        raise ValueError(
            "data.objective span_corruption needs sentinel tokens (<extra_id_0>, ...), and the "
            "run's tokenizer (a converted checkpoint's) has none"
        )


def builtin_chat_text(messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
    """Renders messages ({'role': str, 'content': str}) in the built-in chat format."""
    parts = []
    for j, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(
                f"chat message {j} needs string 'role' and 'content' fields, got {message!r}"
            )
        parts.append(f"<|{role}|>\n{content}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def _atomic_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _training_sentences(
    texts: Iterable[str], max_sentences: int, max_chars: int, seed: int
) -> list[str]:
    """Returns a deterministic uniform sample (reservoir) of the non-empty lines of texts."""
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for text in texts:
        for line in _CUT.split(text)[::2]:
            if not line or len(line) > max_chars:
                continue
            seen += 1
            if len(sample) < max_sentences:
                sample.append(line)
            else:
                j = rng.randrange(seen)
                if j < max_sentences:
                    sample[j] = line
    return sample


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 2048,
    model_path: str = "",
    *,
    seed: int = 0,
    max_sentences: int = 200_000,
    max_sentence_chars: int = 2048,
    num_threads: int = 2,
    model_type: str = "bpe",
) -> Tokenizer:
    """Trains (or, if model_path exists, loads) a sentencepiece tokenizer on texts.

    bpe trains the stdlib in seconds (unigram takes ~10x longer for similar compression); the
    line sample is a seeded reservoir, so the same texts and seed give the same model bytes.
    """
    if model_path and os.path.exists(os.path.expanduser(model_path)):
        return Tokenizer.load(model_path)
    reserved = 4 + 2 + 1 + NUM_SENTINELS + 256  # specials, cut ids, mask, sentinels, bytes
    if vocab_size <= reserved:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: {reserved} ids are reserved; use >= 512"
        )
    sentences = _training_sentences(texts, max_sentences, max_sentence_chars, seed)
    if not sentences:
        raise ValueError("cannot train a tokenizer on an empty corpus (no non-empty lines)")
    model = _train(sentences, vocab_size, num_threads, model_type)
    tokenizer = Tokenizer.from_bytes(model)
    if model_path:
        tokenizer.save(model_path)
    return tokenizer


def _train(sentences: list[str], vocab_size: int, num_threads: int, model_type: str) -> bytes:
    writer = _BytesWriter()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=writer,
        vocab_size=vocab_size,
        model_type=model_type,
        # Keep every character as it is: code depends on exact whitespace.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        # Lets pieces span words and indentation ("        return"): fewer tokens for code.
        split_by_whitespace=False,
        split_digits=True,
        byte_fallback=True,
        character_coverage=0.9995,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        control_symbols=[NEWLINE_PIECE, SPACE_MARK_PIECE],
        user_defined_symbols=[MASK_PIECE] + [sentinel_piece(i) for i in range(NUM_SENTINELS)],
        max_sentence_length=max(len(s.encode("utf-8")) for s in sentences) + 1,
        input_sentence_size=0,  # we sampled already, deterministically
        shuffle_input_sentence=False,
        num_threads=num_threads,
        # A small corpus may not support the requested size; take what it supports.
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return writer.getvalue()


class _BytesWriter:
    """Collects the model sentencepiece writes (it calls .write(bytes))."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._chunks.append(data)

    def getvalue(self) -> bytes:
        return b"".join(self._chunks)
