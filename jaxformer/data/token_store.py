"""Tokenized corpora on disk: sharded flat token files plus document starts, read by random access.

One split of a corpus is a directory:

    manifest.json              written last: the split is complete (dtype, shard sizes, totals)
    counts                     int64 token histogram [vocab] of the whole split
    shard-00000.json           written after the shard's data files: the shard is complete
    shard-00000.tokens         flat tokens (uint16, or uint32 for vocabularies over 65536)
    shard-00000.docs           int64 start of each document within the shard
    shard-00000.counts         int64 token histogram [vocab] (for the unigram baseline)

Local paths are memory-mapped, so resident memory stays independent of corpus size; other paths
(e.g. gs://) go through etils.epath and are read by byte range.

The manifest records each shard file's size and SHA-256 (computed when the shard is written).
Opening a local store checks every size (cheap: one stat per file); `TokenStore.verify()` (and
`python -m jaxformer.data.prepare --verify`) checks the checksums and the token ids too. A damaged
file is a TokenStoreError naming it and how to rebuild the store.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any, Optional, Protocol

import numpy as np

MANIFEST = "manifest.json"
FORMAT = 2  # 2: the split's summed token histogram in `counts`
_REMOTE_DOC_SHARDS_CACHED = 8


SHARD_FILES = ("tokens", "docs", "counts")


class TokenStoreError(ValueError):
    """A token store's file is missing, damaged or inconsistent with its manifest."""


def rebuild_hint(root: str) -> str:
    """How to rebuild a damaged store (its directory name is a digest of what it holds)."""
    return (
        f"delete {root} and rerun the same command, which prepares it again (or prepare ahead "
        "with python -m jaxformer.data.prepare --config CONFIG)"
    )


class TokenSource(Protocol):
    """What the packer reads: a flat token stream with document boundaries."""

    @property
    def num_tokens(self) -> int: ...

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the stream as int32."""

    def doc_starts(self, start: int, end: int) -> np.ndarray:
        """Stream positions p with start < p < end where a document begins (sorted int64)."""


def is_remote(path: str) -> bool:
    """Whether a path names an object store (gs://, s3://...) rather than a local file."""
    return "://" in path


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding every id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def shard_name(index: int) -> str:
    """File stem of shard `index`."""
    return f"shard-{index:05d}"


def _path(root: str, name: str):
    from etils import epath  # pylint: disable=g-import-not-at-top

    return epath.Path(root) / name


def write_bytes_atomic(root: str, name: str, data: bytes) -> None:
    """Writes root/name so that readers see either nothing or the whole file."""
    if is_remote(root):  # object stores publish an object only when its upload completes
        _path(root, name).write_bytes(data)
        return
    path = os.path.join(root, name)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(root: str, name: str) -> Optional[dict]:
    """The JSON object at root/name, or None when it does not exist; TokenStoreError (naming the
    file) when it is not a JSON object."""
    path = _path(root, name)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise TokenStoreError(
            f"{path} is damaged (not JSON: {err}); {rebuild_hint(root)}"
        ) from None
    if not isinstance(data, dict):
        raise TokenStoreError(f"{path} is damaged (not a JSON object); {rebuild_hint(root)}")
    return data


def _file_record(data: bytes) -> list:
    return [len(data), hashlib.sha256(data).hexdigest()]


def write_shard(
    root: str,
    index: int,
    tokens: np.ndarray,
    doc_lengths: np.ndarray,
    vocab_size: int,
    info: dict[str, Any],
) -> dict[str, Any]:
    """Writes one complete shard (data files first, its JSON marker last); returns the marker."""
    dtype = token_dtype(vocab_size)
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids outside [0, {vocab_size}) in shard {index}")
    starts = np.concatenate([[0], np.cumsum(doc_lengths)[:-1]]).astype(np.int64)
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.int64)
    stem = shard_name(index)
    contents = dict(
        tokens=tokens.astype(dtype).tobytes(),
        docs=starts[: len(doc_lengths)].tobytes(),
        counts=counts.tobytes(),
    )
    for kind, data in contents.items():
        write_bytes_atomic(root, f"{stem}.{kind}", data)
    marker = dict(
        info,
        index=index,
        num_tokens=int(len(tokens)),
        num_docs=int(len(doc_lengths)),
        dtype=dtype.name,
        files={kind: _file_record(data) for kind, data in contents.items()},  # [bytes, sha256]
    )
    write_bytes_atomic(root, f"{stem}.json", json.dumps(marker).encode())
    return marker


