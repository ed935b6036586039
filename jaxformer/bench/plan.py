"""`python -m jaxformer.bench plan`: which mesh split, remat policy, micro-batching and loss chunk
to launch a config with on a TPU topology, from ahead-of-time compiles on this host.

Each candidate is the config with a few keys changed, compiled for the topology by
`jaxformer.training.compile_only.compile_train_step` (the Trainer's own step; libtpu, no TPU): it
fits or not, and its per-chip memory is XLA's. Its step time is then estimated, as a roofline with
nothing overlapped (the figure ranked; `overlapped_step_seconds`, the max of the three, is the
other end):

    step ≈ FLOPs / peak FLOP/s + HBM bytes / HBM bandwidth + ICI bytes / ICI bandwidth  per chip

- FLOPs: the model FLOPs of `jaxformer.models.flops` (6 N + attention) divided over the chips,
  × 4/3 with `remat=full` (the blocks' forward pass runs twice: 8 N instead of 6 N).
- HBM bytes: the (gathered) weights streamed through the matmuls, in the compute dtype, once per
  pass (forward, backward, and the recomputed forward under remat=full) and micro-batch, divided
  by the tensor axis; plus the optimizer's update (read/write of float32 parameters, two AdamW
  moments and the gradient, 28 bytes per parameter held). Activation traffic is not counted.
- ICI bytes (ring collectives, (n-1)/n of the data moved): FSDP all-gathers the weights in the
  compute dtype per pass and reduce-scatters float32 gradients per micro-batch; the data axis
  all-reduces the gradients once per step; the tensor axis all-reduces [tokens, d_model]
  activations twice per layer and pass. Multi-slice (DCN) traffic is not modelled.

XLA's own `cost_analysis()` FLOPs are shown too, but not used: XLA counts the body of a while loop
once, so a scanned stack (and gradient accumulation) reads as about one layer (one micro-batch)
of work. MFU is the model FLOPs over the estimate, against the datasheet peak (jaxformer.bench.peak).
Estimates rank candidates; when a real run exists, compare its step time (the bench, or
metrics.jsonl) with the estimate.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

from jaxformer.bench import measured as measured_lib
from jaxformer.bench import peak as peak_lib

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One point of the grid: the keys changed from the config."""

    mesh: tuple[int, int, int]
    remat: str
    grad_accum: int
    loss_chunk: int

    def overrides(self) -> dict[str, Any]:
        """As the config's dotted keys."""
        return {
            "mesh.shape": list(self.mesh),
            "model.remat": self.remat,
            "optimizer.grad_accum_steps": self.grad_accum,
            "train.loss_chunk_size": self.loss_chunk,
        }

    def label(self) -> str:
        d, f, t = self.mesh
        return f"{d}x{f}x{t} {self.remat} accum={self.grad_accum} chunk={self.loss_chunk}"


def _resolved_mesh(shape: Sequence[int], chips: int) -> Optional[tuple[int, int, int]]:
    from jaxformer.sharding import resolve_shape

    try:
        return tuple(resolve_shape(shape, chips))  # type: ignore[return-value]
    except ValueError:
        return None


def own_setting(cfg: Any, chips: int) -> Candidate:
    """The config's own setting as a candidate (an unresolvable mesh: FSDP over every chip)."""
    return Candidate(
        _resolved_mesh(cfg.mesh.shape, chips) or (1, chips, 1),
        cfg.model.remat,
        cfg.optimizer.grad_accum_steps,
        cfg.train.loss_chunk_size,
    )


