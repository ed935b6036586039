"""`python -m jaxformer.bench`: the commands run and their reports agree with themselves and with
hand-computed FLOPs (no timing assertions)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from jaxformer import models
from jaxformer.bench import train as train_lib
from jaxformer.bench.__main__ import main
from jaxformer.models import flops as flops_lib
from jaxformer.training.config import load_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _json_of(capsys) -> dict:
    """The JSON object on the last line of the command's output."""
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_default_shape_is_the_default_run():
    """Without --preset the bench trains the model `python train.py` trains."""
    cfg = train_lib.experiment()
    run = load_experiment(os.path.join(ROOT, "configs", "default.yaml"))
    for key in ("d_model", "num_layers", "num_heads", "d_ff", "family", "position", "mlp"):
        assert getattr(cfg.model, key) == getattr(run.model, key), key
    assert cfg.model.vocab_size == run.data.vocab_size  # the Trainer takes the tokenizer's
    assert (cfg.data.seq_len, cfg.data.batch_size) == (run.data.seq_len, run.data.batch_size)


def test_flops_of_the_default_run_by_hand():
    """6 N (tied embedding once, position table not at all) plus causal attention counted half."""
    d, layers, ff, vocab, seq = 128, 4, 512, 2048, 128
    per_layer = 4 * d * d + 4 * d + 2 * d * ff + ff + d + 4 * d  # attention, MLP, two LayerNorms
    n = vocab * d + layers * per_layer + 2 * d  # + final norm
    expected = 6 * n + 12 * layers * (seq / 2) * d
    cfg = train_lib.experiment()
    assert flops_lib.flops_per_token(cfg.model, seq) == expected
    params = flops_lib.matmul_params(cfg.model, flops_lib.abstract_model(cfg.model))
    assert params.total == n + seq * d  # count_params includes the position table


def test_flops_of_encoder_decoder_and_untied_head_by_hand():
    t5 = models.preset("t5-tiny")  # tied, relative bias, 2 + 2 layers, 4 heads x 16
    p = flops_lib.matmul_params(t5, flops_lib.abstract_model(t5))
    d, ff, hd = 64, 256, 4 * 16
    enc_layer = 4 * d * hd + 2 * d * ff + 2 * d
    dec_layer = 8 * d * hd + 2 * d * ff + 3 * d
    assert p.encoder == 2 * enc_layer + d
    assert p.decoder == 2 * dec_layer + d + 512 * d  # the tied table is the decoder's head
    s, t = 64, 16
    expected = 6 * (p.encoder * s + p.decoder * t)
    expected += 12 * 2 * s * s * hd + 12 * 2 * t * (t / 2) * hd + 12 * 2 * t * s * hd
    assert flops_lib.step_flops(t5, p, 1, s, t) == expected
    llama = models.preset("llama-tiny")
    untied = llama.__class__(**{**llama.__dict__, "tie_embeddings": False})
    tied_n = flops_lib.matmul_params(llama, flops_lib.abstract_model(llama))
    untied_n = flops_lib.matmul_params(untied, flops_lib.abstract_model(untied))
    # An untied model holds one more [vocab, d] table; only its head is multiplied.
    assert untied_n.total == tied_n.total + 512 * 64
    assert untied_n.encoder == tied_n.encoder


def _check_consistent(r: dict) -> None:
    assert r["tokens_per_step"] == r["batch"] * (r["target_len"] or r["seq_len"])
    assert math.isclose(r["tokens_per_second"], r["tokens_per_step"] / r["step_seconds"])
    assert math.isclose(
        r["achieved_flops_per_second"], r["model_flops_per_token"] * r["tokens_per_second"]
    )
    assert math.isclose(r["mfu"], r["achieved_flops_per_second"] / r["peak_flops_per_second"])
    assert r["step_seconds_min"] <= r["step_seconds"] <= r["step_seconds_max"]
    assert r["peak_memory_bytes"] > 0 and r["compile_seconds"] > 0
    assert math.isfinite(r["loss"])


def test_train_decoder_reports_consistent_fields(capsys):
    argv = ["train", "--layers", "2", "--d-model", "32", "--heads", "2", "--seq-len", "32"]
    assert main([*argv, "--vocab", "256", "--batch", "8", "--steps", "2", "--json"]) == 0
    r = _json_of(capsys)
    _check_consistent(r)
    assert (r["layers"], r["d_model"], r["d_ff"], r["vocab"]) == (2, 32, 128, 256)
    assert r["peak_source"].startswith("measured float32 matmul peak")
    assert r["device"] and r["params"] > 0 and r["optimizer"] == "adamw"