def complete_shard(root: str, index: int, expect: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The marker of a finished shard whose recorded inputs equal `expect`, else None."""
    try:
        marker = read_json(root, f"{shard_name(index)}.json")
    except (ValueError, OSError):
        return None  # a cut marker is an unfinished shard: it is written again
    if marker is None or any(marker.get(k) != v for k, v in expect.items()):
        return None
    size = np.dtype(marker["dtype"]).itemsize * marker["num_tokens"]
    data = _path(root, f"{shard_name(index)}.tokens")
    if not data.exists() or data.stat().length != size:
        return None
    return marker


def write_manifest(
    root: str, markers: Sequence[dict[str, Any]], vocab_size: int, info: dict[str, Any]
) -> None:
    """Seals a split: after this, readers may open it.

    The split's token histogram is summed here, once, so opening a store reads one small file
    rather than one per shard.
    """
    total = np.zeros(vocab_size, np.int64)
    files = []
    for m in markers:
        stem = shard_name(m["index"])
        total += np.frombuffer(_path(root, f"{stem}.counts").read_bytes(), np.int64)
        # Shards written before sizes were recorded are measured now.
        files.append(
            m.get("files")
            or {k: _file_record(_path(root, f"{stem}.{k}").read_bytes()) for k in SHARD_FILES}
        )
    write_bytes_atomic(root, "counts", total.tobytes())
    manifest = dict(
        info,
        format=FORMAT,
        vocab_size=vocab_size,
        dtype=token_dtype(vocab_size).name,
        num_shards=len(markers),
        num_tokens=int(sum(m["num_tokens"] for m in markers)),
        num_docs=int(sum(m["num_docs"] for m in markers)),
        shard_tokens=[m["num_tokens"] for m in markers],
        shard_docs=[m["num_docs"] for m in markers],
        shard_files=files,
    )
    write_bytes_atomic(root, MANIFEST, json.dumps(manifest, indent=1).encode())


class _RangeFile:
    """A remote flat array read by byte range (no local copy of the file)."""

    def __init__(self, path, dtype: np.dtype, length: int):
        self._path, self._dtype, self._length = path, dtype, length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(self._length)
        size = self._dtype.itemsize
        with self._path.open("rb") as f:
            f.seek(start * size)
            data = f.read(max(stop - start, 0) * size)
        return np.frombuffer(data, self._dtype)


class TokenStore:
    """One prepared split, opened for random access; cheap to pickle (it reopens its files)."""

    def __init__(self, root: str):
        self.root = root
        manifest = read_json(root, MANIFEST)
        if manifest is None:
            raise FileNotFoundError(
                f"no prepared token store at {root} (missing {MANIFEST}); "
                "run `python -m jaxformer.data.prepare --config ...`"
            )
        if manifest.get("format") != FORMAT:
            raise ValueError(
                f"token store {root} has format {manifest.get('format')}, this "
                f"version reads {FORMAT}; prepare it again"
            )
        self.manifest = manifest
        try:
            self.vocab_size = int(manifest["vocab_size"])
            self._dtype = np.dtype(manifest["dtype"])
            shard_tokens = np.asarray(manifest["shard_tokens"], np.int64)
            shard_docs = np.asarray(manifest["shard_docs"], np.int64)
            if not len(shard_tokens) == len(shard_docs) == int(manifest["num_shards"]):
                raise ValueError("shard lists of different lengths")
        except (KeyError, TypeError, ValueError) as err:
            raise TokenStoreError(
                f"{_path(root, MANIFEST)} is damaged ({type(err).__name__}: {err}); "
                f"{rebuild_hint(root)}"
            ) from None
        self._shard_starts = np.concatenate([[0], np.cumsum(shard_tokens)]).astype(np.int64)
        self._shard_first_doc = np.concatenate([[0], np.cumsum(shard_docs)]).astype(np.int64)
        if not is_remote(root):  # one stat per file; an object store would pay a request each
            self.check_sizes()
        self._open()

    def _expected_sizes(self, i: int) -> dict[str, int]:
        """Bytes each file of shard i must hold, from the manifest."""
        recorded = (self.manifest.get("shard_files") or [None] * (i + 1))[i]
        if recorded:
            return {kind: int(recorded[kind][0]) for kind in SHARD_FILES}
        return dict(  # a manifest from before sizes were recorded: derived from the counts
            tokens=int(self.manifest["shard_tokens"][i]) * self._dtype.itemsize,
            docs=int(self.manifest["shard_docs"][i]) * 8,
            counts=self.vocab_size * 8,
        )

    def _damaged(self, name: str, why: str) -> TokenStoreError:
        return TokenStoreError(f"{_path(self.root, name)} is {why}; {rebuild_hint(self.root)}")

    def check_sizes(self) -> None:
        """TokenStoreError naming the first file whose size is not the manifest's."""
        expected = [("counts", self.vocab_size * 8)]
        for i in range(int(self.manifest["num_shards"])):
            expected += [
                (f"{shard_name(i)}.{kind}", size) for kind, size in self._expected_sizes(i).items()
            ]
        for name, size in expected:
            path = _path(self.root, name)
            if not path.exists():
                raise self._damaged(name, "missing")
            actual = path.stat().length
            if actual != size:
                raise self._damaged(
                    name, f"{actual} bytes where the manifest says {size} (truncated or damaged)"
                )

    def verify(self) -> None:
        """Checks every size, every recorded SHA-256 and that every token id is in the
        vocabulary; TokenStoreError naming the first damaged file."""
        self.check_sizes()
        for i, recorded in enumerate(self.manifest.get("shard_files") or []):
            for kind in SHARD_FILES:
                name = f"{shard_name(i)}.{kind}"
                digest = hashlib.sha256(_path(self.root, name).read_bytes()).hexdigest()
                if recorded and digest != recorded[kind][1]:
                    raise self._damaged(name, "damaged (its SHA-256 is not the manifest's)")
        step = 1 << 24
        for start in range(0, self.num_tokens, step):
            self.tokens(start, min(start + step, self.num_tokens))  # checks the ids

    def _open(self) -> None:
        self._tokens: dict[int, Any] = {}
        self._docs: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def __getstate__(self) -> dict:
        return {"root": self.root}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"])

    @property
    def num_tokens(self) -> int:
        return int(self._shard_starts[-1])

    @property
    def num_docs(self) -> int:
        return int(self.manifest["num_docs"])

    def _shard_tokens(self, i: int):
        if i not in self._tokens:
            length = int(self.manifest["shard_tokens"][i])
            if is_remote(self.root):
                array = _RangeFile(_path(self.root, f"{shard_name(i)}.tokens"), self._dtype, length)
            elif length == 0:
                array = np.zeros(0, self._dtype)
            else:
                array = np.memmap(
                    os.path.join(self.root, f"{shard_name(i)}.tokens"),
                    self._dtype,
                    "r",
                    shape=(length,),
                )
            self._tokens[i] = array
        return self._tokens[i]

    def _shard_docs(self, i: int) -> np.ndarray:
        """Document starts of shard i: memory-mapped locally, a few whole shards cached remotely."""
        if i in self._docs:
            self._docs.move_to_end(i)
            return self._docs[i]
        count = int(self.manifest["shard_docs"][i])
        if is_remote(self.root):
            docs = np.frombuffer(_path(self.root, f"{shard_name(i)}.docs").read_bytes(), np.int64)
        elif count == 0:
            docs = np.zeros(0, np.int64)
        else:
            docs = np.memmap(
                os.path.join(self.root, f"{shard_name(i)}.docs"), np.int64, "r", shape=(count,)
            )
        self._docs[i] = docs
        limit = _REMOTE_DOC_SHARDS_CACHED if is_remote(self.root) else len(self._shard_starts)
        while len(self._docs) > limit:
            self._docs.popitem(last=False)
        return docs

    def _shards_between(self, start: int, end: int) -> range:
        first = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
        last = int(np.searchsorted(self._shard_starts, end, side="left"))
        return range(max(first, 0), min(last, len(self._shard_starts) - 1))

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) as int32 (may span shards)."""
        if not 0 <= start <= end <= self.num_tokens:
            raise IndexError(f"token range [{start}, {end}) outside [0, {self.num_tokens})")
        parts = []
        for i in self._shards_between(start, end):
            base = int(self._shard_starts[i])
            lo, hi = max(start - base, 0), min(end, int(self._shard_starts[i + 1])) - base
            if hi > lo:
                part = np.asarray(self._shard_tokens(i)[lo:hi])
                if int(part.max()) >= self.vocab_size:  # damage no size check sees
                    raise self._damaged(
                        f"{shard_name(i)}.tokens",
                        f"damaged: it holds token id {int(part.max())}, outside the "
                        f"vocabulary of {self.vocab_size}",
                    )
                parts.append(part)
        out = np.concatenate(parts) if parts else np.zeros(0, self._dtype)
        return out.astype(np.int32)

    def doc_starts(self, start: int, end: int) -> np.ndarray:
        """Positions p, start < p < end, where a document begins."""
        found = []
        for i in self._shards_between(start, end):
            base = int(self._shard_starts[i])
            docs = self._shard_docs(i)
            lo = int(np.searchsorted(docs, start - base, side="right"))
            hi = int(np.searchsorted(docs, end - base, side="left"))
            found.append(np.asarray(docs[lo:hi]) + base)
        return np.concatenate(found) if found else np.zeros(0, np.int64)

    def document(self, index: int) -> np.ndarray:
        """The tokens of document `index` (in stored order, its EOS included) as int32."""
        if not 0 <= index < self.num_docs:
            raise IndexError(f"document {index} outside [0, {self.num_docs})")
        shard = int(np.searchsorted(self._shard_first_doc, index, side="right")) - 1
        local = index - int(self._shard_first_doc[shard])
        docs = self._shard_docs(shard)
        end = (
            int(docs[local + 1])
            if local + 1 < len(docs)
            else int(self.manifest["shard_tokens"][shard])
        )
        base = int(self._shard_starts[shard])
        return self.tokens(base + int(docs[local]), base + end)

    def token_counts(self) -> np.ndarray:
        """How often each id occurs in the split ([vocab] int64)."""
        return np.frombuffer(_path(self.root, "counts").read_bytes(), np.int64).copy()


class ArrayTokens:
    """An in-memory token stream (tokens [N], document offsets [n_docs + 1]) as a TokenSource."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray):
        self._tokens = np.asarray(tokens)
        self._offsets = np.asarray(offsets, np.int64)
        if self._tokens.ndim != 1 or self._offsets.ndim != 1 or len(self._offsets) < 2:
            raise ValueError(
                "tokens must be a flat [N] array and offsets [n_docs + 1] document starts"
            )
        if (
            self._offsets[0] != 0
            or self._offsets[-1] != len(self._tokens)
            or np.any(np.diff(self._offsets) < 0)
        ):
            raise ValueError("offsets must start at 0, be non-decreasing and end at len(tokens)")

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) as int32."""
        return self._tokens[start:end].astype(np.int32)

    def doc_starts(self, start: int, end: int) -> np.ndarray:
        """Positions p, start < p < end, where a document begins."""
        lo = int(np.searchsorted(self._offsets, start, side="right"))
        hi = int(np.searchsorted(self._offsets, end, side="left"))
        return self._offsets[lo:hi]
