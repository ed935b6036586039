"""python -m jaxformer.bench finetune-memory: the memory a fine-tuning step needs, before renting a
card, for full fine-tuning, LoRA, and QLoRA (int8, NF4) of a preset.

Nothing the size of the model is allocated: the (model, optimizer) pair is traced abstractly
(training.state.abstract_state, the LoRA wrapping applied as `adapt`), and the train step the
trainer runs (training.state.build_train_step) is compiled for one device; its peak comes from
XLA's memory analysis (arguments + outputs + temporaries - aliased). Which compiler: by default
this machine's default backend (on a CPU host, XLA's CPU compiler, which upcasts bfloat16 matmuls
to float32 and so holds float32 copies of the frozen weights: an upper estimate for an
accelerator); with `--topology` (e.g. v5p:2x2x1) libtpu compiles the same step ahead of time for
one chip of that TPU topology, on any host: an accelerator compiler's figure. The report's
`compiler` says which. The step runs in bfloat16 compute with full remat (the single-GPU config,
configs/finetune/lora_gpu.yaml); LoRA: rank 16, alpha 32, all-linear, base in bfloat16 (or
quantized); full: float32 parameters and AdamW moments.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Optional

import jax
import numpy as np
from flax import nnx

METHODS = ("full", "lora", "qlora-int8", "qlora-nf4")
CARDS_GIB = (24, 40, 80)


def _bytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def experiment(preset: str, seq_len: int, batch: int, overrides: tuple[str, ...] = ()) -> Any:
    """The pretraining-shaped experiment whose step is measured (causal LM loss on S tokens)."""
    from jaxformer import models
    from jaxformer.training.config import load_experiment

    vocab = models.preset(preset).vocab_size
    return load_experiment(
        None,
        [
            f"model.preset={preset}",
            f"data.seq_len={seq_len}",
            f"data.batch_size={batch}",
            f"data.vocab_size={vocab}",
            "model.dtype=bfloat16",
            "model.remat=full",
            *overrides,
        ],
    )


def lora_config(method: str, rank: int = 16) -> Any:
    """The LoraConfig of a method (None for full fine-tuning)."""
    from jaxformer import lora

    if method not in METHODS:
        raise ValueError(f"--method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "full":
        return None
    quantize = {"lora": "none", "qlora-int8": "int8", "qlora-nf4": "nf4"}[method]
    return lora.LoraConfig(targets=("all-linear",), rank=rank, alpha=2.0 * rank, quantize=quantize)


def measure(
    preset: str,
    method: str,
    seq_len: int,
    batch: int,
    *,
    rank: int = 16,
    overrides: tuple[str, ...] = (),
    compile_step: bool = True,
    topology: Optional[str] = None,
) -> dict[str, Any]:
    """The report: trainable parameters, parameter / optimizer / gradient bytes, and (when
    compiled) XLA's argument, temporary and peak bytes of the train step on one device: one of
    this machine's default backend, or (`topology`, e.g. 'v5p:2x2x1') one chip of that TPU
    topology, compiled ahead of time by libtpu."""
    from jaxformer import lora, models
    from jaxformer import sharding as shard_lib
    from jaxformer.training import compile_only
    from jaxformer.training import state as state_lib
    from jaxformer.training.pretraining import Pretraining

    cfg = experiment(preset, seq_len, batch, overrides)
    cfg.model.check_length(seq_len, "--seq-len")
    lcfg = lora_config(method, rank)
    device = compile_only.topology_devices(topology)[0] if topology else jax.devices()[0]
    mesh = shard_lib.make_mesh(shard_lib.MeshConfig(), devices=[device])
    workload = Pretraining()
    trainable = nnx.Param if lcfg is None else lora.trainable_filter(lcfg)
    adapt = None if lcfg is None else (lambda m: lora.apply_lora(m, lcfg, seed=cfg.train.seed))
    graphdef, state, shardings, _ = state_lib.abstract_state(
        cfg.model, workload.optimizer(cfg), mesh, cfg.mesh.rules, cfg.train.seed, trainable, adapt
    )
    model_state, opt_state = state[0], state[1]
    params = nnx.filter_state(model_state, nnx.Not(nnx.RngState))
    trained = nnx.filter_state(model_state, trainable)
    n_trainable = int(sum(np.prod(x.shape) for x in jax.tree.leaves(trained)))
    base = nnx.eval_shape(lambda: models.create(cfg.model, rngs=nnx.Rngs(0)))
    n_total = int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(base, nnx.Param))))
    report: dict[str, Any] = dict(
        command="finetune-memory",
        preset=preset,
        method=method,
        seq_len=seq_len,
        batch=batch,
        lora_rank=None if lcfg is None else rank,
        device=device.device_kind,
        platform=device.platform,
        compiler=_compiler(device, topology),
        params=n_total,
        trainable_params=n_trainable,
        param_bytes=_bytes(params),
        optimizer_bytes=_bytes(opt_state),
        gradient_bytes=_bytes(trained),  # float32, one per trainable parameter
    )
    if not compile_step:
        return report
    step = state_lib.build_train_step(
        graphdef, shardings, cfg.train, cfg.optimizer, mesh, cfg.mesh.rules, trainable
    )
    args = state_lib.step_arguments(state, compile_only.abstract_batch(cfg, mesh), cfg.train)
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh), _no_cache(topology):
            compiled = step.lower(*args).compile()
    except jax.errors.JaxRuntimeError as err:
        if not topology or "RESOURCE_EXHAUSTED" not in str(err):
            raise
        # More than the chip's HBM: libtpu stops before a memory analysis, saying how much.
        needed, _ = compile_only.parse_oom(str(err))
        if needed is not None and "temporaries" in str(err):
            needed += report["param_bytes"] + report["optimizer_bytes"]  # temporaries only
        report.update(
            compile_seconds=round(time.perf_counter() - start, 1),
            hbm_bytes=compile_only.parse_topology(topology)[3],
            peak_bytes=needed,
            error=str(err).strip().splitlines()[0][:300],
            fits_gib={str(g): bool(needed and needed <= g * 2**30) for g in CARDS_GIB},
        )
        return report
    mem = compiled.memory_analysis()
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    report.update(
        compile_seconds=round(time.perf_counter() - start, 1),
        argument_bytes=int(mem.argument_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        # Temporaries less the gradients: saved activations and workspace (an estimate).
        activation_bytes=int(max(mem.temp_size_in_bytes - report["gradient_bytes"], 0)),
        peak_bytes=int(peak),
        fits_gib={str(g): bool(peak <= g * 2**30) for g in CARDS_GIB},
        # The largest array shapes in the compiled program (arguments included): where to look.
        largest_arrays=compile_only.largest_buffers(compiled.as_text(), 6),
    )
    return report


def _compiler(device: Any, topology: Optional[str]) -> str:
    """Which compiler's memory analysis the figures are, in words."""
    from jaxformer.training import compile_only

    if topology:
        name = compile_only.parse_topology(topology)[1]
        return f"XLA TPU (libtpu), ahead of time for one {device.device_kind} chip of {name}"
    if device.platform == "cpu":
        return "XLA CPU (this host; bfloat16 matmuls upcast to float32)"
    return f"XLA {device.platform.upper()} ({device.device_kind})"


