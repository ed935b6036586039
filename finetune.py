"""Fine-tune a checkpoint: `python finetune.py --from RUN_DIR|hf:DIR [--step N] --config configs/finetune/X.yaml [key=value ...]`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parses the command line and fine-tunes; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--from",
        dest="from_dir",
        required=True,
        help="run directory holding the checkpoint to start from, or hf:DIR for a Hugging "
        "Face save_pretrained directory (Llama, Mistral, Qwen, Gemma 2, GPT-2, BERT, T5)",
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--config", default=None, help="fine-tuning YAML config")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)

    from jaxformer.training.finetune import run_finetune

    return run_finetune(args.from_dir, args.step, args.config, args.overrides)


if __name__ == "__main__":
    from jaxformer import _malloc

    _malloc.reexec_with_hugepages()  # XLA's CPU buffers on huge pages (jaxformer/_malloc.py)
    sys.exit(main())
