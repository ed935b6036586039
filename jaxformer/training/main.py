"""What `train.py` does, as a library function: config in, trained run directory out."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Optional, Sequence

from jaxformer.config import ConfigError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ValueError, FileNotFoundError)


def run_training(config_path: Optional[str], overrides: Sequence[str]) -> int:
    """Loads the config, trains, prints validation vs unigram loss and a sample; 0 on success."""
    from jaxformer.training.checkpoint import CheckpointError
    from jaxformer.training.config import load_experiment

    errors = USER_ERRORS + (CheckpointError,)
    if config_path is not None and not os.path.exists(config_path):
        print(f"error: config file {config_path!r} does not exist", file=sys.stderr)
        return 2
    try:
        cfg = load_experiment(config_path, overrides)
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.getLogger("absl").setLevel(logging.WARNING)
    start = time.perf_counter()
    try:
        from jaxformer.training.loop import Trainer
        trainer = Trainer(cfg)
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from jaxformer.training.loop import run_to_exit_status
    status, result = run_to_exit_status(trainer)
    if status == 0:
        _report(trainer, result, time.perf_counter() - start)
    return status


def _report(trainer, result: dict, seconds: float) -> None:
    val = result.get("validation") or {}
    print(f"\n[done] {result['steps']} steps in {seconds / 60:.1f} min; run directory "
          f"{trainer.run_dir}")
    if val:
        print(f"[done] validation loss {val['loss']:.4f} nats/token (perplexity "
              f"{val['perplexity']:.1f}, {val.get('bits_per_byte', float('nan')):.3f} bits/byte) "
              f"vs unigram model {val.get('unigram_loss', float('nan')):.4f} nats/token")
    prompt = trainer.cfg.train.sample_prompt
    if prompt and trainer.cfg.model.family == "decoder":
        from jaxformer.training.evaluate import generate_text
        text = generate_text(trainer, prompt, trainer.cfg.train.sample_tokens)
        print(f"[sample] greedy continuation of {prompt!r}:\n{prompt}{text}")


def run_compile_only(config_path: Optional[str], overrides: Sequence[str], topology: str,
                     slices: Optional[int] = None, as_json: bool = False) -> int:
    """Compiles the train step for a TPU topology and reports per-chip memory.

    Returns 0 if it fits in HBM, 1 if it does not, 2 on bad input (config, topology, no libtpu).
    """
    # Compiling for a topology needs no local accelerator; the CPU backend keeps this process off
    # any local TPU (and libtpu's lock) and skips probing for one.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jaxformer.training import compile_only
    from jaxformer.training.config import load_experiment

    if config_path is not None and not os.path.exists(config_path):
        print(f"error: config file {config_path!r} does not exist", file=sys.stderr)
        return 2
    try:
        cfg = load_experiment(config_path, overrides)
        report = compile_only.compile_train_step(cfg, topology, slices)
    except USER_ERRORS + (compile_only.LibtpuMissingError,) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = compile_only.format_report(report)
    if as_json:  # the human lines go to stderr so the last stdout line is the JSON object
        print(text, file=sys.stderr)
        print(json.dumps(report))
    else:
        print(text)
    return 0 if report["fits"] else 1
