"""Peak host memory of converting a sharded Hugging Face checkpoint, against the checkpoint's size.

Writes a random bfloat16 checkpoint with transformers (several safetensors shards), then, in a fresh
process each: (1) `convert.from_hf` into a model, (2) the whole `python -m jaxformer.convert
from-hf` command (model plus step-0 run directory). Peak RSS (VmHWM) is reported next to the
resident memory of the same process once it has imported what the conversion imports, so the
difference is what the conversion itself holds at its peak.

    python benchmarks/convert_memory.py [--model-type llama] [--hidden 1536] [--layers 18]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

IMPORTS = (
    "import jax, torch, transformers, safetensors; from jaxformer import convert; "
    "from jaxformer.convert import runs"
)


def _status_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_checkpoint(args, out: str) -> None:
    """A random model of the asked shape saved in bfloat16 shards."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(
        args.model_type,
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    with torch.device("cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="256MB")


def child(mode: str, src: str, dst: str) -> None:
    """Runs one measurement in this (fresh) process and prints a JSON line."""
    exec(IMPORTS)
    base = _status_mib("VmRSS")
    start = time.perf_counter()
    if mode == "from_hf":
        from jaxformer import convert

        model, cfg = convert.from_hf(src)
        detail = f"param_dtype={cfg.param_dtype}"
    elif mode == "command":
        from jaxformer.convert.__main__ import main

        assert main(["from-hf", src, dst]) == 0
        detail = "run directory written"
    else:
        detail = "imports only"
    print(
        json.dumps(
            dict(
                mode=mode,
                import_rss_mib=round(base, 1),
                peak_rss_mib=round(_status_mib("VmHWM"), 1),
                end_rss_mib=round(_status_mib("VmRSS"), 1),
                seconds=round(time.perf_counter() - start, 1),
                detail=detail,
            )
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-type", default="llama")
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dir", default="", help="reuse/keep the checkpoint here")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    work = tempfile.mkdtemp(prefix="convert-memory-")
    src = args.dir or os.path.join(work, "hf")
    if not os.path.isfile(os.path.join(src, "model.safetensors.index.json")):
        print(f"writing a random {args.model_type} checkpoint to {src} ...", flush=True)
        write_checkpoint(args, src)
    shards = [f for f in os.listdir(src) if f.endswith(".safetensors")]
    size_mib = sum(os.path.getsize(os.path.join(src, f)) for f in shards) / 2**20
    print(f"checkpoint: {len(shards)} safetensors shards, {size_mib:.0f} MiB (bfloat16)")
    for mode in ("imports", "from_hf", "command"):
        dst = os.path.join(work, f"run-{mode}")
        out = (
            subprocess.run(
                [sys.executable, __file__, "--child", mode, src, dst],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "JAX_PLATFORMS": "cpu"},
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        r = json.loads(out)
        over = r["peak_rss_mib"] - r["import_rss_mib"]
        print(
            f"{mode:8s} peak RSS {r['peak_rss_mib']:7.0f} MiB = imports {r['import_rss_mib']:5.0f}"
            f" + {over:6.0f} MiB ({over / size_mib:.2f}x the checkpoint; resident at the end "
            f"{r['end_rss_mib'] - r['import_rss_mib']:.0f} MiB) in {r['seconds']} s"
            f"  [{r['detail']}]"
        )


if __name__ == "__main__":
    main()
