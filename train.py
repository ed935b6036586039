"""Pretrain a Transformer: `python train.py [--config configs/X.yaml] [key=value ...]`.

`--compile-only --topology v5e:4x4` instead compiles the real train step ahead of time for that TPU
topology (on any host, no TPU needed) and reports per-chip memory against HBM; the exit status is
0 if it fits, 1 if it does not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.yaml")


def main(argv: list[str] | None = None) -> int:
    """Parses the command line, trains, prints the result; returns the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="YAML config (default: configs/default.yaml, the built-in corpus)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100"
    )
    aot = parser.add_argument_group("compile only (ahead of time, for a TPU topology)")
    aot.add_argument(
        "--compile-only",
        action="store_true",
        help="compile the train step for --topology and report per-chip memory; "
        "exit 0 if it fits in HBM, 1 if not, 2 on bad input (needs libtpu: "
        "pip install -e '.[tpu]')",
    )
    aot.add_argument(
        "--topology", help="TPU topology, e.g. v5e:2x2, v5e:4x4, v5p:4x4x4, v4:2x2x1, v6e:2x2"
    )
    aot.add_argument(
        "--slices",
        type=int,
        help="number of such slices, data parallel across them (default: mesh.slices, 1)",
    )
    aot.add_argument(
        "--json",
        action="store_true",
        help="print the report as one JSON object on the last stdout line",
    )
    args = parser.parse_args(argv)

    if args.compile_only or args.topology:
        if not (args.compile_only and args.topology):
            parser.error("--compile-only and --topology go together")
        from jaxformer.training.main import run_compile_only

        return run_compile_only(args.config, args.overrides, args.topology, args.slices, args.json)
    from jaxformer.training.main import run_training

    return run_training(args.config, args.overrides)


if __name__ == "__main__":
    from jaxformer import _malloc

    _malloc.reexec_with_hugepages()  # XLA's CPU buffers on huge pages (jaxformer/_malloc.py)
    sys.exit(main())
