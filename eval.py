"""Evaluate a checkpoint: `python eval.py RUN_DIR [--step N] [--split validation] [--out report.json] [--plot] [--generate PROMPT] [--max-new-tokens N] [--temperature T] [--top-p P] [--chat] [--int8] [key=value ...]`."""

from __future__ import annotations

import argparse
import os
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
    parser.add_argument(
        "--max-new-tokens", type=int, default=48, help="tokens to generate (default 48)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature; 0 (default) generates greedily",
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: all tokens)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user turn through the tokenizer's chat template",
    )
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides of the run's config"
    )
    args = parser.parse_args(argv)
    if args.generate is not None:
        # The command line arrives decoded with surrogate escapes: bytes that are not UTF-8 become
        # lone surrogates, which the tokenizer would only reject after the whole evaluation.
        try:
            os.fsencode(args.generate).decode("utf-8")
        except UnicodeDecodeError as err:
            print(
                f"error: --generate: the prompt is not valid UTF-8 ({err.reason}, byte "
                f"{err.object[err.start : err.end]!r} at offset {err.start}); pass it as UTF-8",
                file=sys.stderr,
            )
            return 2

    from jaxformer.training.evaluate import SampleOptions, run_eval

    try:
        sampling = SampleOptions(
            args.max_new_tokens, args.temperature, args.top_p, args.seed, args.chat
        )
    except ValueError as err:
        parser.error(str(err))

    return run_eval(
        args.run_dir,
        args.step,
        args.split,
        args.out,
        args.plot,
        args.generate,
        args.batches,
        args.int8,
        sampling,
        args.overrides,
    )


if __name__ == "__main__":
    from jaxformer import _malloc

    _malloc.reexec_with_hugepages()  # XLA's CPU buffers on huge pages (jaxformer/_malloc.py)
    sys.exit(main())
