"""python -m jaxformer.bench {train,peak,generate,plan} ...: speed of the real train step, this
machine's matmul peak, generation with and without the KV cache (and Hugging Face's), and an
ahead-of-time launch planner for TPU topologies. `--json` ends the output with one JSON object.

    python -m jaxformer.bench train                       # the default run's shape (train.py)
    python -m jaxformer.bench train --preset gpt2-124m --seq-len 256 --batch 8 --steps 5 --json
    python -m jaxformer.bench train --preset llama3-8b --steps 0   # FLOPs and params, no run
    python -m jaxformer.bench peak
    python -m jaxformer.bench generate --batch 1 16 --new-tokens 128 --hf
    python -m jaxformer.bench plan --config configs/c4_llama_1b.yaml --topology v5e:4x4
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, Optional

from jaxformer.config import ConfigError

CHOICES_REMAT = ("none", "full", "dots_saveable", "offload_dots")


def _emit(report: Any, line: str, as_json: bool) -> None:
    print(line, flush=True)
    if as_json:
        print(json.dumps(report, default=str), flush=True)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="time the train step train.py runs")
    p.add_argument("--preset", help="a model preset (default: the default run's GPT, 4 x 128)")
    p.add_argument("--layers", type=int)
    p.add_argument("--d-model", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--d-ff", type=int, help="default 4 x d-model (without --preset)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--target-len", type=int, help="decoder length of an encoder-decoder")
    p.add_argument("--vocab", type=int)
    p.add_argument("--batch", type=int, default=32, help="global batch in rows (default 32)")
    p.add_argument("--steps", type=int, default=10, help="timed steps; 0: FLOPs/params only")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument("--remat", choices=CHOICES_REMAT)
    p.add_argument("--attention", help="model.attention_impl: auto, plain, chunked, cudnn, splash")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--loss-chunk", type=int, help="train.loss_chunk_size")
    p.add_argument("--peak-flops", type=float, help="MFU denominator instead of measuring")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")


def _train(args) -> int:
    from jaxformer.bench import train

    cfg = train.experiment(
        args.preset,
        layers=args.layers,
        d_model=args.d_model,
        heads=args.heads,
        d_ff=args.d_ff,
        seq_len=args.seq_len,
        target_len=args.target_len,
        vocab=args.vocab,
        batch=args.batch,
        dtype=args.dtype,
        remat=args.remat,
        attention=args.attention,
        scan=args.scan,
        grad_accum=args.grad_accum,
        loss_chunk=args.loss_chunk,
        overrides=args.overrides,
    )
    report = train.run(cfg, steps=args.steps, warmup=args.warmup, peak_flops=args.peak_flops)
    _emit(report, train.describe(report), args.json)
    return 0


def _peak_parser(sub) -> None:
    p = sub.add_parser("peak", help="this machine's sustained matmul FLOP/s")
    p.add_argument("--size", type=int, help="square matmul size (default 1024 CPU, 8192 GPU/TPU)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--json", action="store_true")


def _peak(args) -> int:
    import jax

    from jaxformer.bench import peak

    device = jax.devices()[0]
    chip = peak.datasheet(device.device_kind)
    report: dict[str, Any] = dict(
        command="peak",
        device=device.device_kind,
        platform=device.platform,
        devices=jax.device_count(),
        datasheet_flops_per_second=chip.flops if chip and device.platform != "cpu" else None,
    )
    lines = [f"[bench peak] {device.device_kind} ({device.platform})"]
    for dtype in args.dtypes:
        m = peak.measure_matmul(dtype, args.size, args.repeats)
        report[f"{dtype}_flops_per_second"] = m["best_flops_per_second"]
        report[f"{dtype}_median_flops_per_second"] = m["median_flops_per_second"]
        report["size"] = m["size"]
        acc = " (float32 accumulation)" if dtype != "float32" else ""
        lines.append(
            f"  {dtype}{acc}: {m['best_flops_per_second'] / 1e9:,.1f} GFLOP/s best, "
            f"{m['median_flops_per_second'] / 1e9:,.1f} median ({m['size']}^2 x {m['chain']})"
        )
    if report["datasheet_flops_per_second"]:
        lines.append(
            f"  datasheet dense bf16: {report['datasheet_flops_per_second'] / 1e12:.0f} TFLOP/s"
        )
    _emit(report, "\n".join(lines), args.json)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxformer.bench", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _peak_parser(sub)
    from jaxformer.bench import finetune_memory, generate, plan

    generate.add_parser(sub)
    plan.add_parser(sub)
    finetune_memory.add_parser(sub)
    args = parser.parse_args(argv)
    commands = dict(train=_train, peak=_peak, generate=generate.main, plan=plan.main)
    commands["finetune-memory"] = finetune_memory.main
    try:
        return commands[args.command](args)
    except (ConfigError, ValueError) as err:
        print(f"[bench {args.command}] error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from jaxformer import _malloc

    _malloc.reexec_with_hugepages()  # XLA's CPU buffers on huge pages (jaxformer/_malloc.py)
    sys.exit(main())