def test_train_bfloat16_reports_against_the_bfloat16_peak(capsys):
    # bfloat16 on CPUs takes jaxformer.dense's mixed-precision matmuls: the whole train step
    # (tied head, chunked loss, AdamW) must compile and run with them.
    argv = ["train", "--layers", "2", "--d-model", "32", "--heads", "2", "--seq-len", "32"]
    argv += ["--vocab", "256", "--batch", "8", "--steps", "1", "--dtype", "bfloat16", "--json"]
    assert main(argv) == 0
    r = _json_of(capsys)
    _check_consistent(r)
    assert r["dtype"] == "bfloat16" and math.isfinite(r["loss"])
    assert r["peak_source"].startswith("measured bfloat16 matmul peak")


def test_train_encoder_decoder_counts_target_tokens(capsys):
    argv = ["train", "--preset", "t5-tiny", "--seq-len", "32", "--target-len", "8"]
    assert main([*argv, "--batch", "8", "--steps", "1", "--peak-flops", "1e12", "--json"]) == 0
    r = _json_of(capsys)
    _check_consistent(r)
    assert r["family"] == "encoder_decoder" and r["tokens_per_step"] == 8 * 8
    assert r["peak_source"] == "given (--peak-flops)"


@pytest.mark.parametrize("preset", ["bert-tiny", "llama3-8b"])
def test_steps_zero_reports_flops_without_running(preset, capsys):
    assert main(["train", "--preset", preset, "--steps", "0", "--json"]) == 0
    r = _json_of(capsys)
    assert "step_seconds" not in r and r["params"] > 0
    if preset == "llama3-8b":
        assert abs(r["params"] - 8.03e9) / 8.03e9 < 0.01
        # the untied input table (vocab x d) is gathered, not multiplied
        assert r["matmul_params"] == r["params"] - 128256 * 4096


def test_peak_reports_both_dtypes(capsys):
    assert main(["peak", "--size", "128", "--repeats", "1", "--json"]) == 0
    r = _json_of(capsys)
    assert r["float32_flops_per_second"] > 0 and r["bfloat16_flops_per_second"] > 0
    assert r["float32_flops_per_second"] >= r["float32_median_flops_per_second"]


GENERATE = ["generate", "--layers", "2", "--d-model", "32", "--heads", "2", "--vocab", "256"]


def test_generate_with_and_without_cache_same_tokens(capsys):
    argv = [*GENERATE, "--batch", "2", "--new-tokens", "4", "--repeats", "1", "--json"]
    assert main(argv) == 0
    r = _json_of(capsys)
    impls = {row["impl"] for row in r["rows"]}
    assert {"jaxformer kv-cache", "jaxformer no cache"} <= impls
    for row in r["rows"]:
        assert row["same_tokens"], row
        assert math.isclose(row["tokens_per_second"], row["batch"] * 4 / row["seconds"])


@pytest.mark.slow
def test_generate_beside_hugging_face_same_tokens(capsys):
    """transformers' generate on the to_hf export gives the tokens of the cached decode."""
    if not (importlib.util.find_spec("transformers") and importlib.util.find_spec("torch")):
        pytest.skip("needs the hf extra (transformers, torch)")
    argv = [*GENERATE, "--batch", "2", "--new-tokens", "4", "--repeats", "1", "--no-cache-off"]
    assert main([*argv, "--hf", "--json"]) == 0
    rows = {row["impl"]: row for row in _json_of(capsys)["rows"]}
    assert rows["hf generate (dynamic cache)"]["same_tokens"]


def test_bad_input_names_the_option(capsys):
    assert main(["train", "--preset", "gpt-nope", "--steps", "0"]) == 2
    assert "gpt-nope" in capsys.readouterr().err
    assert main(["train", "--vocab", "50", "--steps", "1"]) == 2
    assert "--vocab 50" in capsys.readouterr().err


