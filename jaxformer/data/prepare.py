"""Tokenize once: datasets -> a sentencepiece tokenizer and sharded token stores on disk.

`python -m jaxformer.data.prepare --config CONFIG [key=value ...]` does it ahead of training with
every core; `train.py` runs the same code implicitly (and in-process for one-shard corpora such as
the built-in one). Shards are written atomically and independently, so an interrupted preparation
resumes shard by shard, and no step ever holds more than one shard per worker in memory.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np

from jaxformer.config import load_config, read_yaml
from jaxformer.data import token_store as ts
from jaxformer.data.config import DataConfig, SourceConfig
from jaxformer.data.corpus import resolve_data_dir, text_source
from jaxformer.data.objectives import SpecialIds
from jaxformer.data.tokenizer import (
    AnyTokenizer,
    load_tokenizer,
    load_tokenizer_file,
    train_tokenizer,
)

_ENCODE_BATCH = 256


@dataclasses.dataclass
class PreparedSource:
    """One dataset's token stores and its mixture weight."""

    name: str
    weight: float
    train: ts.TokenStore
    eval: ts.TokenStore


@dataclasses.dataclass
class PreparedData:
    """A tokenizer and, per source, its train/validation token stores (documents end with EOS)."""

    tokenizer: AnyTokenizer
    sources: list[PreparedSource]

    @property
    def special_ids(self) -> SpecialIds:
        """Ids the objectives treat specially."""
        tok = self.tokenizer
        return SpecialIds(
            vocab_size=tok.vocab_size,
            pad=tok.pad_id,
            eos=tok.eos_id,
            mask=tok.mask_id,
            sentinels=tuple(tok.sentinel_id(i) for i in range(tok.num_sentinels)),
            no_mask_ids=tuple(i for i in (tok.unk_id, tok.bos_id) if i >= 0),
        )

    def train_token_counts(self) -> np.ndarray:
        """Token histogram over every source's train split."""
        return sum(s.train.token_counts() for s in self.sources)


def tokens_root(cfg: DataConfig) -> str:
    """Where token stores and trained tokenizers live."""
    return cfg.tokens_dir or os.path.join(resolve_data_dir(cfg.data_dir), "jaxformer_tokens")


