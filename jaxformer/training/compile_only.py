"""Ahead-of-time compile of the train step for a TPU topology, on any host: per-chip memory, fit."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import time
from collections.abc import Iterator
from typing import Any, Optional

import jax
import numpy as np

from jaxformer import sharding as shard_lib
from jaxformer.data.objectives import SpecialIds
from jaxformer.data.pipeline import make_batcher
from jaxformer.data.token_store import ArrayTokens
from jaxformer.models import flops as flops_lib
from jaxformer.training import state as state_lib
from jaxformer.training.cli import MissingDependency
from jaxformer.training.config import ExperimentConfig
from jaxformer.training.pretraining import Pretraining
from jaxformer.training.state import check_batch_size

GiB = 1 << 30

# generation -> (libtpu's name, chip config, HBM per device that XLA may use).
# "megacore" gives one device per v4 chip, as JAX on a real v4 does (the default config gives one
# per TensorCore, which mesh_utils refuses). The HBM figures are the "available HBM" that libtpu
# itself prints when a compile runs out of memory (jax[tpu]==0.10.2); the device objects of a
# compile-only topology expose no memory size. v7x exposes each of a chip's two dies as a device.
GENERATIONS: dict[str, tuple[str, str, int]] = {
    "v4": ("v4", "megacore", int(30.75 * GiB)),
    "v5e": ("v5e", "default", int(15.75 * GiB)),
    "v5p": ("v5p", "default", int(95.74 * GiB)),
    "v6e": ("v6e", "default", int(31.25 * GiB)),
    "v7x": ("tpu7x", "default", int(94.75 * GiB)),
}
# Names people use for the same chips (GCP accelerator types, marketing names); libtpu rejects them.
ALIASES = {
    "v5litepod": "v5e",
    "v5lite": "v5e",
    "v5": "v5p",
    "v6litepod": "v6e",
    "v6lite": "v6e",
    "trillium": "v6e",
    "tpu7x": "v7x",
}
TOPOLOGY_FORMS = "v5e:2x2, v5e:4x4, v5p:2x2x1, v5p:4x4x4, v4:2x2x1, v6e:2x2, v6e:4x4, v7x:2x2x1"
_TOPOLOGY = re.compile(r"^([a-z0-9]+)[:=_]((?:\d+x)*\d+)$")
_SIZE = r"([\d.]+)\s*([KMGT]i?B?|B)"


class TopologyError(ValueError):
    """A topology name libtpu cannot build (a user error: exit status 2)."""


class LibtpuMissingError(MissingDependency):
    """libtpu, which compiles for TPUs on any host, is not installed."""


def parse_topology(topology: str) -> tuple[str, str, str, int]:
    """'v5e:4x4' -> (generation, libtpu topology name, chip config, usable HBM bytes per device)."""
    match = _TOPOLOGY.match(topology.strip().lower())
    generation = match and ALIASES.get(match.group(1), match.group(1))
    if not match or generation not in GENERATIONS:
        raise TopologyError(
            f"unknown TPU topology {topology!r}: use GENERATION:SHAPE with GENERATION one of "
            f"{', '.join(GENERATIONS)} (aliases {', '.join(ALIASES)}) and SHAPE the chip grid, "
            f"e.g. {TOPOLOGY_FORMS}"
        )
    name, chip_config, hbm = GENERATIONS[generation]
    return generation, f"{name}:{match.group(2)}", chip_config, hbm


@contextlib.contextmanager
def _libtpu_start_env() -> Iterator[None]:
    # Placeholders for libtpu's start-up off a TPU VM, removed again afterwards:
    # - ALLOW_MULTIPLE_LIBTPU_LOAD: any other JAX process on this host that found libtpu holds
    #   /tmp/libtpu_lockfile; a compile-only client touches no chip, so sharing is safe.
    # - TPU_ACCELERATOR_TYPE, TPU_WORKER_HOSTNAMES: without them libtpu logs alarming warnings;
    #   they change no topology (checked: same devices and hosts either way), and the hostnames
    #   must not stay set: sharding.maybe_initialize_distributed reads them as "multi-host".
    added = {
        k: v
        for k, v in (
            ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
            ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
            ("TPU_WORKER_HOSTNAMES", "localhost"),
        )
        if k not in os.environ
    }
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextlib.contextmanager
def without_persistent_cache() -> Iterator[None]:
    """Compiles inside skip jax's persistent compilation cache: an executable compiled for a
    compile-only TPU topology is written there but cannot be read back (no TPU client)."""
    from jax._src import compilation_cache  # its use is memoised; reset_cache re-reads the flag

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def topology_devices(topology: str, slices: int = 1) -> list[jax.Device]:
    """Compile-only devices of `slices` copies of a TPU topology (no TPU needed)."""
    _, name, chip_config, _ = parse_topology(topology)
    if slices < 1:
        raise TopologyError(f"--slices must be >= 1, got {slices}")
    if importlib.util.find_spec("libtpu") is None:
        raise LibtpuMissingError(
            "compiling for a TPU topology needs libtpu: pip install -e '.[tpu]'"
        )
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask off a TPU VM
    from jax.experimental import topologies

    kwargs = {"num_slices": slices} if slices > 1 else {}  # libtpu's multi-slice argument
    try:
        with _libtpu_start_env():
            desc = topologies.get_topology_desc(
                platform="tpu", topology_name=name, chip_config_name=chip_config, **kwargs
            )
    except jax.errors.JaxRuntimeError as err:
        if "INVALID_ARGUMENT" not in str(err) and "NOT_FOUND" not in str(err):
            raise
        raise TopologyError(
            f"libtpu rejects topology {topology!r} ({name}): "
            f"{str(err).splitlines()[0]}; valid forms: {TOPOLOGY_FORMS}"
        ) from None
    return list(desc.devices)


def vocab_size_of(cfg: ExperimentConfig) -> int:
    """The vocabulary the trainer uses: the tokenizer's (tokenizer_path's, else data.vocab_size)."""
    # Trainer.prepare replaces model.vocab_size by the tokenizer's size, so the preset's is unused.
    if cfg.data.tokenizer_path:
        from jaxformer.data.tokenizer import load_tokenizer_file

        return load_tokenizer_file(cfg.data.tokenizer_path).vocab_size
    return cfg.data.vocab_size


def abstract_batch(
    cfg: ExperimentConfig, mesh: jax.sharding.Mesh
) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the trainer feeds, as shapes: one row made by the real objective, scaled."""
    # Running the real batcher on a synthetic corpus keeps keys, lengths and dtypes in step with
    # jaxformer.data without a dataset; one row is enough, so a huge batch costs nothing here.
    vocab = vocab_size_of(cfg)
    if vocab < 110:
        raise ValueError(f"vocab_size={vocab} is too small for the special ids and 100 sentinels")
    special = SpecialIds(
        vocab_size=vocab, pad=0, eos=1, mask=2, sentinels=tuple(range(vocab - 100, vocab))
    )
    data = dataclasses.replace(cfg.data, batch_size=1)
    tokens = (3 + np.arange(4 * cfg.data.seq_len + 8) % (vocab - 103)).astype(np.int32)
    batcher = make_batcher(
        data, ArrayTokens(tokens, np.array([0, len(tokens)])), special, 0, cfg.objective
    )
    row = batcher.batch(0)
    return {
        k: jax.ShapeDtypeStruct(
            (cfg.data.batch_size, *v.shape[1:]),
            v.dtype,
            sharding=(shard_lib.batch_sharding(mesh, v.ndim, cfg.mesh.rules)),
        )
        for k, v in row.items()
    }


