"""Fine-tuning TFDS datasets built offline from the interpreter's standard library.

code_package   (classification) a chunk of up to 30 lines -> the top-level stdlib package it comes from.
code_docstring (text2text)      a function's source without its docstring -> the docstring's first line.
code_completion (completion)    a function's docstring -> the function (decorators, signature, body)
                                without the docstring. The signature belongs to the completion because
                                the docstring names its parameters; a bare body would use names the
                                model never saw.

All three use corpus.split_of by file path, so their validation files are the files stdlib_code holds
out from pretraining. There is no test split: it would have to come from files pretraining saw, or
halve a validation split that already holds only ~5% of the files.
"""

from __future__ import annotations

import ast
import collections
import functools
import hashlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import tensorflow_datasets as tfds

from jaxformer.data import corpus

CHUNK_LINES = 30
MIN_CHUNK_LINES = 5  # non-blank lines a chunk needs
MAX_CLASSES = 16
CLASS_CAP = {"train": 256, "validation": 64}  # chunks per class and split, picked by key hash
SPLITS = ("train", "validation")
_BLOCK_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")


def extract_functions(source: str) -> list[dict[str, Any]]:
    """Functions and methods (nested and async too) with a docstring and a body beyond it, in source order.

    Each dict: name, qualname ('Class.method', 'outer.inner'), lineno, docstring (cleaned, full),
    summary (its first line, stripped), source (decorators, signature and body with the docstring
    lines and the blank lines after them removed, dedented by the def's column; it parses).
    Functions whose docstring shares a line with other code are skipped. Raises SyntaxError.
    """
    source = source.replace("\r\n", "\n").replace("\r", "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old code
        tree = ast.parse(source)
    lines = source.split("\n")
    found: list[dict[str, Any]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        # Definitions are statements, so only statement lists need walking (much faster than every node).
        for field in _BLOCK_FIELDS:
            for child in getattr(node, field, ()):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    qualname = prefix + child.name
                    item = _function_item(child, lines)
                    if item is not None:
                        found.append(
                            dict(item, name=child.name, qualname=qualname, lineno=child.lineno)
                        )
                    visit(child, qualname + ".")
                elif isinstance(child, ast.ClassDef):
                    visit(child, prefix + child.name + ".")
                else:
                    visit(child, prefix)

    visit(tree, "")
    return sorted(found, key=lambda f: f["lineno"])


def _function_item(
    node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]
) -> dict[str, str] | None:
    docstring = ast.get_docstring(node, clean=True)
    if not docstring or not docstring.strip() or len(node.body) < 2:
        return None
    doc = node.body[0]
    first = lines[doc.lineno - 1].encode("utf-8")
    last = lines[doc.end_lineno - 1].encode("utf-8")  # type: ignore[operator]
    after = last[doc.end_col_offset :].strip()
    if first[: doc.col_offset].strip() or (after and not after.startswith(b"#")):
        return None
    drop_to = doc.end_lineno  # 1-based last dropped line; blank lines after the docstring go too
    while drop_to < node.body[1].lineno - 1 and not lines[drop_to].strip():  # type: ignore[operator]
        drop_to += 1
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    kept = lines[start - 1 : doc.lineno - 1] + lines[drop_to : node.end_lineno]
    indent = node.col_offset
    kept = [
        "" if not line.strip() else line[indent:] if line[:indent].isspace() else line
        for line in kept
    ]
    summary = docstring.strip().split("\n")[0].strip()
    return {"docstring": docstring, "summary": summary, "source": "\n".join(kept)}


def code_chunks(text: str) -> list[tuple[int, str]]:
    """(first line index, chunk) of consecutive CHUNK_LINES-line windows with >= MIN_CHUNK_LINES code lines.

    Blank lines at either end of a window are trimmed.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    chunks = []
    for i in range(0, len(lines), CHUNK_LINES):
        window = lines[i : i + CHUNK_LINES]
        if sum(1 for line in window if line.strip()) < MIN_CHUNK_LINES:
            continue
        while not window[0].strip():
            window = window[1:]
        while not window[-1].strip():
            window = window[:-1]
        chunks.append((i, "\n".join(window)))
    return chunks


def _key_hash(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def _read_stdlib(paths: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    root = corpus.stdlib_root()
    for path in paths:
        text = corpus._read_text(os.path.join(root, path))  # pylint: disable=protected-access
        if text is not None:
            yield path, text


@functools.lru_cache(maxsize=4)
def stdlib_functions(paths: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    """(path, extract_functions item) for the given stdlib files; files that do not parse are skipped.

    Cached, so code_docstring and code_completion share one pass over the ASTs.
    """
    found = []
    for path, text in _read_stdlib(paths):
        try:
            found.extend((path, f) for f in extract_functions(text))
        except SyntaxError:
            continue
    return found


@functools.lru_cache(maxsize=2)
def package_chunks(
    files: tuple[str, ...],
) -> tuple[list[str], dict[str, list[tuple[str, str, str]]]]:
    """(class names sorted, {split: [(key, package, text)] capped per class}) for the code_package task.

    Classes: the MAX_CLASSES packages with the most chunks among those with chunks in every split.
    """
    by_split: dict[str, dict[str, list[tuple[str, str]]]] = {
        s: collections.defaultdict(list) for s in SPLITS
    }
    for path, text in _read_stdlib(tuple(f for f in files if "/" in f)):
        for line, chunk in code_chunks(text):
            by_split[corpus.split_of(path)][path.split("/")[0]].append(
                (f"{path}:{line + 1}", chunk)
            )
    common = set.intersection(*(set(by_split[s]) for s in SPLITS))
    ranked = sorted(common, key=lambda p: (-sum(len(by_split[s][p]) for s in SPLITS), p))
    names = sorted(ranked[:MAX_CLASSES])
    selected = {}
    for split in SPLITS:
        rows = []
        for package in names:
            chunks = sorted(by_split[split][package], key=lambda kc: _key_hash(kc[0]))[
                : CLASS_CAP[split]
            ]
            rows.extend((key, package, chunk) for key, chunk in chunks)
        selected[split] = rows
    return names, selected


class _StdlibTaskBuilder(corpus.StdlibBuilder, skip_registration=True):
    """Shared parts: offline array_record build from stdlib files, split by corpus.split_of."""

    DESCRIPTION = ""

    def _features(self) -> dict[str, Any]:
        raise NotImplementedError

    def _extra_metadata(self) -> dict[str, Any]:
        return {}

    def _info(self) -> tfds.core.DatasetInfo:
        metadata = tfds.core.MetadataDict(
            python_version=corpus._python_version(),  # pylint: disable=protected-access
            file_list_sha256=corpus.file_list_hash(self._files),
            num_files=len(self._files),
            **self._extra_metadata(),
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(self._features()),
            metadata=metadata,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict[str, Any]]]]:
        del dl_manager  # Offline: everything comes from the local interpreter.
        by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
        for path in self._files:
            by_split[corpus.split_of(path)].append(path)
        return {s: self._generate_examples(s, tuple(paths)) for s, paths in by_split.items()}

    def _generate_examples(
        self, split: str, paths: tuple[str, ...]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for path, f in stdlib_functions(paths):
            yield f"{path}:{f['lineno']}", self._function_example(path, f)

    def _function_example(self, path: str, function: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class CodePackage(_StdlibTaskBuilder):
    """Classification: a stdlib code chunk -> its top-level package."""

    DESCRIPTION = "Chunks of up to 30 stdlib source lines labelled with their top-level package."

    def _classes(self) -> tuple[list[str], dict[str, list[tuple[str, str, str]]]]:
        return package_chunks(self._files)

    def _features(self) -> dict[str, Any]:
        return {
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=self._classes()[0]),
            "path": tfds.features.Text(),
        }

    def _extra_metadata(self) -> dict[str, Any]:
        names, selected = self._classes()
        counts = {
            s: dict(collections.Counter(p for _, p, _ in rows)) for s, rows in selected.items()
        }
        return {"classes": names, "class_counts": counts}

    def _generate_examples(
        self, split: str, paths: tuple[str, ...]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        del paths  # package_chunks already split the files
        for key, package, chunk in self._classes()[1][split]:
            yield key, {"text": chunk, "label": package, "path": key.rsplit(":", 1)[0]}


class CodeDocstring(_StdlibTaskBuilder):
    """Text-to-text: a function without its docstring -> the docstring's first line."""

    DESCRIPTION = (
        "Stdlib functions without their docstring, paired with the docstring's first line."
    )

    def _features(self) -> dict[str, Any]:
        return {k: tfds.features.Text() for k in ("source", "target", "path", "name")}

    def _function_example(self, path: str, function: dict[str, Any]) -> dict[str, Any]:
        return {
            "source": function["source"],
            "target": function["summary"],
            "path": path,
            "name": function["qualname"],
        }


class CodeCompletion(_StdlibTaskBuilder):
    """Completion: a docstring -> the function (signature and body) without its docstring."""

    DESCRIPTION = (
        "Stdlib docstrings as prompts; the function without its docstring as the completion."
    )

    def _features(self) -> dict[str, Any]:
        return {k: tfds.features.Text() for k in ("prompt", "completion", "path", "name")}

    def _function_example(self, path: str, function: dict[str, Any]) -> dict[str, Any]:
        return {
            "prompt": function["docstring"],
            "completion": function["source"],
            "path": path,
            "name": function["qualname"],
        }


BUILDERS: dict[str, type[_StdlibTaskBuilder]] = {
    "code_package": CodePackage,
    "code_docstring": CodeDocstring,
    "code_completion": CodeCompletion,
}


def build_task_dataset(name: str, data_dir: str = "") -> tfds.core.DatasetBuilder:
    """Prepares a built-in task dataset offline (a no-op once prepared) and returns its builder."""
    if name not in BUILDERS:
        raise ValueError(
            f"unknown built-in task dataset {name!r}; built-ins: {', '.join(BUILDERS)}"
        )
    builder = BUILDERS[name](data_dir=corpus.resolve_data_dir(data_dir))
    if builder.is_prepared():
        stored = builder.info.metadata.get("file_list_sha256")
        current = corpus.file_list_hash(builder._files)  # pylint: disable=protected-access
        if stored != current:
            raise ValueError(
                f"{name} in {builder.data_dir} was built from another interpreter's stdlib "
                f"(file list sha256 {stored}, this Python gives {current}); "
                "use another data_dir or delete that directory"
            )
        return builder
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return builder
