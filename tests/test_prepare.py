"""Tokenize once into sharded stores; train from them; mixtures; background prefetch."""

import dataclasses
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from jaxformer.data import prefetch
from jaxformer.data import prepare as prep
from jaxformer.data import token_store as ts
from jaxformer.data.config import DataConfig, SourceConfig
from jaxformer.data.mixture import MixtureBatcher, rows_per_source
from jaxformer.data.objectives import SpecialIds
from jaxformer.data.pipeline import make_batcher
from jaxformer.data.standin import build_standin
from jaxformer.training.main import run_training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = SpecialIds(vocab_size=300, pad=0, eos=1, mask=2, sentinels=tuple(range(200, 300)))


@pytest.fixture(scope="module")
def standin_dir(tmp_path_factory) -> str:
    """A c4/en stand-in with three array_record files per split."""
    data_dir = str(tmp_path_factory.mktemp("standin"))
    build_standin("c4/en", data_dir, train_documents=900, validation_documents=120, num_shards=3)
    return data_dir


@pytest.fixture
def tokenizer_file(stdlib_tokenizer, tmp_path) -> str:
    path = str(tmp_path / "tok.model")
    stdlib_tokenizer.save(path)
    return path


def _random_stream(seed=0, num_docs=50):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, num_docs)
    tokens = rng.integers(0, 70000, int(lengths.sum()))
    return tokens, lengths


def test_token_store_reads_exactly_like_the_in_memory_stream(tmp_path):
    root = str(tmp_path / "store")
    os.makedirs(root)
    tokens, lengths = _random_stream()
    cuts = [0, 17, 17, 50]  # documents per shard: 17, an empty shard, 33
    markers, first_token = [], 0
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        n = int(lengths[a:b].sum())
        markers.append(
            ts.write_shard(root, i, tokens[first_token : first_token + n], lengths[a:b], 70000, {})
        )
        first_token += n
    ts.write_manifest(root, markers, 70000, {})
    store = ts.TokenStore(root)
    memory = ts.ArrayTokens(tokens, np.concatenate([[0], np.cumsum(lengths)]))
    assert (
        store.manifest["dtype"] == "uint32" and store.num_tokens == len(tokens) == memory.num_tokens
    )
    rng = np.random.default_rng(1)
    for _ in range(200):
        a, b = sorted(rng.integers(0, len(tokens) + 1, 2))
        np.testing.assert_array_equal(store.tokens(a, b), memory.tokens(a, b))
        np.testing.assert_array_equal(store.doc_starts(a, b), memory.doc_starts(a, b))
    np.testing.assert_array_equal(store.token_counts(), np.bincount(tokens, minlength=70000))
    again = pickle.loads(pickle.dumps(store))  # workers get a path, not the data
    assert len(pickle.dumps(store)) < 200
    np.testing.assert_array_equal(again.tokens(0, len(tokens)), tokens)
    with pytest.raises(IndexError):
        store.tokens(0, len(tokens) + 1)
    with pytest.raises(FileNotFoundError, match="jaxformer.data.prepare"):
        ts.TokenStore(str(tmp_path / "missing"))


