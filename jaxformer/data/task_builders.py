"""Fine-tuning TFDS datasets built offline from the interpreter's standard library.

code_package   (classification) a chunk of up to 30 lines -> the top-level stdlib package it comes from.
code_docstring (text2text)      a function's source without its docstring -> the docstring's first line.
code_completion (completion)    a function's docstring -> the function (decorators, signature, body)
                                without the docstring. The signature belongs to the completion because
                                the docstring names its parameters; a bare body would use names the
                                model never saw.

code_tokens    (token_classification) the Python tokens of one logical line of code -> BIO tags of
                keywords (`is not` / `not in` as one span), builtin names, names (a dotted chain
                `os.path.join` as one span), numbers, strings (adjacent literals as one span) and
                operators; brackets, commas, colons and dots outside names are O.
code_qa        (question_answering) a function without its docstring plus a question about it
                ("What does NAME return?" -> the first returned expression; "Which argument of
                NAME defaults to VALUE?" -> the parameter's name), answers as character spans of
                the source in SQuAD's layout.

All of them use corpus.split_of by file path, so their validation files are the files stdlib_code holds
out from pretraining. There is no test split: it would have to come from files pretraining saw, or
halve a validation split that already holds only ~5% of the files.
"""

from __future__ import annotations

import ast
import builtins
import collections
import functools
import hashlib
import io
import keyword
import os
import tokenize
import warnings
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
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


TOKEN_ENTITIES = ("KEYWORD", "BUILTIN", "NAME", "NUMBER", "STRING", "OPERATOR")
TOKEN_TAGS = ("O",) + tuple(f"{p}-{e}" for e in TOKEN_ENTITIES for p in "BI")
LINE_CAP = {"train": 4000, "validation": 500}  # code lines per split, picked by key hash
MIN_LINE_WORDS, MAX_LINE_WORDS, MAX_WORD_CHARS = 3, 48, 60
_DELIMITERS = frozenset("()[]{},:;.@") | {"->", "..."}
_BUILTINS = frozenset(n for n in dir(builtins) if not n.startswith("_")) - set(keyword.kwlist)
_SKIPPED = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENCODING,
    tokenize.ENDMARKER,
}
_FSTRING_START = getattr(tokenize, "FSTRING_START", None)  # Python >= 3.12 splits f-strings
_FSTRING_END = getattr(tokenize, "FSTRING_END", None)


def _logical_lines(text: str) -> Iterator[tuple[int, list[tuple[int, str]]]]:
    """(first line number, [(token type, text)]) of each logical line; an f-string is one STRING
    token on every Python version. Raises tokenize.TokenError / SyntaxError on bad source."""
    lines = text.splitlines(keepends=True)
    offsets = np.cumsum([0] + [len(line) for line in lines]).tolist()
    words: list[tuple[int, str]] = []
    first, depth, fstring_from = 0, 0, None
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == _FSTRING_START:
            depth += 1
            if depth == 1:
                fstring_from = tok.start
            continue
        if depth:
            if tok.type == _FSTRING_END:
                depth -= 1
                if not depth:
                    start = offsets[fstring_from[0] - 1] + fstring_from[1]
                    end = offsets[tok.end[0] - 1] + tok.end[1]
                    words.append((tokenize.STRING, text[start:end]))
            continue
        if tok.type in _SKIPPED:
            continue
        if tok.type == tokenize.NEWLINE:
            if words:
                yield first, words
            words = []
            continue
        if not words:
            first = tok.start[0]
        words.append((tok.type, tok.string))


def tag_code_line(words: list[tuple[int, str]]) -> list[str]:
    """BIO tags (TOKEN_TAGS) of one logical line's tokens, from `_logical_lines`."""
    tags = ["O"] * len(words)
    i = 0
    while i < len(words):
        kind, text = words[i]
        j = i + 1  # one past the span's last token
        if kind == tokenize.NAME and keyword.iskeyword(text):
            entity = "KEYWORD"
            pair = (text, words[j][1]) if j < len(words) else ()
            if pair in (("is", "not"), ("not", "in")):
                j += 1
        elif kind == tokenize.NAME:
            while j + 1 < len(words) and words[j][1] == "." and words[j + 1][0] == tokenize.NAME:
                j += 2
            dotted = j > i + 1 or (i > 0 and words[i - 1][1] == ".")
            entity = "BUILTIN" if text in _BUILTINS and not dotted else "NAME"
        elif kind == tokenize.NUMBER:
            entity = "NUMBER"
        elif kind == tokenize.STRING:
            while j < len(words) and words[j][0] == tokenize.STRING:
                j += 1
            entity = "STRING"
        elif kind == tokenize.OP and text not in _DELIMITERS:
            entity = "OPERATOR"
        else:
            i += 1
            continue
        tags[i:j] = [f"B-{entity}"] + [f"I-{entity}"] * (j - i - 1)
        i = j
    return tags


