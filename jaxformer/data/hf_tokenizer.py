"""A converted checkpoint's own Hugging Face tokenizer, behind the interface of our `Tokenizer`.

The tokenizer's files (tokenizer.json, tokenizer_config.json, chat template, generation_config.json
for the stop ids, ...) travel together as a "bundle": stored in a checkpoint as one JSON document
(`serialized_model()`), and loaded with transformers' AutoTokenizer, so encoding, decoding and chat
templating are exactly transformers'. transformers is imported only when such a tokenizer is built.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import numpy as np

BUNDLE_FORMAT = "jaxformer-hf-tokenizer"
EXTRA = "tokenizers"
# Files a fast tokenizer is read from; the slow-tokenizer ones only when tokenizer.json is absent
# (transformers then converts them).
FAST_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
SLOW_FILES = (
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)
TEMPLATES_DIR = "additional_chat_templates"
_BYTE_FALLBACK_LEN = len("<0x00>")


class MissingTokenizerPackage(ValueError):
    """transformers (the `tokenizers` extra) is not installed but a Hugging Face tokenizer is needed."""


def require_transformers():
    """The transformers module, or MissingTokenizerPackage naming the extra to install."""
    try:
        import transformers
    except ImportError:
        raise MissingTokenizerPackage(
            "this tokenizer is a Hugging Face tokenizer (from a converted checkpoint), which needs "
            f"transformers: pip install -e '.[{EXTRA}]' (or pip install transformers tokenizers)"
        ) from None
    return transformers


def is_bundle(data: bytes) -> bool:
    """Whether stored tokenizer bytes are a bundle (a sentencepiece proto never starts with '{')."""
    return data.lstrip()[:1] == b"{"


def is_hf_directory(directory: str) -> bool:
    """Whether a directory holds a Hugging Face tokenizer (tokenizer.json or tokenizer_config.json)."""
    return any(
        os.path.isfile(os.path.join(directory, n))
        for n in ("tokenizer.json", "tokenizer_config.json")
    )


def read_bundle(directory: str) -> dict[str, bytes]:
    """The tokenizer files of a save_pretrained directory, by name."""
    names = list(FAST_FILES)
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        names += SLOW_FILES
    templates = os.path.join(directory, TEMPLATES_DIR)
    if os.path.isdir(templates):
        names += [f"{TEMPLATES_DIR}/{n}" for n in sorted(os.listdir(templates))]
    files = {}
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                files[name] = f.read()
    if not any(n in files for n in ("tokenizer.json", *SLOW_FILES)):
        raise ValueError(
            f"{directory} holds no tokenizer files (tokenizer.json, or a slow tokenizer's "
            f"{', '.join(SLOW_FILES)})"
        )
    return files


def serialize_bundle(files: Mapping[str, bytes]) -> bytes:
    """One JSON document: UTF-8 files as text, others (sentencepiece protos) as base64."""
    text, binary = {}, {}
    for name, data in sorted(files.items()):
        try:
            text[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            binary[name] = base64.b64encode(data).decode("ascii")
    doc = {"format": BUNDLE_FORMAT, "files": text, "binary_files": binary}
    return json.dumps(doc, sort_keys=True, ensure_ascii=False).encode("utf-8")


def deserialize_bundle(data: bytes) -> dict[str, bytes]:
    """The files of a serialized bundle."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"stored tokenizer is neither sentencepiece nor a bundle: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"stored tokenizer JSON is not a {BUNDLE_FORMAT!r} document")
    files = {n: t.encode("utf-8") for n, t in doc.get("files", {}).items()}
    files.update({n: base64.b64decode(b) for n, b in doc.get("binary_files", {}).items()})
    return files


