"""python -m jaxformer.convert {from-hf,to-hf,merge} SRC DST

from-hf: a save_pretrained directory (GPT-2, BERT, T5, Llama, Mistral, Qwen2, Qwen3, Gemma 2)
         -> a jaxformer run directory (step 0).
to-hf:   a jaxformer run directory's latest (or --step) checkpoint -> a save_pretrained directory;
         of a LoRA run, a PEFT adapter directory (adapter_config.json, adapter_model.safetensors)
         for the converted base, written too with --base-out DIR (jaxformer.convert.peft).
merge:   a LoRA fine-tuning run (adapters + the base it names) -> a plain run directory (step 0)
         whose kernels are base + adapter, in the model's param_dtype.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence
from typing import Optional

from jaxformer.convert import ARCHITECTURES  # `python -m` has imported the package already
from jaxformer.training import cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxformer.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-hf", help="Hugging Face directory -> jaxformer run directory")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument(
        "--tokenizer",
        help="tokenizer to store in the checkpoint: a Hugging Face tokenizer directory, a "
        "jaxformer sentencepiece .model or saved tokenizer file (default: the directory's own "
        "Hugging Face tokenizer, else its sentencepiece model, else none)",
    )
    b = sub.add_parser("to-hf", help="jaxformer run directory -> Hugging Face directory")
    b.add_argument("src")
    b.add_argument("dst")
    b.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    b.add_argument(
        "--head",
        default=None,
        help="architecture to record for an encoder: masked_lm, classification, "
        "token_classification or question_answering (default: a fine-tuned run's task kind, "
        "else masked_lm)",
    )
    b.add_argument(
        "--architecture",
        default=None,
        choices=ARCHITECTURES,
        help="Hugging Face model type to write (default: the one the model's features call for: "
        "gpt2/llama/mistral/qwen2/qwen3/gemma2 for a decoder, bert, t5); a model it cannot "
        "express is refused, naming the config fields",
    )
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    b.add_argument(
        "--base-out",
        default=None,
        help="LoRA runs only: also write the converted base model here (DST then names it as "
        "base_model_name_or_path; default: the run's finetune.from_dir)",
    )
    m = sub.add_parser("merge", help="LoRA run directory -> plain run directory")
    m.add_argument("src")
    m.add_argument("dst")
    m.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args = parser.parse_args(argv)
    return convert_command(args)


@cli.command(interrupted="the destination may be incomplete; rerun the command")
def convert_command(args: argparse.Namespace) -> int:
    """Runs a parsed command line; 0, or 2 with one `error:` line (CheckpointError, a bad
    directory, a missing `hf` extra, ...)."""
    from jaxformer import convert
    from jaxformer.convert import common, runs

    def require_hf(*modules: str) -> None:
        # Checked after the paths, so a wrong path is reported the same with or without the extra.
        for module in modules:
            cli.require(module, "hf", f"python -m jaxformer.convert {args.command}")

    if args.command == "merge":
        out = merge_run(args.src, args.dst, args.step)
        print(f"wrote the merged model (base + adapters of {args.src}) to run directory {out}")
        return 0
    if args.command == "from-hf":
        if not os.path.isdir(args.src):
            raise NotADirectoryError(
                errno.ENOTDIR,
                "not a directory (expected a Hugging Face save_pretrained directory)",
                args.src,
            )
        require_hf("torch", "transformers", "safetensors")
        model, cfg = convert.from_hf(args.src)
        tokenizer, note = runs.tokenizer_for_run(args.src, cfg, args.tokenizer)
        out = runs.save_run(model, cfg, args.dst, tokenizer_model=tokenizer)
        print(f"wrote {cfg.family} model to run directory {out}{note}")
    elif _lora_run(args.src, args.step):
        from jaxformer.convert import peft

        require_hf("transformers", "safetensors")
        out = peft.export_run(
            args.src,
            args.dst,
            step=args.step,
            base_out=args.base_out,
            head=args.head,
            architecture=args.architecture,
            overwrite=args.overwrite,
        )
        note = f"; base model in {args.base_out}" if args.base_out else ""
        print(f"wrote PEFT adapter directory {out}{note}")
    else:
        if args.base_out:
            raise ValueError(f"--base-out is for LoRA runs; {args.src} is not one")
        stored, default_head = runs.run_model_config(args.src, args.step)
        require_hf("transformers", "safetensors")
        head = args.head or default_head
        # Refused before the weights are read: an 8B run loads for minutes.
        convert.hf_config(stored, head, args.architecture)
        common.check_destination(args.dst, overwrite=args.overwrite)
        model, cfg = runs.load_run(args.src, args.step)
        out = convert.to_hf(
            model,
            cfg,
            args.dst,
            head=head,
            architecture=args.architecture,
            overwrite=args.overwrite,
        )
        note = runs.export_tokenizer(args.src, args.step, out)
        print(f"wrote Hugging Face directory {out}{note}")
    return 0


def _lora_run(src: str, step: Optional[int]) -> bool:
    from jaxformer.convert import peft

    return peft.is_lora_run(src, step)


def merge_run(src: str, dst: str, step: Optional[int] = None) -> str:
    """Folds a LoRA run's adapters into its base and saves the result as a plain run directory."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxformer import lora
    from jaxformer.convert import runs
    from jaxformer.training.finetune import load_lora_run
    from jaxformer.training.workload import run_config

    model, meta = load_lora_run(src, step)
    cfg = run_config(meta, os.path.abspath(src))[1].model
    merged = lora.merge_lora(model)
    dtype = jnp.dtype(cfg.param_dtype)
    for _, var in nnx.to_flat_state(nnx.state(merged, nnx.Param)):
        var.set_value(var[...].astype(dtype))
    return runs.save_run(merged, cfg, dst, tokenizer_model=meta.get("tokenizer") or b"")


if __name__ == "__main__":
    sys.exit(main())