def _digest(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def _sample_indices(num_docs: int, limit: int, seed: int) -> np.ndarray:
    """Up to `limit` document indices spread over the split (all of them, in order, if they fit)."""
    if num_docs <= limit:
        return np.arange(num_docs)
    return np.sort(np.random.default_rng(seed).choice(num_docs, limit, replace=False))


def resolve_tokenizer(
    cfg: DataConfig,
    work_dir: str,
    *,
    tokenizer_model: Optional[bytes] = None,
    log: Callable[[str], None] = print,
) -> AnyTokenizer:
    """The run's tokenizer: from a checkpoint, a given path, a cached earlier training, or trained
    now on a bounded seeded sample of the train splits (then cached for other runs)."""
    if tokenizer_model is not None:
        tokenizer = load_tokenizer(tokenizer_model)
    elif cfg.tokenizer_path:
        tokenizer = load_tokenizer_file(cfg.tokenizer_path)
    else:
        sources = cfg.sources()
        key = _digest(
            cfg.vocab_size,
            cfg.tokenizer_docs,
            [(s.dataset, s.train_split, s.text_key, s.max_documents, s.weight) for s in sources],
        )
        cached = ts._path(tokens_root(cfg), f"tokenizers/{key}.model")  # pylint: disable=protected-access
        if cached.exists():
            tokenizer = load_tokenizer(cached.read_bytes())
        else:
            total = sum(s.weight for s in sources)
            texts: list[str] = []
            for s in sources:
                docs = text_source(
                    s.dataset, s.train_split, s.data_dir, s.text_key, s.max_documents
                )
                limit = max(1, round(cfg.tokenizer_docs * s.weight / total))
                texts.extend(docs[int(i)] for i in _sample_indices(len(docs), limit, 0))
            log(
                f"[data] training a {cfg.vocab_size}-piece sentencepiece tokenizer on "
                f"{len(texts)} documents"
            )
            tokenizer = train_tokenizer(texts, cfg.vocab_size)
            cached.parent.mkdir(parents=True, exist_ok=True)
            ts.write_bytes_atomic(str(cached.parent), cached.name, tokenizer.serialized_model())
    if work_dir and not os.path.exists(os.path.join(work_dir, "tokenizer.model")):
        tokenizer.save(os.path.join(work_dir, "tokenizer.model"))
    return tokenizer


def store_dir(cfg: DataConfig, source: SourceConfig, split: str, tokenizer: AnyTokenizer) -> str:
    """The token store of one split, keyed by everything its contents depend on."""
    key = _digest(
        hashlib.sha256(tokenizer.serialized_model()).hexdigest(),
        source.dataset,
        split,
        source.text_key,
        source.max_documents,
        cfg.docs_per_shard,
        ts.FORMAT,
    )
    name = source.dataset.replace("/", "_").replace(":", "_")
    return str(ts._path(tokens_root(cfg), f"{name}-{split}-{key}"))  # pylint: disable=protected-access


# -------------------------------------------------------------- per-shard work (runs in workers)

_WORKER: dict = {}


def exit_with_parent(parent: int, poll_seconds: float = 0.5) -> None:
    """Ends this (worker) process soon after its parent (pid `parent`, passed down by the parent
    itself: a worker may start after the parent died) dies, however it dies (kill -9 included),
    instead of tokenizing on for nobody while holding the parent's output pipe."""

    def watch() -> None:
        while os.getppid() == parent:  # an orphan is re-parented to init or a subreaper
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _init_pool_worker(parent: int, source: SourceConfig, split: str, model: bytes) -> None:
    exit_with_parent(parent)  # only in a pool's worker: a run in-process may outlive its shell
    _init_worker(source, split, model)


def _init_worker(source: SourceConfig, split: str, model: bytes) -> None:
    _WORKER["texts"] = text_source(
        source.dataset, split, source.data_dir, source.text_key, source.max_documents
    )
    _WORKER["tokenizer"] = load_tokenizer(model)


def _tokenize_shard(
    root: str,
    index: int,
    first: int,
    last: int,
    info: dict,
    progress: Optional[Callable[[int], None]] = None,
) -> dict:
    """Encodes documents [first, last) (each followed by EOS) into shard `index`."""
    texts, tokenizer = _WORKER["texts"], _WORKER["tokenizer"]
    pieces, lengths = [], []
    for start in range(first, last, _ENCODE_BATCH):
        stop = min(start + _ENCODE_BATCH, last)
        for ids in tokenizer.encode_batch([texts[i] for i in range(start, stop)]):
            ids.append(tokenizer.eos_id)
            pieces.append(np.asarray(ids, np.int64))
            lengths.append(len(ids))
        if progress:
            progress(stop - start)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    return ts.write_shard(
        root,
        index,
        tokens,
        np.asarray(lengths, np.int64),
        tokenizer.vocab_size,
        dict(info, first_doc=first, last_doc=last),
    )


def tokenize_split(
    cfg: DataConfig,
    source: SourceConfig,
    split: str,
    tokenizer: AnyTokenizer,
    *,
    workers: Optional[int] = None,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
    texts: Optional[Sequence[str]] = None,
) -> ts.TokenStore:
    """Tokenizes one split into its store (only the shards not already complete) and opens it.

    `texts` (random access, e.g. one field of a task's examples) replaces reading the source's
    text feature; it is tokenized in this process.
    """
    root = store_dir(cfg, source, split, tokenizer)
    if ts.read_json(root, ts.MANIFEST) is not None:
        return ts.TokenStore(root)
    given = texts
    if texts is None:
        texts = text_source(
            source.dataset, split, source.data_dir, source.text_key, source.max_documents
        )
    num_docs, per = len(texts), cfg.docs_per_shard
    ranges = [
        (i, first, min(first + per, num_docs)) for i, first in enumerate(range(0, num_docs, per))
    ]
    info = dict(dataset=source.dataset, split=split, text_key=source.text_key)
    if not ts.is_remote(root):
        os.makedirs(root, exist_ok=True)
    markers = {
        i: ts.complete_shard(root, i, dict(info, first_doc=a, last_doc=b)) for i, a, b in ranges
    }
    todo = [r for r in ranges if markers[r[0]] is None]
    done_docs = sum(b - a for i, a, b in ranges if markers[i] is not None)
    workers = (
        1
        if given is not None
        else min(workers or cfg.prepare_workers or os.cpu_count() or 1, len(todo))
    )
    log(
        f"[data] tokenizing {source.dataset} {split}: {num_docs} documents in {len(ranges)} "
        f"shards ({len(ranges) - len(todo)} already done) with {max(workers, 1)} worker(s) "
        f"into {root}"
    )
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    bar = tqdm(
        total=num_docs,
        initial=done_docs,
        desc=f"tokenize {split}",
        unit="doc",
        disable=not show_progress or not todo,
        dynamic_ncols=True,
    )
    try:
        if workers <= 1:
            if given is None:
                _init_worker(source, split, tokenizer.serialized_model())
            else:
                _WORKER.update(texts=given, tokenizer=tokenizer)
            for i, a, b in todo:
                markers[i] = _tokenize_shard(root, i, a, b, info, progress=bar.update)
        else:
            # spawn: the parent may hold jax/XLA threads that a fork would copy in a broken state.
            with concurrent.futures.ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_pool_worker,
                initargs=(os.getpid(), source, split, tokenizer.serialized_model()),
            ) as pool:
                futures = {
                    pool.submit(_tokenize_shard, root, i, a, b, info): (i, b - a)
                    for i, a, b in todo
                }
                try:
                    for future in concurrent.futures.as_completed(futures):
                        i, count = futures[future]
                        markers[i] = future.result()
                        bar.update(count)
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    finally:
        bar.close()
    ordered = [markers[i] for i, _, _ in ranges]
    ts.write_manifest(
        root,
        ordered,
        tokenizer.vocab_size,
        dict(info, tokenizer_sha256=hashlib.sha256(tokenizer.serialized_model()).hexdigest()),
    )
    return ts.TokenStore(root)