def parse_oom(message: str) -> tuple[Optional[int], Optional[int]]:
    """(bytes required, bytes available) from XLA's RESOURCE_EXHAUSTED message, where it says."""

    def size(number: str, unit: str) -> int:
        return int(float(number) * 1024 ** "BKMGT".index(unit[0]))

    for pattern in (
        rf"\({_SIZE}\) exceeds available HBM \({_SIZE}\)",  # HLO temporaries
        rf"Used {_SIZE} of {_SIZE} hbm",
    ):  # program + arguments
        found = re.search(pattern, message)
        if found:
            return size(*found.group(1, 2)), size(*found.group(3, 4))
    found = re.search(rf"Total hbm usage >= {_SIZE}", message)
    return (size(*found.group(1, 2)) if found else None), None


def _bytes_per_chip(tree: Any) -> int:
    """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )


def _suggestions(cfg: ExperimentConfig, mesh: jax.sharding.Mesh) -> list[str]:
    # The knobs that shrink per-chip memory, cheapest first.
    chips, tips = mesh.devices.size, []
    if mesh.shape["fsdp"] < chips // mesh.shape["tensor"]:
        tips.append(
            f"shard parameters and optimizer state over more chips: "
            f"mesh.shape=[1,-1,{mesh.shape['tensor']}]"
        )
    if cfg.model.remat != "full":
        tips.append("recompute activations in the backward pass: model.remat=full")
    rows = cfg.data.batch_size // shard_lib.batch_shards(mesh, cfg.mesh.rules)
    if rows > 1:
        tips.append(
            f"fewer rows per chip ({rows} now): data.batch_size="
            f"{cfg.data.batch_size // 2} or optimizer.grad_accum_steps="
            f"{cfg.optimizer.grad_accum_steps * 2}"
        )
    if cfg.model.attention_impl == "plain":
        tips.append(
            "attention without [batch, heads, length, length] scores: "
            "model.attention_impl=auto (splash on TPU) or chunked"
        )
    if cfg.model.dtype == "float32":
        tips.append("compute in bfloat16: model.dtype=bfloat16")
    if cfg.optimizer.name == "adamw":
        tips.append("factored second moments: optimizer.name=adafactor")
    return tips


def abstract_train_step(
    cfg: ExperimentConfig, mesh: jax.sharding.Mesh
) -> tuple[ExperimentConfig, Any, tuple, int]:
    """(cfg with the tokenizer's vocabulary, the Trainer's jitted train step, its arguments as
    sharded shapes, the parameter count): what `train.py` would run on `mesh`, built by the
    same builder."""
    check_batch_size(cfg.data.batch_size, cfg.optimizer.grad_accum_steps, mesh, cfg.mesh.rules)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab_size_of(cfg))
    model_cfg.check_length(cfg.data.seq_len, "data.seq_len")
    cfg = dataclasses.replace(cfg, model=model_cfg)
    workload = Pretraining()  # the workload train.py runs; only its optimizer is asked for
    trainable = workload.trainable(cfg)
    graphdef, state, shardings, num_params = state_lib.abstract_state(
        model_cfg, workload.optimizer(cfg), mesh, cfg.mesh.rules, cfg.train.seed, trainable
    )
    step = state_lib.build_train_step(
        graphdef, shardings, cfg.train, cfg.optimizer, mesh, cfg.mesh.rules, trainable
    )
    batch = abstract_batch(cfg, mesh)
    return cfg, step, state_lib.step_arguments(state, batch, cfg.train), num_params


def lower_train_step(cfg: ExperimentConfig, mesh: jax.sharding.Mesh) -> jax.stages.Lowered:
    """The Trainer's train step for `cfg`, lowered for `mesh` (any devices) without running it."""
    _, step, args, _ = abstract_train_step(cfg, mesh)
    with jax.set_mesh(mesh):
        return step.lower(*args)