def test_prepare_in_parallel_resumes_an_interrupted_run_shard_by_shard(
    standin_dir, tokenizer_file, stdlib_tokenizer, tmp_path, monkeypatch
):
    cfg = DataConfig(
        dataset="c4/en",
        data_dir=standin_dir,
        tokenizer_path=tokenizer_file,
        docs_per_shard=200,
        tokens_dir=str(tmp_path / "tokens"),
    )
    source = cfg.sources()[0]
    calls = []
    original = prep._tokenize_shard

    def interrupted(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(prep, "_tokenize_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prep.tokenize_split(cfg, source, "train", stdlib_tokenizer, workers=1, show_progress=False)
    monkeypatch.setattr(prep, "_tokenize_shard", original)
    root = prep.store_dir(cfg, source, "train", stdlib_tokenizer)
    assert not os.path.exists(os.path.join(root, ts.MANIFEST))
    done = {
        i: os.stat(os.path.join(root, f"{ts.shard_name(i)}.tokens")).st_mtime_ns for i in (0, 1)
    }
    assert not os.path.exists(os.path.join(root, f"{ts.shard_name(2)}.json"))

    logs = []
    store = prep.tokenize_split(
        cfg, source, "train", stdlib_tokenizer, workers=2, show_progress=False, log=logs.append
    )
    assert "5 shards (2 already done) with 2 worker(s)" in logs[0]
    for i, mtime in done.items():  # finished shards were kept, not redone
        assert os.stat(os.path.join(root, f"{ts.shard_name(i)}.tokens")).st_mtime_ns == mtime
    assert store.manifest["num_shards"] == 5 and store.num_docs == 900

    # The same bytes as encoding every document in order, each followed by EOS.
    from jaxformer.data.corpus import text_source

    texts = text_source("c4/en", "train", standin_dir)
    expected = [t + [stdlib_tokenizer.eos_id] for t in stdlib_tokenizer.encode_batch(list(texts))]
    np.testing.assert_array_equal(store.tokens(0, store.num_tokens), np.concatenate(expected))
    starts = np.cumsum([len(e) for e in expected])[:-1]
    np.testing.assert_array_equal(store.doc_starts(0, store.num_tokens), starts)


def test_batches_from_the_store_split_exactly_over_processes(standin_dir, tokenizer_file, tmp_path):
    cfg = DataConfig(
        dataset="c4/en",
        data_dir=standin_dir,
        tokenizer_path=tokenizer_file,
        docs_per_shard=300,
        tokens_dir=str(tmp_path / "tokens"),
        seq_len=64,
        batch_size=8,
        objective="span_corruption",
        target_len=16,
    )
    data = prep.prepare_data(cfg, str(tmp_path), show_progress=False, log=lambda _: None)
    store = data.sources[0].train
    assert os.path.exists(tmp_path / "tokenizer.model")
    batcher = make_batcher(cfg, store, data.special_ids, 3)
    for step in (0, 5, 1000):  # 1000: many epochs in
        full = batcher.batch(step)
        for count in (2, 4):
            parts = [
                make_batcher(cfg, ts.TokenStore(store.root), data.special_ids, 3).batch(
                    step, i, count
                )
                for i in range(count)
            ]
            for k in full:
                np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])


def test_mixture_rows_follow_the_weights_and_are_a_function_of_step():
    assert rows_per_source([0.7, 0.3], 10) == [7, 3]
    assert rows_per_source([1, 1, 1], 8) == [3, 3, 2]
    with pytest.raises(ValueError, match="no row"):
        rows_per_source([1000, 1], 8)
    tokens_a = ts.ArrayTokens(np.arange(4000) % 300, np.array([0, 4000]))
    tokens_b = ts.ArrayTokens(np.full(3000, 299), np.array([0, 3000]))
    cfg = DataConfig(seq_len=16, batch_size=8, objective="causal_lm")
    make = lambda: MixtureBatcher(
        [
            make_batcher(cfg, tokens_a, SPECIAL, 1),
            make_batcher(cfg, tokens_b, SPECIAL, 1, source_index=1),
        ],
        [3, 1],
        seed=1,
    )
    mix = make()
    for step in (0, 7):
        batch = mix.batch(step)
        from_b = np.all(batch["inputs"] == 299, axis=1)
        assert from_b.sum() == 2  # 8 * 1/4 rows of the second source
        halves = [make().batch(step, i, 2) for i in range(2)]
        np.testing.assert_array_equal(
            np.concatenate([h["inputs"] for h in halves]), batch["inputs"]
        )
    assert not np.array_equal(mix.batch(0)["inputs"], mix.batch(1)["inputs"])


