"""`python -m jaxformer.bench train`: times the train step that `train.py` runs.

The step is built by `jaxformer.training.state` (the builder of the Trainer and `--compile-only`)
from an `ExperimentConfig`, with the Pretraining workload's optimizer (AdamW unless the config
says otherwise), loss chunking and guards, on a batch made by the real objective from a synthetic
token stream. One warm-up step, then `steps` timed steps, each waited for; the median is reported.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from typing import Any, Optional

import jax
import numpy as np

from jaxformer import sharding as shard_lib
from jaxformer.bench import peak as peak_lib
from jaxformer.models import flops as flops_lib
from jaxformer.models.config import PRESETS
from jaxformer.models.config import preset as named_preset
from jaxformer.training import state as state_lib
from jaxformer.training.config import ExperimentConfig, load_experiment
from jaxformer.training.optimizer import make_optimizer

# The model of `python train.py` (configs/default.yaml): what runs without --preset or sizes.
# configs/default.yaml's model (its layers unrolled: faster on CPUs at this depth).
DEFAULT_RUN = dict(
    d_model=128, num_layers=4, num_heads=4, d_ff=512, seq_len=128, vocab=2048, scan_layers=False
)


def default_seq_len(preset: Optional[str]) -> int:
    """The sequence length benchmarked when none is given: the default run's, or the preset's
    table length up to 2048."""
    if preset is None:
        return DEFAULT_RUN["seq_len"]
    return min(named_preset(preset).max_len, 2048)  # an unknown name: ValueError naming it


def experiment(
    preset: Optional[str] = None,
    *,
    layers: Optional[int] = None,
    d_model: Optional[int] = None,
    heads: Optional[int] = None,
    d_ff: Optional[int] = None,
    seq_len: Optional[int] = None,
    target_len: Optional[int] = None,
    vocab: Optional[int] = None,
    batch: int = 32,
    dtype: Optional[str] = None,
    remat: Optional[str] = None,
    attention: Optional[str] = None,
    scan: Optional[bool] = None,
    grad_accum: Optional[int] = None,
    loss_chunk: Optional[int] = None,
    overrides: Sequence[str] = (),
) -> ExperimentConfig:
    """The ExperimentConfig benchmarked: a preset (or the default run's GPT) with the given sizes,
    checked as `train.py` checks its config (errors name the option)."""
    base = preset or "gpt-tiny"
    if preset:
        named_preset(preset)  # an unknown name: ValueError listing the valid ones
    sizes = {} if preset else dict(DEFAULT_RUN)
    given = dict(num_layers=layers, d_model=d_model, num_heads=heads, d_ff=d_ff)
    sizes.update({k: v for k, v in given.items() if v is not None})
    if d_model is not None and d_ff is None and not preset:
        sizes["d_ff"] = 4 * d_model
    seq = seq_len or default_seq_len(preset)
    items = [f"model.preset={base}", f"data.seq_len={seq}", f"data.batch_size={batch}"]
    items += [f"model.{k}={v}" for k, v in sizes.items() if k not in ("seq_len", "vocab")]
    model = PRESETS[base] if base in PRESETS else None
    if model is not None and model.position in ("learned", "sinusoidal") and seq > model.max_len:
        items.append(f"model.max_len={seq}")
    vocab = vocab or (None if preset else DEFAULT_RUN["vocab"])
    # The Trainer takes the vocabulary from the tokenizer (data.vocab_size when it trains one).
    items.append(f"data.vocab_size={vocab or model.vocab_size}")
    if model is not None and model.family == "encoder_decoder":
        items.append(f"data.target_len={target_len or max(seq // 4, 1)}")
    for key, value in (
        ("model.dtype", dtype),
        ("model.remat", remat),
        ("model.attention_impl", attention),
        ("model.scan_layers", None if scan is None else str(scan).lower()),
        ("optimizer.grad_accum_steps", grad_accum),
        ("train.loss_chunk_size", loss_chunk),
    ):
        if value is not None:
            items.append(f"{key}={value}")
    cfg = load_experiment(None, [*items, *overrides])
    if cfg.data.vocab_size < 110:
        raise ValueError(
            f"--vocab {cfg.data.vocab_size} is too small: the objectives need >= 110 ids"
        )
    # As the Trainer does: the model's vocabulary is the tokenizer's (here data.vocab_size).
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, vocab_size=cfg.data.vocab_size)
    )


def synthetic_batch(cfg: ExperimentConfig, rows: Optional[int] = None) -> dict[str, np.ndarray]:
    """A global batch made by the run's own objective (causal/masked LM, span corruption) from a
    synthetic token stream: the keys, shapes and dtypes the Trainer feeds."""
    from jaxformer.data.objectives import SpecialIds
    from jaxformer.data.pipeline import make_batcher
    from jaxformer.data.token_store import ArrayTokens

    vocab = cfg.data.vocab_size
    if vocab < 110:
        raise ValueError(f"--vocab {vocab} is too small: the objectives need >= 110 ids")
    special = SpecialIds(
        vocab_size=vocab, pad=0, eos=1, mask=2, sentinels=tuple(range(vocab - 100, vocab))
    )
    rows = rows or cfg.data.batch_size
    tokens = np.random.default_rng(0).integers(3, vocab - 100, rows * (cfg.data.seq_len + 8) * 2)
    data = dataclasses.replace(cfg.data, batch_size=rows)
    batcher = make_batcher(
        data,
        ArrayTokens(tokens.astype(np.int32), np.array([0, len(tokens)])),
        special,
        0,
        cfg.objective,
    )
    return batcher.batch(0)


def _trained_tokens(cfg: ExperimentConfig) -> tuple[int, int, int]:
    """(tokens per step as the Trainer counts them, length, decoder length)."""
    dec = cfg.data.target_len if cfg.model.family == "encoder_decoder" else 0
    return cfg.data.batch_size * (dec or cfg.data.seq_len), cfg.data.seq_len, dec


def _memory(compiled: Any) -> dict[str, Optional[int]]:
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends have none
        mem = None
    if mem is None:
        return dict(peak_memory_bytes=None)
    total = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    # XLA's own peak where it has one (TPU/GPU); on CPU it undercounts, so never below the sum.
    peak = max(getattr(mem, "peak_memory_in_bytes", None) or 0, total)
    return dict(peak_memory_bytes=int(peak), temp_bytes=int(mem.temp_size_in_bytes))


def run(
    cfg: ExperimentConfig,
    steps: int = 10,
    warmup: int = 1,
    peak_flops: Optional[float] = None,
) -> dict[str, Any]:
    """Benchmarks the train step of `cfg`; `steps=0` reports FLOPs and parameters from shapes
    only (nothing the size of the model is allocated). Returns the report dict."""
    model_cfg = cfg.model
    mesh = shard_lib.make_mesh(cfg.mesh)
    rules = cfg.mesh.rules
    state_lib.check_batch_size(cfg.data.batch_size, cfg.optimizer.grad_accum_steps, mesh, rules)
    params = flops_lib.matmul_params(model_cfg, flops_lib.abstract_model(model_cfg))
    tokens, length, dec = _trained_tokens(cfg)
    step_flops = flops_lib.step_flops(model_cfg, params, cfg.data.batch_size, length, dec)
    device = jax.devices()[0]
    report: dict[str, Any] = dict(
        command="train",
        model=model_cfg.preset or "custom",
        family=model_cfg.family,
        layers=model_cfg.num_layers,
        d_model=model_cfg.d_model,
        heads=model_cfg.num_heads,
        d_ff=model_cfg.d_ff,
        vocab=model_cfg.vocab_size,
        seq_len=length,
        target_len=dec or None,
        batch=cfg.data.batch_size,
        dtype=model_cfg.dtype,
        remat=model_cfg.remat,
        attention=model_cfg.attention_impl,
        scan=model_cfg.scan_layers,
        grad_accum=cfg.optimizer.grad_accum_steps,
        loss_chunk=cfg.train.loss_chunk_size,
        optimizer=cfg.optimizer.name,
        params=params.total,
        matmul_params=params.encoder + params.decoder,
        tokens_per_step=tokens,
        model_flops_per_token=step_flops / tokens,
        model_flops_per_step=step_flops,
        device=device.device_kind,
        platform=device.platform,
        devices=jax.device_count(),
        mesh=dict(mesh.shape),
        steps=steps,
    )
    if steps <= 0:
        return report
    trainable = state_lib.TRAINABLE_DEFAULT  # what the Pretraining workload trains
    tx = make_optimizer(cfg.optimizer, cfg.train.steps)  # == Pretraining().optimizer(cfg)
    graphdef, state = state_lib.build_state(model_cfg, tx, mesh, rules, cfg.train.seed, trainable)
    step = state_lib.build_train_step(
        graphdef,
        shard_lib.state_shardings(state, mesh, rules),
        cfg.train,
        cfg.optimizer,
        mesh,
        rules,
        trainable,
    )
    batch = shard_lib.shard_batch(synthetic_batch(cfg), mesh, rules)
    args = state_lib.step_arguments(state, batch, cfg.train)
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    report["compile_seconds"] = time.perf_counter() - start
    report.update(_memory(compiled))

    del args  # the state in it is donated to the first step
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = compiled(*state_lib.step_arguments(state, batch, cfg.train))
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    report["loss"] = float(metrics["loss"])
    seconds = statistics.median(times)
    peak, source = _peak(model_cfg.dtype, peak_flops)
    achieved = step_flops / seconds
    report.update(
        step_seconds=seconds,
        step_seconds_min=min(times),
        step_seconds_max=max(times),
        tokens_per_second=tokens / seconds,
        achieved_flops_per_second=achieved,
        peak_flops_per_second=peak,
        peak_source=source,
        mfu=achieved / peak if peak else None,
    )
    return report


def _peak(dtype: str, given: Optional[float]) -> tuple[float, str]:
    """Peak FLOP/s of everything the step runs on: all accelerators, or this whole CPU host."""
    device = jax.devices()[0]
    if given:
        return given, "given (--peak-flops)"
    flops, source = peak_lib.peak_flops("bfloat16" if dtype == "bfloat16" else "float32", device)
    if device.platform == "cpu":  # simulated CPU devices share one host's cores
        return flops, source
    return flops * jax.device_count(), f"{source} x {jax.device_count()} devices"


def describe(r: dict[str, Any]) -> str:
    """One readable line."""
    shape = (
        f"{r['model']} {r['family']} {r['layers']}x{r['d_model']} h{r['heads']} "
        f"seq {r['seq_len']}{'/' + str(r['target_len']) if r['target_len'] else ''} "
        f"vocab {r['vocab']} batch {r['batch']} {r['dtype']} remat={r['remat']} "
        f"attn={r['attention']} scan={r['scan']}"
    )
    head = f"[bench train] {shape}: {r['params'] / 1e6:.2f}M params, "
    head += f"{r['model_flops_per_token'] / 1e6:.2f} MFLOP/token"
    if "step_seconds" not in r:
        return head + f" ({r['model_flops_per_step']:.3e} FLOP/step; not run: --steps 0)"
    mem = r.get("peak_memory_bytes")
    mfu = "?" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    return (
        head + f"; {r['tokens_per_second']:,.0f} tokens/s, step {1e3 * r['step_seconds']:.1f} ms "
        f"(median of {r['steps']}), {r['achieved_flops_per_second'] / 1e9:.1f} GFLOP/s = MFU "
        f"{mfu} of {r['peak_flops_per_second'] / 1e9:.1f} GFLOP/s ({r['peak_source']}), "
        f"compile {r['compile_seconds']:.1f} s, memory "
        + ("?" if mem is None else f"{mem / 2**20:.1f} MiB")
        + f" on {r['devices']} x {r['device']}"
    )
