"""Input-side memory and throughput over corpora 1x and 20x the built-in one.

    python benchmarks/input_pipeline.py [--scales 1 20] [--batches 200]

Builds (once, under --work) the stdlib_code train split as a token store, then stores 20x its size
made of seeded shuffles of its documents. For each scale a fresh process opens the store, draws
batches as training does (causal LM, seed 0, steps 0..N-1) at the default shape (32 x 128) and at a
pod row length (8 x 2048), synchronously and through the background prefetcher, and reports its
resident memory: anonymous (heap) and file-backed (the memory-mapped pages it touched).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def _rss_kib() -> dict[str, int]:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields


def build_stores(work: str, scales: list[int]) -> dict[int, str]:
    """{scale: store directory}; the 1x store is the real stdlib_code train split."""
    from jaxformer.data import token_store as ts
    from jaxformer.data.config import DataConfig
    from jaxformer.data.prepare import prepare_data

    cfg = DataConfig(tokens_dir=os.path.join(work, "tokens"))
    base = prepare_data(cfg, "", show_progress=False, log=print).sources[0].train
    roots = {1: base.root}
    tokens = base.tokens(0, base.num_tokens)
    starts = np.concatenate([base.doc_starts(0, base.num_tokens), [0, base.num_tokens]])
    bounds = np.unique(starts)
    docs = [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    for scale in scales:
        if scale == 1:
            continue
        root = os.path.join(work, f"x{scale}")
        roots[scale] = root
        if ts.read_json(root, ts.MANIFEST) is not None:
            continue
        os.makedirs(root, exist_ok=True)
        markers = []
        for copy in range(scale):  # one shard per copy, documents in a seeded order
            order = np.random.default_rng(copy).permutation(len(docs))
            shard = [docs[i] for i in order]
            markers.append(
                ts.write_shard(
                    root,
                    copy,
                    np.concatenate(shard),
                    np.array([len(d) for d in shard]),
                    base.vocab_size,
                    {},
                )
            )
        ts.write_manifest(root, markers, base.vocab_size, {})
    return roots


def measure(root: str, batches: int) -> dict:
    """Runs in a fresh process: RSS after opening, then batches/s per shape and mode."""
    from jaxformer.data import prefetch
    from jaxformer.data.config import DataConfig
    from jaxformer.data.objectives import SpecialIds
    from jaxformer.data.pipeline import make_batcher
    from jaxformer.data.token_store import TokenStore

    store = TokenStore(root)
    special = SpecialIds(vocab_size=store.vocab_size, pad=0, eos=1, mask=2)
    result = {"tokens": store.num_tokens, "rss_open_kib": _rss_kib()}
    for name, seq_len, batch_size in (("default 32x128", 128, 32), ("pod 8x2048", 2048, 8)):
        cfg = DataConfig(seq_len=seq_len, batch_size=batch_size, objective="causal_lm")
        batcher = make_batcher(cfg, store, special, 0)
        for mode, buffer in (("sync", 0), ("prefetch", 8)):
            start = time.perf_counter()
            for _ in prefetch.ahead(batcher.batch, 0, batches, threads=2, buffer=buffer):
                pass
            rate = batches / (time.perf_counter() - start)
            result[f"{name} {mode} batches/s"] = round(rate, 1)
            result[f"{name} {mode} tokens/s"] = round(rate * seq_len * batch_size)
    result["rss_end_kib"] = _rss_kib()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default=os.path.expanduser("~/.cache/jaxformer/bench_input"))
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.batches)))
        return
    roots = build_stores(args.work, args.scales)
    for scale in args.scales:
        out = subprocess.run(
            [sys.executable, __file__, "--measure", roots[scale], "--batches", str(args.batches)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        size_mib = result["tokens"] * 2 / 2**20
        print(f"\n== {scale}x: {result['tokens']:,} tokens ({size_mib:.0f} MiB of uint16 on disk)")
        for when in ("rss_open_kib", "rss_end_kib"):
            r = result[when]
            print(
                f"  {when[:-4]}: RSS {r['VmRSS'] / 1024:.0f} MiB (anon {r['RssAnon'] / 1024:.0f},"
                f" file {r['RssFile'] / 1024:.0f}), peak {r['VmHWM'] / 1024:.0f} MiB"
            )
        for key, value in result.items():
            if key.endswith("/s"):
                print(f"  {key}: {value:,}")


if __name__ == "__main__":
    main()
