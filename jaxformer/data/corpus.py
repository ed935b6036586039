"""Text corpora: the built-in stdlib-code TFDS dataset and random-access text sources."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

STDLIB_DATASET = "stdlib_code"
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "jaxformer", "tfds")
# Directories that hold tests, tooling or third-party code rather than library source.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
)
_VALIDATION_PERCENT = 5


def resolve_data_dir(data_dir: str = "") -> str:
    """Returns the absolute TFDS data directory; empty means ~/.cache/jaxformer/tfds."""
    if "://" in data_dir:  # an object store path (gs://...) is already absolute
        return data_dir
    return os.path.abspath(os.path.expanduser(data_dir or DEFAULT_DATA_DIR))


def stdlib_root() -> str:
    """Returns the running interpreter's standard-library directory."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None) -> list[str]:
    """Returns the sorted relative paths of the stdlib .py files the corpus uses."""
    root = root or stdlib_root()
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                paths.append(
                    os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
                )
    return sorted(paths)


def split_of(relpath: str) -> str:
    """Returns 'validation' or 'train' for a relative path, stably across runs and machines."""
    bucket = int(hashlib.sha1(relpath.encode("utf-8")).hexdigest(), 16) % 100
    return "validation" if bucket < _VALIDATION_PERCENT else "train"


def file_list_hash(paths: Sequence[str]) -> str:
    """Returns the sha256 of the newline-joined sorted relative paths."""
    return hashlib.sha256("\n".join(sorted(paths)).encode("utf-8")).hexdigest()


def _read_text(path: str) -> str | None:
    """Returns the file's text, or None when it is empty or not valid UTF-8."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text or None


def _python_version() -> str:
    return ".".join(str(v) for v in sys.version_info[:3])


class StdlibBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the offline builders over the interpreter's standard library (array_record)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    # tfds's default code_path lookup needs `importlib_resources` for builders outside
    # tensorflow_datasets; this package's own folder is all it is used for.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def __init__(self, *, data_dir: str | None = None, **kwargs: Any):
        kwargs.setdefault("file_format", "array_record")
        self._files = tuple(stdlib_files())
        super().__init__(data_dir=data_dir, **kwargs)


class StdlibCode(StdlibBuilder):
    """The running interpreter's standard-library Python source, one document per file."""

    def _info(self) -> tfds.core.DatasetInfo:
        metadata = tfds.core.MetadataDict(
            python_version=_python_version(),
            file_list_sha256=file_list_hash(self._files),
            num_files=len(self._files),
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description="Python standard-library source files (tests and tooling excluded).",
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "path": tfds.features.Text()}
            ),
            metadata=metadata,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict[str, str]]]]:
        del dl_manager  # Offline: everything comes from the local interpreter.
        by_split: dict[str, list[str]] = {"train": [], "validation": []}
        for path in self._files:
            by_split[split_of(path)].append(path)
        return {name: self._generate_examples(paths) for name, paths in by_split.items()}

    def _generate_examples(self, paths: list[str]) -> Iterator[tuple[str, dict[str, str]]]:
        root = stdlib_root()
        for path in paths:
            text = _read_text(os.path.join(root, path))
            if text is not None:
                yield path, {"text": text, "path": path}


def build_stdlib_corpus(data_dir: str = "") -> StdlibCode:
    """Prepares the stdlib_code dataset offline (a no-op once prepared) and returns its builder."""
    builder = StdlibCode(data_dir=resolve_data_dir(data_dir))
    if builder.is_prepared():
        stored = builder.info.metadata.get("file_list_sha256")
        current = file_list_hash(builder._files)  # pylint: disable=protected-access
        if stored != current:
            raise ValueError(
                f"stdlib_code in {builder.data_dir} was built from another interpreter's stdlib "
                f"(file list sha256 {stored}, this Python {_python_version()} gives {current}); "
                "use another data_dir or delete that directory"
            )
        return builder
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return builder