def test_prefetch_gives_the_same_batches_in_order_and_raises_errors():
    fn = lambda step: {"x": np.full(3, step)}
    ahead = list(prefetch.ahead(fn, 5, 40, threads=3, buffer=6))
    assert [int(b["x"][0]) for b in ahead] == list(range(5, 40))
    assert [int(b["x"][0]) for b in prefetch.ahead(fn, 2, 4, buffer=0)] == [2, 3]

    def broken(step):
        if step == 3:
            raise ValueError("bad row")
        return step

    with pytest.raises(ValueError, match="bad row"):
        list(prefetch.ahead(broken, 0, 10, threads=2, buffer=4))


def test_mixture_run_reports_validation_per_source(standin_dir, tiny_overrides, tmp_path):
    run_dir = str(tmp_path / "run")
    overrides = tiny_overrides + [
        f"run.dir={run_dir}",
        "train.steps=2",
        f"data.tokens_dir={tmp_path / 'tokens'}",
        f"data.mixture=[{{dataset: stdlib_code, weight: 3}}, "
        f"{{dataset: c4/en, weight: 1, data_dir: {standin_dir}}}]",
    ]
    assert run_training(None, overrides) == 0
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    final = [r for r in rows if r["split"] == "validation"][-1]
    for name in ("stdlib_code", "c4/en"):
        assert np.isfinite(final[f"{name}/loss"]) and final[f"{name}/loss"] > 0
    # the overall loss is the token-weighted mean of the two
    lo, hi = sorted([final["stdlib_code/loss"], final["c4/en/loss"]])
    assert lo <= final["loss"] <= hi


TINY_LLAMA = [
    "model.d_model=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.d_ff=128",
    "model.max_len=64",
    "data.seq_len=64",
]
TINY_T5 = [
    "model.d_model=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.d_ff=128",
    "data.seq_len=64",
    "data.target_len=16",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "config,model", [("c4_llama_1b.yaml", TINY_LLAMA), ("c4_t5_base.yaml", TINY_T5)]
)
def test_c4_configs_run_end_to_end_on_the_standin(config, model, standin_dir, tmp_path):
    tokens = str(tmp_path / "tokens")
    common = [
        f"data.data_dir={standin_dir}",
        f"data.tokens_dir={tokens}",
        "data.vocab_size=512",
        "data.tokenizer_docs=300",
        "data.docs_per_shard=400",
    ]
    # Tokenize ahead with the command line, as on a pod; training then finds the shards.
    prepared = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxformer.data.prepare",
            "--config",
            f"configs/{config}",
            "--workers",
            "2",
            *common,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    train_report = json.loads(prepared.stdout.strip().splitlines()[-1])
    assert train_report["dataset"] == "c4/en" and train_report["train_tokens"] > 0
    stores = sorted(os.listdir(tokens))
    run_dir = str(tmp_path / "run")
    status = run_training(
        f"{REPO}/configs/{config}",
        common
        + model
        + [
            "data.batch_size=8",
            "optimizer.grad_accum_steps=1",
            "train.steps=2",
            "optimizer.warmup_steps=1",
            "train.eval_every=0",
            "train.eval_batches=1",
            "train.log_every=1",
            "checkpoint.every=2",
            "checkpoint.async_save=false",
            f"run.dir={run_dir}",
        ],
    )
    assert status == 0
    assert sorted(os.listdir(tokens)) == stores  # nothing tokenized again
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_source_config_checks():
    with pytest.raises(ValueError, match="weight"):
        SourceConfig("c4/en", weight=0)
    with pytest.raises(ValueError, match="twice"):
        DataConfig(mixture=(SourceConfig("a"), SourceConfig("a")))
    cfg = DataConfig(data_dir="/d", mixture=(SourceConfig("a"), SourceConfig("b", data_dir="/e")))
    assert [s.data_dir for s in cfg.sources()] == ["/d", "/e"]
    assert dataclasses.replace(cfg, mixture=()).sources()[0].dataset == "stdlib_code"