def compile_train_step(
    cfg: ExperimentConfig, topology: str, slices: Optional[int] = None
) -> dict[str, Any]:
    """Lowers and compiles the trainer's train step for `slices` (default: mesh.slices) copies of a
    TPU topology; returns a report dict."""
    generation, name, _, hbm = parse_topology(topology)
    slices = cfg.mesh.slices if slices is None else slices
    devices = topology_devices(topology, slices)
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, slices=slices))
    mesh = shard_lib.make_mesh(cfg.mesh, devices)  # the trainer's mesh (hybrid across slices)
    cfg, step, args, num_params = abstract_train_step(cfg, mesh)
    model_cfg, (state, batch) = cfg.model, args[:2]
    target_len = cfg.data.target_len if model_cfg.family == "encoder_decoder" else 0
    report: dict[str, Any] = dict(
        topology=name,
        generation=generation,
        slices=slices,
        chips=len(devices),
        chip_kind=devices[0].device_kind,
        mesh=dict(mesh.shape),
        model=model_cfg.preset or "",
        family=model_cfg.family,
        params=num_params,
        vocab_size=model_cfg.vocab_size,
        batch={k: list(v.shape) for k, v in batch.items()},
        rows_per_chip=cfg.data.batch_size // shard_lib.batch_shards(mesh, cfg.mesh.rules),
        model_flops_per_step=flops_lib.model_flops_per_step(
            model_cfg, cfg.data.batch_size, cfg.data.seq_len, target_len
        ),
        input_bytes=_bytes_per_chip((state, batch)),
        hbm_bytes=hbm,
        hbm_source=f"XLA's usable HBM per {generation} device (libtpu table)",
    )
    start = time.perf_counter()
    # Under the mesh, code that asks which platform it targets (attention "auto" choosing the
    # splash kernel: attention_kernels.current_platform) sees a TPU, as it would on a TPU host.
    with jax.set_mesh(mesh):
        lowered = step.lower(*args)
    report["lower_seconds"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    try:
        with without_persistent_cache():
            compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        required, available = parse_oom(str(err))
        if required is not None and "temporaries" in str(err):
            # That figure counts temporaries only; the state and batch (outputs reuse the donated
            # state) come on top.
            required += report["input_bytes"]
        report.update(
            compile_seconds=round(time.perf_counter() - start, 2),
            fits=False,
            per_chip_bytes=required,
            hbm_bytes=available or hbm,
            error=str(err).strip().splitlines()[0][:500],
            suggestions=_suggestions(cfg, mesh),
        )
        return report
    report["compile_seconds"] = round(time.perf_counter() - start, 2)
    report["largest_buffers"] = largest_buffers(compiled.as_text())
    mem = compiled.memory_analysis()
    memory = dict(
        argument_bytes=mem.argument_size_in_bytes,
        output_bytes=mem.output_size_in_bytes,
        temp_bytes=mem.temp_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes,
        code_bytes=mem.generated_code_size_in_bytes,
        # Host memory: remat="offload_dots" keeps saved activations there.
        host_temp_bytes=getattr(mem, "host_temp_size_in_bytes", 0),
    )
    # Donated state is both an argument and an output: count its buffers once.
    total = (
        memory["argument_bytes"]
        + memory["output_bytes"]
        + memory["temp_bytes"]
        - memory["alias_bytes"]
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list of one dict in old jax
    # Per device, after partitioning; a while loop (scanned layers) counts its body once.
    report.update(
        memory,
        per_chip_bytes=total,
        peak_bytes=getattr(mem, "peak_memory_in_bytes", None),
        xla_flops_per_chip=float((cost or {}).get("flops", 0.0)),
        fits=total + memory["code_bytes"] <= hbm,
    )
    if not report["fits"]:
        report["suggestions"] = _suggestions(cfg, mesh)
    return report


_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
}
_HLO_ARRAY = re.compile(rf"\b({'|'.join(_DTYPE_BYTES)})\[([\d,]+)\]")


def largest_buffers(hlo_text: str, top: int = 8) -> list[tuple[str, int]]:
    """The `top` largest array shapes in a compiled (per-chip) HLO program, with their bytes:
    what to look at first when a step does not fit."""
    sizes = {
        f"{dtype}[{dims}]": math.prod(int(d) for d in dims.split(",")) * _DTYPE_BYTES[dtype]
        for dtype, dims in set(_HLO_ARRAY.findall(hlo_text))
    }
    return sorted(sizes.items(), key=lambda kv: -kv[1])[:top]


def _gib(n: Optional[float]) -> str:
    return "?" if n is None else f"{n / GiB:.2f} GiB"


def format_report(report: dict[str, Any]) -> str:
    """A few human lines: where, what, per-chip memory against HBM, FLOPs, the verdict."""
    r = report
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    shapes = ", ".join(
        f"{k} {v}" for k, v in r["batch"].items() if k in ("inputs", "encoder_inputs", "targets")
    )
    lines = [
        f"[compile-only] {r['topology']} x {r['slices']} slice(s): {r['chips']} x "
        f"{r['chip_kind']}, mesh {mesh}",
        f"  model {r['model'] or r['family']} ({r['params'] / 1e6:.1f}M params, vocab "
        f"{r['vocab_size']}); batch {shapes}; {r['rows_per_chip']:g} rows per chip",
    ]
    if "argument_bytes" in r:
        lines.append(
            f"  per chip: {_gib(r['per_chip_bytes'])} of {_gib(r['hbm_bytes'])} HBM "
            f"(arguments {_gib(r['argument_bytes'])}, outputs {_gib(r['output_bytes'])}, "
            f"temporaries {_gib(r['temp_bytes'])}, aliased {_gib(r['alias_bytes'])}, "
            f"code {_gib(r['code_bytes'])})"
        )
        # XLA counts a scanned layer's body once and Pallas kernels not at all: a lower bound.
        lines.append(
            f"  FLOPs per step: model {r['model_flops_per_step']:.3e} on all chips; "
            f"XLA's count {r['xla_flops_per_chip']:.3e} per chip (scan bodies once)"
        )
    if r.get("largest_buffers"):
        lines.append(
            "  largest arrays per chip: "
            + ", ".join(
                f"{shape} {size / 2**20:.0f} MiB" for shape, size in r["largest_buffers"][:4]
            )
        )
    lines.append(
        f"  lowered in {r['lower_seconds']:.1f} s, compiled in {r['compile_seconds']:.1f} s"
    )
    if r["fits"]:
        lines.append("  fits: yes")
    else:
        lines.append(
            f"  fits: NO, needs about {_gib(r['per_chip_bytes'])} per chip of "
            f"{_gib(r['hbm_bytes'])}" + (f": {r['error']}" if r.get("error") else "")
        )
        lines += [f"  try: {tip}" for tip in r.get("suggestions", [])]
    return "\n".join(lines)