def write_bundle(files: Mapping[str, bytes], directory: str) -> list[str]:
    """Writes the files into `directory` (created if needed); returns their names."""
    for name, data in files.items():
        path = os.path.join(directory, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return sorted(files)


def _load_hf(files: Mapping[str, bytes]):
    transformers = require_transformers()
    with tempfile.TemporaryDirectory(prefix="jaxformer-tokenizer-") as tmp:
        write_bundle(files, tmp)
        try:
            return transformers.AutoTokenizer.from_pretrained(tmp)
        except (ValueError, OSError, KeyError):
            # No tokenizer_class and no config.json to name the model: the plain fast tokenizer.
            if "tokenizer.json" not in files:
                raise
            return transformers.PreTrainedTokenizerFast.from_pretrained(tmp)


def _eos_ids_of(generation_config: Optional[bytes]) -> list[int]:
    if not generation_config:
        return []
    eos = json.loads(generation_config).get("eos_token_id")
    if eos is None:
        return []
    return [int(i) for i in (eos if isinstance(eos, list) else [eos])]


class HfTokenizer:
    """A transformers fast tokenizer with the members of `jaxformer.data.tokenizer.Tokenizer`.

    Fallbacks for ids a tokenizer may lack: eos is the eos token, else generation_config's first
    eos id, else the sep token (BERT); pad is the pad token, else eos; bos is the bos token, else
    the cls token (BERT), else eos (GPT-2's convention); unk is -1 when absent (as sentencepiece
    reports a disabled id); mask_id is None when absent (objectives that need it say so).
    """

    def __init__(self, files: Mapping[str, bytes]):
        self.files = dict(files)
        self.hf = _load_hf(self.files)
        tok = self.hf
        generation_eos = _eos_ids_of(self.files.get("generation_config.json"))
        eos = tok.eos_token_id
        if eos is None:
            eos = generation_eos[0] if generation_eos else tok.sep_token_id
        if eos is None:
            raise ValueError(
                "Hugging Face tokenizer has no eos token (nor eos_token_id in "
                "generation_config.json, nor a sep token); documents need an end-of-text id"
            )
        self.eos_id: int = int(eos)
        self.pad_id: int = int(_first(tok.pad_token_id, self.eos_id))
        self.bos_id: int = int(_first(tok.bos_token_id, tok.cls_token_id, self.eos_id))
        self.unk_id: int = int(_first(tok.unk_token_id, -1))
        self.mask_id: Optional[int] = tok.mask_token_id
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys([self.eos_id, *generation_eos]))
        vocab = tok.get_vocab()
        # len() counts added tokens; an id past it (a hole in the vocabulary) still needs a row.
        self.vocab_size: int = max(len(tok), max(vocab.values(), default=-1) + 1)
        self._sentinel_ids = []
        while (i := vocab.get(f"<extra_id_{len(self._sentinel_ids)}>")) is not None:
            self._sentinel_ids.append(i)

    # ------------------------------------------------------------------ ids

    @property
    def num_sentinels(self) -> int:
        """How many T5 sentinels (<extra_id_0>, <extra_id_1>, ...) the vocabulary has."""
        return len(self._sentinel_ids)

    def sentinel_id(self, i: int) -> int:
        """Returns the id of T5 sentinel i, for 0 <= i < num_sentinels."""
        if not 0 <= i < len(self._sentinel_ids):
            raise ValueError(
                f"sentinel index {i} out of range [0, {len(self._sentinel_ids)}): this tokenizer "
                f"has {len(self._sentinel_ids)} <extra_id_i> tokens"
            )
        return self._sentinel_ids[i]

    def id_to_piece(self, i: int) -> str:
        """Returns the vocabulary string of one id ('' for an id past the tokenizer's)."""
        return self.hf.convert_ids_to_tokens(int(i)) or ""

    # ------------------------------------------------------------------ text

    def encode(self, text: str) -> list[int]:
        """Returns the ids of text, with no special tokens added."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes many texts in one call (the Rust tokenizer runs them in parallel)."""
        if not texts:
            return []
        out = self.hf(list(texts), add_special_tokens=False, verbose=False)
        return [list(ids) for ids in out["input_ids"]]

    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of ids as transformers decodes it (special tokens as their text),
        skipping pad ids (eos too when pad falls back to eos) and ids past the tokenizer's."""
        return self.hf.decode([int(i) for i in ids if int(i) != self.pad_id])

    # ------------------------------------------------------------------ chat

    @property
    def chat_template(self) -> Optional[str]:
        """The tokenizer's (default) chat template, or None."""
        template = self.hf.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        return template

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = False
    ) -> str:
        """The conversation rendered as text by transformers with the tokenizer's template."""
        if self.chat_template is None:
            raise ValueError(
                "this Hugging Face tokenizer has no chat template (tokenizer_config.json "
                "'chat_template' or chat_template.jinja)"
            )
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # ------------------------------------------------------------------ bytes

    def token_byte_lengths(self) -> np.ndarray:
        """[vocab] float64: UTF-8 bytes each id contributes to the text (0 for special tokens)."""
        lengths = np.zeros(self.vocab_size, np.float64)
        style, prefix = _piece_style(json.loads(self.hf.backend_tokenizer.to_str()))
        added = self.hf.added_tokens_decoder
        for piece, i in self.hf.get_vocab().items():
            token = added.get(i)
            if token is not None:  # matched verbatim in the text, unless special
                lengths[i] = 0 if token.special else len(token.content.encode("utf-8"))
            else:
                lengths[i] = _piece_bytes(piece, style, prefix)
        return lengths

    # ------------------------------------------------------------------ storage

    def serialized_model(self) -> bytes:
        """The bundle as one JSON document (to store in a checkpoint)."""
        return serialize_bundle(self.files)

    def save(self, path: str) -> None:
        """Writes serialized_model() to a file (load it with load_tokenizer_file)."""
        from jaxformer.data.tokenizer import _atomic_write

        _atomic_write(os.path.expanduser(path), self.serialized_model())

    def save_pretrained(self, directory: str) -> list[str]:
        """Writes the bundle's files into a directory AutoTokenizer loads; returns their names."""
        return write_bundle(self.files, directory)

    @classmethod
    def from_bytes(cls, data: bytes) -> HfTokenizer:
        """Builds the tokenizer from serialized_model() bytes."""
        return cls(deserialize_bundle(data))

    @classmethod
    def from_directory(cls, directory: str) -> HfTokenizer:
        """Builds the tokenizer from a save_pretrained directory's tokenizer files (a slow
        tokenizer's are converted by transformers once: the bundle keeps the fast files)."""
        files = read_bundle(directory)
        tokenizer = cls(files)
        if "tokenizer.json" in files:
            return tokenizer
        with tempfile.TemporaryDirectory(prefix="jaxformer-tokenizer-") as tmp:
            tokenizer.hf.save_pretrained(tmp)
            fast = read_bundle(tmp)
        if "tokenizer.json" not in fast:
            return tokenizer
        if "generation_config.json" in files:
            fast["generation_config.json"] = files["generation_config.json"]
        return cls(fast)