def test_bench_imports_no_tfds_or_grain():
    """The GPU script's path (train, peak, generate) runs where only jax/flax/optax/orbax are."""
    code = (
        "import sys, jaxformer.bench.__main__, jaxformer.bench.train, jaxformer.bench.generate;"
        "from jaxformer.bench import train; train.synthetic_batch(train.experiment(batch=2));"
        "print([m for m in sys.modules if m.split('.')[0] in ('tensorflow_datasets', 'grain')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_plan_ranks_candidates_and_writes_the_best(tmp_path, capsys):
    pytest.importorskip("libtpu", reason="plan compiles for TPU topologies with libtpu")
    out = tmp_path / "best.yaml"
    argv = ["plan", "--config", os.path.join(ROOT, "configs", "gpt_tiny.yaml")]
    argv += ["--topology", "v5e:2x2", "--meshes", "4x1x1", "1x4x1", "--max-candidates", "2"]
    argv += ["--remat", "full", "--out", str(out), "--json"]
    # A run of the config to compare with: its first logged row includes compiling.
    run = tmp_path / "run"
    run.mkdir()
    logged = [
        {"step": 20 * i, "split": "train", "step_seconds": s} for i, s in enumerate([9, 2, 4, 3])
    ]
    lines = [json.dumps(row) for row in logged] + ['{"step": 100, "split": "validation"}', '{"ste']
    (run / "metrics.jsonl").write_text("\n".join(lines))
    assert main([*argv, "--measured", str(run)]) == 0
    r = _json_of(capsys)
    rows = r["rows"]
    measured = r["measured"]
    assert measured["measured_step_seconds"] == 3 and measured["logged_rows"] == 3
    assert measured["estimated_step_seconds"] in [row["step_seconds"] for row in rows]
    assert math.isclose(measured["measured_over_estimate"], 3 / measured["estimated_step_seconds"])
    assert len(rows) == 2 and all(row["fits"] for row in rows)
    assert rows[0]["step_seconds"] <= rows[1]["step_seconds"]
    for row in rows:
        assert math.isclose(
            row["step_seconds"],
            row["compute_seconds"] + row["hbm_seconds"] + row["ici_seconds"],
        )
    best = load_experiment(str(out))
    assert list(best.mesh.shape) == rows[0]["candidate"]["mesh.shape"]


def test_plan_grid_keeps_to_splits_a_3d_torus_lays_out(monkeypatch):
    """On v5p:4x4x4 jax builds only meshes whose axes are products of the physical 4 x 4 x 4:
    the default grid tries 4x16x1 and 1x16x4 (2x32x1 and 1x32x2 cannot be laid out), and a
    split that cannot be laid out fails its own row, not the plan."""
    pytest.importorskip("libtpu", reason="plan compiles for TPU topologies with libtpu")
    from jaxformer.bench import plan as plan_lib
    from jaxformer.training import compile_only

    devices = compile_only.topology_devices("v5p:4x4x4")
    cfg = load_experiment(os.path.join(ROOT, "configs", "c4_llama3_8b.yaml"))
    ok = plan_lib.mesh_builds(cfg, devices)
    assert ok((4, 16, 1)) and not ok((2, 32, 1)) and not ok((1, 32, 2))
    meshes = [c.mesh for c in plan_lib.grid(cfg, len(devices), mesh_ok=ok)]
    assert meshes[:3] == [(1, 64, 1), (4, 16, 1), (1, 16, 4)]

    def compile_train_step(trial, topology, slices):
        if tuple(trial.mesh.shape) == (2, 32, 1):
            raise NotImplementedError("Failed to find assignment for logical_axis_index 1")
        return dict(fits=True, per_chip_bytes=1, chip_kind="unknown")

    monkeypatch.setattr(compile_only, "compile_train_step", compile_train_step)
    candidates = [plan_lib.Candidate(m, "full", 1, 512) for m in [(2, 32, 1), (1, 64, 1)]]
    rows = plan_lib.plan(cfg, "v5p:4x4x4", candidates, log=lambda s: None)
    assert [r["candidate"].mesh for r in rows] == [(1, 64, 1), (2, 32, 1)]
    assert "logical_axis_index" in rows[1]["error"]


def test_plan_measured_run_without_metrics_is_refused_before_compiling(tmp_path, capsys):
    argv = ["plan", "--config", os.path.join(ROOT, "configs", "gpt_tiny.yaml")]
    assert main([*argv, "--topology", "v5e:2x2", "--measured", str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


def test_default_shape_is_the_default_runs_config():
    """`bench train` without sizes times configs/default.yaml's model and batch (kept by hand in
    DEFAULT_RUN, since an installed package has no configs/ directory)."""
    from jaxformer.training.config import load_experiment

    run = load_experiment("configs/default.yaml", [])
    bench = train_lib.experiment()
    fields = ("d_model", "num_layers", "num_heads", "d_ff", "scan_layers", "family", "mlp")
    assert {f: getattr(bench.model, f) for f in fields} == {
        f: getattr(run.model, f) for f in fields
    }
    assert (bench.data.seq_len, bench.data.vocab_size, bench.data.batch_size) == (
        run.data.seq_len,
        run.data.vocab_size,
        run.data.batch_size,
    )
