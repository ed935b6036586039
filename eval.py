"""Evaluate a checkpoint: `python eval.py RUN_DIR [--step N] [--split validation] [--out report.json] [--plot] [--generate PROMPT] [--int8]`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parses the command line and evaluates; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", help="run directory (pretraining or fine-tuning)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--split", default=None, help="split to evaluate (default: the run's)")
    parser.add_argument("--batches", type=int, default=None, help="evaluate only N batches")
    parser.add_argument("--out", default=None, help="also write the report as JSON here")
    parser.add_argument(
        "--plot", action="store_true", help="write RUN_DIR/curves.png from metrics.jsonl"
    )
    parser.add_argument(
        "--generate",
        default=None,
        metavar="PROMPT",
        help="generate a continuation (decoder) or output (encoder-decoder)",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also evaluate with int8 weights and report weight memory",
    )
    args = parser.parse_args(argv)

    from jaxformer.training.evaluate import run_eval

    return run_eval(
        args.run_dir,
        args.step,
        args.split,
        args.out,
        args.plot,
        args.generate,
        args.batches,
        args.int8,
    )


if __name__ == "__main__":
    sys.exit(main())