def _first(*values):
    return next((v for v in values if v is not None), None)


def _piece_style(spec: dict) -> tuple[str, str]:
    """('byte_level' | 'wordpiece' | 'metaspace' | 'plain', wordpiece prefix) of tokenizer.json."""
    decoder = spec.get("decoder") or {}
    parts = [decoder, *decoder.get("decoders", [])]
    types = {d.get("type") for d in parts}
    if "ByteLevel" in types:
        return "byte_level", ""
    if "WordPiece" in types:
        prefix = next(d.get("prefix", "##") for d in parts if d.get("type") == "WordPiece")
        return "wordpiece", prefix
    replaces_metaspace = any(
        d.get("type") == "Replace" and d.get("pattern", {}).get("String") == "\u2581" for d in parts
    )
    if types & {"Metaspace", "ByteFallback"} or replaces_metaspace:
        return "metaspace", ""
    return "plain", ""


def _piece_bytes(piece: str, style: str, prefix: str) -> int:
    if style == "byte_level":
        return len(piece)  # each character of the byte-level alphabet stands for one byte
    if style == "wordpiece":
        if prefix and piece.startswith(prefix):
            return len(piece[len(prefix) :].encode("utf-8"))
        return len(piece.encode("utf-8")) + 1  # a word's first piece: count the space before it
    if style == "metaspace":
        if len(piece) == _BYTE_FALLBACK_LEN and piece.startswith("<0x") and piece.endswith(">"):
            return 1
        return len(piece.replace("\u2581", " ").encode("utf-8"))
    return len(piece.encode("utf-8"))