def python_value(value: Any) -> Any:
    """A TFDS feature value as plain Python: numpy scalars unwrapped, bytes decoded as UTF-8."""
    if hasattr(value, "item"):  # numpy scalar or 0-d array
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else value


class RandomAccessView(Sequence):
    """The first `length` records of a data source, indexable (negative indices and slices too).

    Subclasses say what one record becomes in `_convert`.
    """

    item_name = "record"

    def __init__(self, source: Sequence[Any], length: int):
        self._source, self._length = source, length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(
                f"{self.item_name} index {index} out of range for {self._length} {self.item_name}s"
            )
        return self._convert(self._source[index])

    def _convert(self, record: Any) -> Any:
        return record


class TextSequence(RandomAccessView):
    """A random-access view of one text feature of a TFDS data source, as str."""

    item_name = "document"

    def __init__(self, source: Sequence[Any], text_key: str, length: int):
        super().__init__(source, length)
        self._text_key = text_key

    def _convert(self, record: Any) -> str:
        return str(python_value(record[self._text_key]))


def _stdlib_source(split: str, data_dir: str) -> Sequence[Any]:
    builder = build_stdlib_corpus(data_dir)
    if split not in builder.info.splits:
        raise ValueError(
            f"split {split!r} not in dataset 'stdlib_code'; available: "
            f"{', '.join(sorted(builder.info.splits))}"
        )
    return builder.as_data_source(split=split)


def _tfds_source(dataset: str, split: str, data_dir: str, text_key: str) -> Sequence[Any]:
    try:
        builder = tfds.builder(dataset, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"unknown TFDS dataset {dataset!r} ({first_line})") from None
    features = builder.info.features
    if text_key not in features:
        raise ValueError(
            f"feature {text_key!r} not in dataset {dataset!r}; available: {', '.join(sorted(features))}"
        )
    try:
        # download=False: this machine may have no network; preparing is an explicit step.
        return tfds.data_source(
            dataset, split=split, data_dir=data_dir, download=False, try_gcs=False
        )
    except Exception as e:  # pylint: disable=broad-except
        if not builder.is_prepared():
            raise ValueError(
                f"dataset {dataset!r} is not prepared in {data_dir}; run "
                f"`tfds build {dataset} --data_dir={data_dir} --file_format=array_record` "
                "on a machine with network"
            ) from None
        splits = builder.info.splits
        if splits and split not in splits:
            raise ValueError(
                f"split {split!r} not in dataset {dataset!r}; available: {', '.join(sorted(splits))}"
            ) from None
        raise ValueError(f"cannot read {dataset!r} split {split!r} from {data_dir}: {e}") from e


def text_source(
    dataset: str,
    split: str,
    data_dir: str = "",
    text_key: str = "text",
    max_documents: int | None = None,
) -> Sequence[str]:
    """Returns a random-access sequence of the documents of one split of a TFDS dataset."""
    data_dir = resolve_data_dir(data_dir)
    if max_documents is not None and max_documents < 0:
        raise ValueError(f"max_documents must be >= 0, got {max_documents}")
    if dataset == STDLIB_DATASET:
        if text_key not in ("text", "path"):
            raise ValueError(
                f"feature {text_key!r} not in dataset 'stdlib_code'; available: path, text"
            )
        source = _stdlib_source(split, data_dir)
    else:
        source = _tfds_source(dataset, split, data_dir, text_key)
    length = len(source) if max_documents is None else min(len(source), max_documents)
    if length == 0:
        raise ValueError(
            f"dataset {dataset!r} split {split!r} has no documents"
            + (f" (max_documents={max_documents})" if max_documents is not None else "")
        )
    return TextSequence(source, text_key, length)


def metadata(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
    """Returns a builder's stored metadata as a plain dict (for logs and checkpoints)."""
    return json.loads(json.dumps(dict(builder.info.metadata or {})))
