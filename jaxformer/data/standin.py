"""Small offline stand-ins for web-text TFDS datasets (C4 and the like), with the same interface.

A stand-in is written as the real dataset would be (`<data_dir>/<name>/<config>/<version>/`,
array_record shards, the same `text`/`timestamp`/`url` features), so `tfds.data_source("c4/en")`,
`python -m jaxformer.data.prepare` and `train.py --config configs/c4_*.yaml` run on it unchanged.
Its documents are English prose: the docstrings of the running interpreter's standard library,
grouped a few per document, repeated with a seeded shuffle to reach the requested count.

    python -m jaxformer.data.standin c4/en --data_dir /tmp/standin --documents 20000
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxformer.data import corpus

_DOCSTRINGS_PER_DOC = 4


def stdlib_docstrings() -> list[str]:
    """Every module, class and function docstring of the stdlib corpus files, in file order."""
    found = []
    root = corpus.stdlib_root()
    for rel in corpus.stdlib_files():
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    found.append(doc)
    return found


def prose_documents(count: int, seed: int = 0) -> Iterator[str]:
    """`count` documents of a few docstrings each, in a seeded order."""
    paragraphs = stdlib_docstrings()
    rng = np.random.default_rng(seed)
    produced, order = 0, np.arange(0)
    while produced < count:
        if len(order) < _DOCSTRINGS_PER_DOC:
            order = rng.permutation(len(paragraphs))
        take, order = order[:_DOCSTRINGS_PER_DOC], order[_DOCSTRINGS_PER_DOC:]
        yield "\n\n".join(paragraphs[i] for i in take) + "\n"
        produced += 1


def standin_builder(name: str, version: str = "3.1.0") -> type:
    """A TFDS builder class writing prose under `name` ('c4/en': dataset c4, config en)."""
    dataset, _, config = name.partition("/")

    class Standin(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config)] if config else []

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls) -> epath.Path:
            return epath.Path(__file__)

        def __init__(self, *, documents: dict[str, int], **kwargs: Any):
            self._documents = documents
            super().__init__(**kwargs)

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Offline stand-in for {name}: stdlib docstrings as prose.",
                features=tfds.features.FeaturesDict(
                    {k: tfds.features.Text() for k in ("text", "timestamp", "url")}
                ),
            )

        def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
            del dl_manager
            return {
                split: self._generate_examples(split, n, seed)
                for seed, (split, n) in enumerate(sorted(self._documents.items()))
            }

        def _generate_examples(self, split: str, n: int, seed: int) -> Iterator[tuple[str, dict]]:
            for i, text in enumerate(prose_documents(n, seed)):
                yield (
                    f"{split}-{i:09d}",
                    {
                        "text": text,
                        "timestamp": "2019-04-25T00:00:00Z",
                        "url": f"https://standin.invalid/{split}/{i}",
                    },
                )

    Standin.name = dataset
    return Standin


def build_standin(
    name: str,
    data_dir: str,
    train_documents: int = 20_000,
    validation_documents: int = 1_000,
    num_shards: Optional[int] = None,
) -> tfds.core.DatasetBuilder:
    """Writes the stand-in for `name` into data_dir (array_record, `num_shards` files per split)."""
    builder = standin_builder(name)(
        documents={"train": train_documents, "validation": validation_documents},
        data_dir=corpus.resolve_data_dir(data_dir),
        file_format="array_record",
    )
    if not builder.is_prepared():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                try_download_gcs=False, num_shards=num_shards
            )
        )
    return builder


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m jaxformer.data.standin NAME --data_dir DIR`: write a stand-in dataset."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxformer.data.standin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", help="TFDS name to stand in for, e.g. c4/en")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--documents", type=int, default=20_000, help="train documents")
    parser.add_argument("--validation_documents", type=int, default=1_000)
    parser.add_argument("--shards", type=int, default=None, help="array_record files per split")
    args = parser.parse_args(argv)
    builder = build_standin(
        args.name, args.data_dir, args.documents, args.validation_documents, args.shards
    )
    print(f"{args.name} stand-in ready in {builder.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