def prepare_data(
    cfg: DataConfig,
    work_dir: str,
    *,
    tokenizer_model: Optional[bytes] = None,
    workers: Optional[int] = None,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> PreparedData:
    """Tokenizer plus train/validation token stores of every source, preparing what is missing.

    `work_dir` (the run directory) receives tokenizer.model; a given `tokenizer_model` (e.g. from
    a checkpoint) wins over every other source of the tokenizer.
    """
    tokenizer = resolve_tokenizer(cfg, work_dir, tokenizer_model=tokenizer_model, log=log)
    sources = []
    for s in cfg.sources():
        stores = [
            tokenize_split(
                cfg, s, split, tokenizer, workers=workers, show_progress=show_progress, log=log
            )
            for split in (s.train_split, s.eval_split)
        ]
        sources.append(PreparedSource(s.dataset, s.weight, *stores))
    return PreparedData(tokenizer, sources)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m jaxformer.data.prepare`: tokenize a config's datasets ahead of training."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxformer.data.prepare",
        description="Train the tokenizer and write the token shards a config trains on.",
    )
    parser.add_argument("--config", help="run config YAML (the data section is used)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="tokenizing processes (default: data.prepare_workers, 0 = all cores)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="also check every shard's SHA-256 and token ids against the manifest",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted key=value overrides, e.g. data.tokens_dir=gs://bucket/tokens",
    )
    args = parser.parse_args(argv)
    # Only the data section matters here; other overrides (as given to train.py) are ignored.
    overrides = [o[len("data.") :] for o in args.overrides if o.startswith("data.")]

    def terminate(_signum, _frame):
        raise KeyboardInterrupt  # SIGTERM (a scheduler, `timeout`) ends it as Ctrl-C does

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        section = read_yaml(args.config).get("data") or {} if args.config else {}
        cfg = load_config(DataConfig, None, overrides, base=section)
        data = prepare_data(cfg, "", workers=args.workers)
        if args.verify:
            for s in data.sources:
                for store in (s.train, s.eval):
                    store.verify()
                    print(f"[verify] {store.root}: sizes, checksums and token ids match")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\n[prepare] interrupted; finished shards are kept: rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    for s in data.sources:
        print(
            json.dumps(
                dict(
                    dataset=s.name,
                    train=s.train.root,
                    train_tokens=s.train.num_tokens,
                    validation=s.eval.root,
                    validation_tokens=s.eval.num_tokens,
                )
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