def _no_cache(topology: Optional[str]) -> Any:
    """An executable compiled for a compile-only topology cannot go in jax's persistent cache."""
    from jaxformer.training import compile_only

    return compile_only.without_persistent_cache() if topology else contextlib.nullcontext()


def _gib(n: Optional[float]) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"


def describe(r: dict[str, Any]) -> str:
    """One human-readable paragraph of a report."""
    lines = [
        f"[bench finetune-memory] {r['preset']} {r['method']} seq {r['seq_len']} batch "
        f"{r['batch']} on {r['device']} ({r['platform']})",
        f"  base params {r['params'] / 1e6:,.2f}M, trainable {r['trainable_params'] / 1e6:,.2f}M",
        f"  parameters {_gib(r['param_bytes'])}, optimizer {_gib(r['optimizer_bytes'])}, "
        f"gradients {_gib(r['gradient_bytes'])}",
    ]
    if "peak_bytes" in r:
        fits = ", ".join(f"{g} GiB {'yes' if ok else 'no'}" for g, ok in r["fits_gib"].items())
        lines.append(f"  compiler: {r['compiler']}")
        if "error" in r:
            lines.append(
                f"  compiled step ({r['compile_seconds']} s): does not fit the chip's "
                f"{_gib(r['hbm_bytes'])}; needs about {_gib(r['peak_bytes'])}; fits: {fits}"
            )
        else:
            lines.append(
                f"  compiled step ({r['compile_seconds']} s): temporaries {_gib(r['temp_bytes'])}"
                f" (activations+workspace {_gib(r['activation_bytes'])}), peak "
                f"{_gib(r['peak_bytes'])}; fits: {fits}"
            )
            lines.append(
                "  largest arrays in the program (arguments too): "
                + ", ".join(f"{shape} {_gib(size)}" for shape, size in r["largest_arrays"][:4])
            )
    return "\n".join(lines)


def add_parser(sub) -> None:
    """Registers `finetune-memory` on the bench command line."""
    p = sub.add_parser("finetune-memory", help="memory of a fine-tuning step (no allocation)")
    p.add_argument("--preset", required=True)
    p.add_argument("--method", choices=METHODS, default="lora")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--no-compile", action="store_true", help="sizes only, no compiled peak")
    p.add_argument(
        "--topology",
        help="compile for one chip of this TPU topology with libtpu, ahead of time on any host "
        "(e.g. v5p:2x2x1, v6e:2x2): an accelerator compiler's figure; default: this machine's "
        "default backend (on a CPU host, the CPU compiler's)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")


def main(args) -> int:
    import json

    from jaxformer.training.compile_only import LibtpuMissingError

    try:
        report = measure(
            args.preset,
            args.method,
            args.seq_len,
            args.batch,
            rank=args.rank,
            overrides=tuple(args.overrides),
            compile_step=not args.no_compile,
            topology=args.topology,
        )
    except LibtpuMissingError as err:
        print(f"[bench finetune-memory] error: {err}", flush=True)
        return 2
    print(describe(report), flush=True)
    if args.json:
        print(json.dumps(report), flush=True)
    return 0


__all__ = ["measure", "describe", "METHODS", "experiment", "lora_config"]