def code_lines(text: str) -> list[tuple[int, list[str], list[str]]]:
    """(line number, tokens, BIO tags) of a file's logical lines of MIN..MAX_LINE_WORDS short,
    single-line tokens; [] for a file that does not tokenize."""
    found = []
    try:
        for line, words in _logical_lines(text):
            texts = [w for _, w in words]
            if not MIN_LINE_WORDS <= len(texts) <= MAX_LINE_WORDS or any(
                len(w) > MAX_WORD_CHARS or "\n" in w for w in texts
            ):
                continue
            found.append((line, texts, tag_code_line(words)))
    except (tokenize.TokenError, SyntaxError):
        return []
    return found


class CodeTokens(_StdlibTaskBuilder):
    """Token classification: the tokens of a line of stdlib code -> BIO tags of their kinds."""

    DESCRIPTION = "Logical lines of stdlib code as Python tokens with BIO tags of their kinds."

    def _features(self) -> dict[str, Any]:
        return {
            "tokens": tfds.features.Sequence(tfds.features.Text()),
            "tags": tfds.features.Sequence(tfds.features.ClassLabel(names=list(TOKEN_TAGS))),
            "path": tfds.features.Text(),
        }

    def _generate_examples(
        self, split: str, paths: tuple[str, ...]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        rows = [
            (f"{path}:{line}", path, tokens, tags)
            for path, text in _read_stdlib(paths)
            for line, tokens, tags in code_lines(text)
        ]
        rows.sort(key=lambda row: _key_hash(row[0]))
        for key, path, tokens, tags in rows[: LINE_CAP[split]]:
            yield key, {"tokens": tokens, "tags": tags, "path": path}


MAX_QA_CONTEXT_CHARS, MAX_ANSWER_CHARS = 600, 60  # a context fits ~128 tokens


def function_questions(source: str, name: str) -> list[tuple[str, str, int]]:
    """(question, answer, answer's character offset in source) about one function's source:
    what its first return statement returns, and which parameter has a given default (asked only
    when that default's text is unique)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    fn = tree.body[0] if tree.body else None
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return []
    lines = source.split("\n")
    starts = np.cumsum([0] + [len(line) + 1 for line in lines]).tolist()

    def offset(node: ast.AST) -> int:  # ast columns count UTF-8 bytes
        line = lines[node.lineno - 1].encode("utf-8")[: node.col_offset]
        return starts[node.lineno - 1] + len(line.decode("utf-8"))

    def span(node: ast.AST) -> Optional[tuple[str, int]]:
        text = ast.get_source_segment(source, node)
        if not text or "\n" in text or len(text) > MAX_ANSWER_CHARS:
            return None
        start = offset(node)
        return (text, start) if source[start : start + len(text)] == text else None

    found = []
    returned = next(
        (
            node.value
            for node in _own_statements(fn)
            if isinstance(node, ast.Return) and node.value is not None
        ),
        None,
    )
    answer = span(returned) if returned is not None else None
    if answer:
        found.append((f"What does {name} return?", *answer))
    args = fn.args.posonlyargs + fn.args.args
    pairs = list(zip(args[len(args) - len(fn.args.defaults) :], fn.args.defaults))
    pairs += [(a, d) for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults) if d is not None]
    defaults = collections.Counter(ast.get_source_segment(source, d) for _, d in pairs)
    for arg, default in pairs:
        text = ast.get_source_segment(source, default)
        answer = span(arg)
        if answer and text and defaults[text] == 1 and "\n" not in text:
            found.append((f"Which argument of {name} defaults to {text}?", answer[0], answer[1]))
            break  # one such question per function
    return found


def _own_statements(fn: ast.AST) -> Iterator[ast.AST]:
    """The statements of a function in source order, not those of functions or classes in it."""
    for field in _BLOCK_FIELDS:
        for child in getattr(fn, field, ()):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            yield child
            yield from _own_statements(child)


class CodeQA(_StdlibTaskBuilder):
    """Extractive QA: a question about a stdlib function -> a span of its source (SQuAD layout)."""

    DESCRIPTION = (
        "Questions about stdlib functions (what they return, which argument has a default) "
        "answered by a span of the function's source, in SQuAD's layout."
    )

    def _features(self) -> dict[str, Any]:
        return {
            "id": tfds.features.Text(),
            "path": tfds.features.Text(),
            "context": tfds.features.Text(),
            "question": tfds.features.Text(),
            "answers": tfds.features.Sequence(
                {"text": tfds.features.Text(), "answer_start": np.int32}
            ),
        }

    def _generate_examples(
        self, split: str, paths: tuple[str, ...]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for path, f in stdlib_functions(paths):
            source = f["source"]
            if len(source) > MAX_QA_CONTEXT_CHARS:
                continue
            for i, (question, text, start) in enumerate(function_questions(source, f["name"])):
                key = f"{path}:{f['lineno']}:{i}"
                yield (
                    key,
                    {
                        "id": key,
                        "path": path,
                        "context": source,
                        "question": question,
                        "answers": {"text": [text], "answer_start": [start]},
                    },
                )


BUILDERS: dict[str, type[_StdlibTaskBuilder]] = {
    "code_package": CodePackage,
    "code_docstring": CodeDocstring,
    "code_completion": CodeCompletion,
    "code_tokens": CodeTokens,
    "code_qa": CodeQA,
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
