"""Compile seconds of the real train step versus depth, scanned vs unrolled layers.

Compiles ahead of time for a TPU topology on this host (needs the `tpu` extra), so the figures are
XLA's TPU compile, not a CPU one. Example:

    python benchmarks/compile_depth.py --topology v5e:2x2 --depths 2 8 32
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    """Prints one row per (depth, scan) with compile seconds and per-chip memory."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[
            "model.dtype=bfloat16",
            "model.remat=full",
            "data.vocab_size=32000",
            "data.seq_len=2048",
            "data.batch_size=16",
            "mesh.shape=[1,-1,1]",
        ],
    )
    args = parser.parse_args()

    from jaxformer.training.compile_only import compile_train_step
    from jaxformer.training.config import load_experiment

    print("| layers | scan_layers | lower s | compile s | per-chip GiB | code MiB |")
    print("|---|---|---|---|---|---|")
    for depth in args.depths:
        for scan in (True, False):
            cfg = load_experiment(
                None,
                [
                    f"model.preset={args.preset}",
                    *args.overrides,
                    f"model.num_layers={depth}",
                    f"model.scan_layers={str(scan).lower()}",
                ],
            )
            r = compile_train_step(cfg, args.topology)
            print(
                f"| {depth} | {scan} | {r['lower_seconds']:.1f} | {r['compile_seconds']:.1f} | "
                f"{r['per_chip_bytes'] / 2**30:.2f} | {r.get('code_bytes', 0) / 2**20:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