def grid(
    cfg: Any,
    chips: int,
    meshes: Sequence[Sequence[int]] = (),
    remats: Sequence[str] = (),
    grad_accums: Sequence[int] = (),
    loss_chunks: Sequence[int] = (),
    full: bool = False,
    mesh_ok: Callable[[tuple[int, int, int]], bool] = lambda mesh: True,
) -> list[Candidate]:
    """The config's own setting first, then each knob varied alone (or, with `full`, every
    combination); candidates whose batch does not split are left out.

    Without `meshes`, the splits tried besides the config's are the smallest data axis and the
    smallest tensor axis above 1 that `mesh_ok` accepts (on a 3D torus such as v5p:4x4x4 jax
    lays out only axes that are products of the physical ones: 4 x 16 x 1, not 2 x 32 x 1)."""
    base = own_setting(cfg, chips)
    accum = base.grad_accum
    splits = [n for n in range(2, chips + 1) if chips % n == 0]
    default_meshes = [(1, chips, 1)] + [
        next((m for m in map(shape, splits) if mesh_ok(m)), None)
        for shape in (lambda n: (n, chips // n, 1), lambda n: (1, chips // n, n))
    ]
    options = dict(
        mesh=[_resolved_mesh(m, chips) for m in meshes] or default_meshes,
        remat=list(remats) or ["full", "dots_saveable", "none"],
        grad_accum=list(grad_accums) or [accum * 2, max(accum // 2, 1)],
        loss_chunk=list(loss_chunks) or [base.loss_chunk],
    )
    options["mesh"] = [m for m in options["mesh"] if m and math.prod(m) == chips]
    if full:
        values = [[getattr(base, k)] + v for k, v in options.items()]
        found = [Candidate(*combo) for combo in itertools.product(*values)]
    else:
        found = [base] + [
            dataclasses.replace(base, **{key: value})
            for key, values in options.items()
            for value in values
        ]
    out: list[Candidate] = []
    for c in found:
        data = c.mesh[0] * c.mesh[1]  # the batch is split over data and fsdp (default rules)
        if c not in out and cfg.data.batch_size % (data * c.grad_accum) == 0:
            out.append(c)
    return out


def apply(cfg: Any, candidate: Candidate) -> Any:
    """`cfg` with the candidate's keys set."""
    return dataclasses.replace(
        cfg,
        mesh=dataclasses.replace(cfg.mesh, shape=candidate.mesh),
        model=dataclasses.replace(cfg.model, remat=candidate.remat),
        optimizer=dataclasses.replace(cfg.optimizer, grad_accum_steps=candidate.grad_accum),
        train=dataclasses.replace(cfg.train, loss_chunk_size=candidate.loss_chunk),
    )


def estimate(cfg: Any, report: dict[str, Any], chip: peak_lib.Chip) -> dict[str, float]:
    """The roofline estimate of the module docstring for one compiled candidate."""
    model = cfg.model
    d, f, t = (report["mesh"][k] for k in ("data", "fsdp", "tensor"))
    chips = d * f * t
    accum = cfg.optimizer.grad_accum_steps
    compute_bytes = 2 if model.dtype in ("bfloat16", "float16") else 4
    passes = 3 if model.remat == "full" else 2
    params = report["params"]
    flops = report["model_flops_per_step"] / chips * (4 / 3 if model.remat == "full" else 1)
    weights = params * compute_bytes / t  # gathered weights one chip's matmuls read per pass
    local_params = params / (f * t)  # parameters (and optimizer state) a chip holds
    hbm = weights * passes * accum + 28 * local_params
    ici = 0.0
    if f > 1:
        ici += accum * (passes * weights + 4 * params / t) * (f - 1) / f
    if d > 1:
        ici += 2 * 4 * local_params * (d - 1) / d
    if t > 1:
        length = cfg.data.seq_len
        layers = model.num_layers + (
            model.decoder_layers if model.family == "encoder_decoder" else 0
        )
        tokens = cfg.data.batch_size * length / (d * f)  # per chip row group, whole step
        ici += 2 * layers * passes * tokens * model.d_model * compute_bytes * 2 * (t - 1) / t
    times = dict(
        compute_seconds=flops / chip.flops,
        hbm_seconds=hbm / chip.hbm_bytes_per_second,
        ici_seconds=ici / chip.ici_bytes_per_second,
    )
    step = sum(times.values())  # nothing overlapped: the ranking's (conservative) figure
    bound = max(times, key=times.get).split("_")[0]
    mfu = report["model_flops_per_step"] / chips / chip.flops / step
    return dict(
        **times,
        step_seconds=step,
        overlapped_step_seconds=max(times.values()),
        bound=bound,
        mfu=mfu,
    )


def plan(
    cfg: Any,
    topology: str,
    candidates: Sequence[Candidate],
    slices: int = 1,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Compiles each candidate for the topology; rows sorted best first (fitting, fastest)."""
    from jaxformer.training import compile_only

    rows = []
    for i, candidate in enumerate(candidates):
        trial = apply(cfg, candidate)
        start = time.perf_counter()
        try:
            report = compile_only.compile_train_step(trial, topology, slices)
        # A split the model does not allow (heads over tensor, ...: ValueError), or one jax cannot
        # lay out on the physical torus (NotImplementedError): that row fails, the plan goes on.
        except (ValueError, NotImplementedError) as err:
            row = dict(candidate=candidate, fits=False, error=str(err).splitlines()[0])
        else:
            row = dict(candidate=candidate, **report)  # model FLOPs: jaxformer.models.flops
            chip = peak_lib.datasheet(report["chip_kind"])
            if chip is not None and row.get("fits"):
                row.update(estimate(trial, row, chip))
        row["seconds"] = time.perf_counter() - start
        log(f"  [{i + 1}/{len(candidates)}] {_row_text(row)}")
        rows.append(row)
    return sorted(rows, key=_rank)


def _rank(row: dict[str, Any]) -> tuple:
    return (
        not row.get("fits"),
        row.get("step_seconds") or math.inf,
        row.get("per_chip_bytes") or 0,
    )


def _gib(n: Optional[float]) -> str:
    return "?" if n is None else f"{n / GiB:.2f}"


def _seconds(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else f"{1e3 * s:.1f} ms" if s >= 1e-3 else f"{1e6 * s:.0f} us"


def _row_text(row: dict[str, Any]) -> str:
    c = row["candidate"]
    if "error" in row and "per_chip_bytes" not in row:
        return f"{c.label():44s} error: {row['error'][:120]}"
    est = (
        " / ".join(_seconds(row[f"{k}_seconds"]) for k in ("compute", "hbm", "ici"))
        + f"  {_seconds(row['step_seconds']):>9s}  MFU {100 * row['mfu']:5.1f}% ({row['bound']})"
        if "step_seconds" in row
        else f"{'-':>9s}"
    )
    return (
        f"{c.label():44s} fits {'yes' if row['fits'] else 'NO ':3s} "
        f"{_gib(row.get('per_chip_bytes')):>6s} of {_gib(row.get('hbm_bytes'))} GiB/chip  {est}  "
        f"(compiled in {row.get('compile_seconds', 0):.0f} s)"
    )


def table(rows: Sequence[dict[str, Any]], hbm: Optional[int] = None) -> str:
    """The rows best first, as text."""
    head = f"{'rank':>4s}  {'data x fsdp x tensor, remat, accum, loss chunk':44s} fits   memory"
    head += "                  compute / HBM / ICI    est. step  est. MFU (bound)"
    return "\n".join([head] + [f"{i + 1:4d}  {_row_text(r)}" for i, r in enumerate(rows)])


def add_parser(sub) -> None:
    """The `plan` subcommand's options."""
    p = sub.add_parser("plan", help="compile a grid of launch settings for a TPU topology")
    p.add_argument("--config", required=True, help="the run's YAML config")
    p.add_argument("--topology", required=True, help="e.g. v5e:4x4, v5p:4x4x4")
    p.add_argument("--slices", type=int, default=1)
    p.add_argument("--meshes", nargs="+", help="data x fsdp x tensor splits, e.g. 1x16x1 2x8x1")
    p.add_argument("--remat", nargs="+", choices=("none", "full", "dots_saveable", "offload_dots"))
    p.add_argument("--grad-accum", nargs="+", type=int)
    p.add_argument("--loss-chunk", nargs="+", type=int)
    p.add_argument("--full-grid", action="store_true", help="every combination, not one at a time")
    p.add_argument("--max-candidates", type=int, default=4, help="compiles at most (default 4)")
    p.add_argument("--out", help="where to write the best config (default: <config>.plan.yaml)")
    p.add_argument(
        "--measured",
        metavar="RUN",
        help="a run of this config on this topology: print its logged median step time beside "
        "the estimate for its setting (pass --config RUN/config.yaml)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the config")


def mesh_builds(cfg: Any, devices: Sequence[Any]) -> Callable[[tuple[int, int, int]], bool]:
    """Whether the trainer can build a mesh of that split over `devices` (no compile)."""
    from jaxformer import sharding as shard_lib

    def ok(mesh: tuple[int, int, int]) -> bool:
        try:
            shard_lib.make_mesh(dataclasses.replace(cfg.mesh, shape=mesh), devices)
        except (ValueError, NotImplementedError):
            return False
        return True

    return ok


def main(args) -> int:
    """Runs `plan` from parsed arguments; exit 0 when a candidate fits, 1 when none does."""
    import os

    from jaxformer.config import save_config
    from jaxformer.training import compile_only
    from jaxformer.training.config import load_experiment

    cfg = load_experiment(args.config, args.overrides)
    # A run to compare with is read before the compiles, which take minutes.
    logged = measured_lib.logged_step_seconds(args.measured) if args.measured else None
    _, _, _, _ = compile_only.parse_topology(args.topology)
    devices = compile_only.topology_devices(args.topology, args.slices)
    chips = len(devices)
    meshes = [tuple(int(x) for x in m.split("x")) for m in args.meshes or []]
    if any(len(m) != 3 for m in meshes):
        raise ValueError("--meshes: each split is DATAxFSDPxTENSOR, e.g. 2x8x1")
    candidates = grid(
        cfg,
        chips,
        meshes,
        args.remat or (),
        args.grad_accum or (),
        args.loss_chunk or (),
        args.full_grid,
        mesh_builds(
            dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, slices=args.slices)),
            devices,
        ),
    )[: args.max_candidates]
    print(
        f"[bench plan] {args.config} on {args.topology} x {args.slices} ({chips} chips): "
        f"{len(candidates)} candidates (--max-candidates {args.max_candidates})",
        flush=True,
    )
    rows = plan(cfg, args.topology, candidates, args.slices, log=lambda s: print(s, flush=True))
    print(table(rows))
    measured = None
    if logged is not None:
        measured = measured_lib.compare(rows, args.measured, logged, own_setting(cfg, chips))
        print(measured_lib.describe(measured))
    best = rows[0] if rows and rows[0].get("fits") else None
    out = None
    if best is not None:
        out = args.out or os.path.splitext(args.config)[0] + ".plan.yaml"
        save_config(apply(cfg, best["candidate"]), out)
        print(f"best: {best['candidate'].label()} -> {out}")
    else:
        print("no candidate fits: try model.remat=full, a smaller batch or more chips")
    if args.json:
        shown = [
            {k: v for k, v in r.items() if k != "candidate"}
            | {"candidate": r["candidate"].overrides()}
            for r in rows
        ]
        print(
            json.dumps(
                dict(
                    command="plan",
                    topology=args.topology,
                    rows=shown,
                    best_config=out,
                    measured=measured,
                ),
                default=str,
            )
        )
    return 0 if best is not None else 1
