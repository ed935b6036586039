"""Observability: a `jax.profiler` trace of `train.profile_steps`, Weights & Biases logging beside
TensorBoard and metrics.jsonl, and one model-FLOP count behind every MFU."""

import glob
import importlib.util
import json
import math
import os
import types

import pytest

from jaxformer.bench import train as bench_train
from jaxformer.config import ConfigError
from jaxformer.training.cli import MissingDependency
from jaxformer.training.config import load_experiment
from jaxformer.training.loop import Trainer
from jaxformer.training.metrics import read_metrics
from jaxformer.training.pretraining import Pretraining


def _trainer(overrides, logs):
    cfg = load_experiment(None, overrides)
    return Trainer(cfg, show_progress=False, log=logs.append)


def test_profile_steps_write_a_trace_and_mfu_uses_the_bench_count(tiny_overrides, tmp_path, capsys):
    run_dir = tmp_path / "run"
    logs = []
    overrides = tiny_overrides + [
        f"run.dir={run_dir}",
        "train.steps=6",
        "train.profile_steps=[2,4]",
        "train.peak_flops=1e9",  # a stated peak, so the CPU run logs an MFU
    ]
    trainer = _trainer(overrides, logs)
    try:
        trainer.run()
    finally:
        trainer.close()
    profile = run_dir / "profile"
    traces = glob.glob(str(profile / "plugins" / "profile" / "*"))
    assert len(traces) == 1, traces
    for pattern in ("*.xplane.pb", "*.trace.json.gz", "perfetto_trace.json.gz"):
        assert glob.glob(os.path.join(traces[0], pattern)), pattern
    out = capsys.readouterr().out  # the progress bar's lines (shown or not)
    assert f"[profile] tracing steps 2-4 into {profile}" in out
    assert f"[profile] steps 2-4 traced: {traces[0]}" in out

    # The logged MFU is the bench's model FLOPs per token times tokens/s over the peak.
    bench = bench_train.run(trainer.cfg, steps=0)
    tokens = Pretraining().tokens_per_step(trainer.cfg)
    assert math.isclose(trainer.model_flops_per_step() / tokens, bench["model_flops_per_token"])
    for record in read_metrics(str(run_dir)):
        if record["split"] == "train":
            achieved = bench["model_flops_per_token"] * record["tokens_per_second"]
            assert math.isclose(record["mfu"], achieved / (1e9 * 8), rel_tol=1e-6)


@pytest.mark.parametrize(
    "steps, why",
    [
        ("[4,2]", "1 <= first <= last"),
        ("[-1,2]", "1 <= first <= last"),
        ("[0,2]", "1 <= first <= last"),
        ("[2]", "a range [first, last]"),
        ("[2,9]", "ends after the run's last step (train.steps=6)"),
    ],
)
def test_bad_profile_steps_are_refused_by_the_config(steps, why):
    with pytest.raises(ConfigError, match="train.profile_steps") as err:
        load_experiment(None, [f"train.profile_steps={steps}", "train.steps=6"])
    assert why in str(err.value)


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny", "t5-tiny"])
def test_trainer_and_bench_count_the_same_model_flops(name):
    cfg = load_experiment(None, [f"model.preset={name}", "data.seq_len=32", "data.batch_size=8"])
    workload = Pretraining()
    # The Trainer's own method, on the attributes it reads (no data, no state).
    trainer = types.SimpleNamespace(workload=workload, cfg=cfg, batch_size=8)
    per_token = Trainer.model_flops_per_step(trainer) / workload.tokens_per_step(cfg)
    bench = bench_train.run(cfg, steps=0)
    assert per_token == bench["model_flops_per_token"]
    assert bench["tokens_per_step"] == workload.tokens_per_step(cfg)


def test_missing_wandb_is_refused_before_any_work(tiny_overrides, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name)
    )
    run_dir = tmp_path / "run"
    cfg = load_experiment(None, tiny_overrides + [f"run.dir={run_dir}", "run.wandb_project=p"])
    with pytest.raises(MissingDependency, match=r"pip install -e '\.\[wandb\]'"):
        Trainer(cfg, show_progress=False, log=lambda _: None)
    assert not run_dir.exists()


def _wandb_records(path):
    """The records of an offline run's .wandb file (a LevelDB-style log of protobuf Records:
    7-byte file header, 32 KiB blocks, chunks with a 7-byte header of crc, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""
        elif kind == 0:  # zero padding up to the end of the block
            pos += block - pos % block if pos % block else 0


def test_wandb_offline_logs_the_same_scalars_and_the_config(tiny_overrides, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    wandb_dir = tmp_path / "wandb_files"
    wandb_dir.mkdir()
    for key, value in dict(
        WANDB_MODE="offline", WANDB_DIR=str(wandb_dir), WANDB_SILENT="true", WANDB_CONSOLE="off"
    ).items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    overrides = tiny_overrides + [
        f"run.dir={run_dir}",
        "train.steps=3",
        "run.wandb_project=jaxformer-test",
        "run.wandb_name=tiny",
    ]
    logs = []
    trainer = _trainer(overrides, logs)
    try:
        trainer.run()
    finally:
        trainer.close()
    assert any(line.startswith("[wandb] project jaxformer-test") for line in logs), logs

    files = glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    history, config, run_name = {}, {}, None
    for record in _wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            step = record.history.step.num
            items = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            history.setdefault(step, {}).update(items)
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "run":
            run_name = record.run.display_name
    assert run_name == "tiny"
    assert config["train"]["steps"] == 3 and config["model"]["preset"] == "gpt-tiny"

    expected = {}
    for record in read_metrics(str(run_dir)):
        split, step = record["split"], record["step"]
        keys = {f"{split}/{k}" for k in record if k not in ("step", "split")}
        expected.setdefault(step, set()).update(keys)
    assert expected and set(expected) == set(history)
    for step, keys in expected.items():
        assert keys <= set(history[step]), (step, keys - set(history[step]))
        loss = next(r for r in read_metrics(str(run_dir)) if r["step"] == step)["loss"]
        assert math.isclose(float(history[step]["train/loss"]), loss, rel_tol=1e-6)
    # A resumed run directory goes on logging into the same W&B run.
    with open(run_dir / "wandb_run_id") as f:
        assert os.path.basename(files[0]) == f"run-{f.read().strip()}.wandb"
