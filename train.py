"""Pretrain a Transformer: `python train.py [--config configs/X.yaml] [key=value ...]`."""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.yaml")


def main(argv: list[str] | None = None) -> int:
    """Parses the command line, trains, prints the result; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="YAML config (default: configs/default.yaml, the built-in corpus)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)

    from jaxformer.training.main import run_training
    return run_training(args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
