"""What `train.py` does, as a library function: config in, trained run directory out."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Optional

from jaxformer.training import cli


@cli.command(interrupted=cli.RESUME_HINT)
def run_training(config_path: Optional[str], overrides: Sequence[str]) -> int:
    """Loads the config, trains, prints validation vs unigram loss and a sample; 0 on success,
    2 on bad input (one `error:` line, nothing written), 3 on a non-finite step, 75 when stopped
    by SIGTERM/SIGINT (state saved), 130 on Ctrl-C outside the training loop."""
    from jaxformer.training.config import load_experiment

    cfg = load_experiment(config_path, overrides)  # every check that needs no data, first
    logging.getLogger("absl").setLevel(logging.WARNING)
    start = time.perf_counter()
    from jaxformer.training.loop import Trainer, run_to_exit_status

    trainer = Trainer(cfg)
    status, result = run_to_exit_status(trainer)
    if status == 0:
        _report(trainer, result, time.perf_counter() - start)
    return status


def _report(trainer, result: dict, seconds: float) -> None:
    val = result.get("validation") or {}
    if cli.already_complete(trainer, result):
        print(
            f"\n[done] {trainer.run_dir} was already complete at step {trainer.start_step} "
            f"(train.steps={trainer.cfg.train.steps}): no training done; raise train.steps to "
            "extend it"
        )
    else:
        trained = result["steps"] - trainer.start_step
        print(
            f"\n[done] trained to step {result['steps']} ({trained} step"
            f"{'s' if trained != 1 else ''} in {seconds / 60:.1f} min); run directory "
            f"{trainer.run_dir}"
        )
    if val:
        print(
            f"[done] validation loss {val['loss']:.4f} nats/token (perplexity "
            f"{val['perplexity']:.1f}, {val.get('bits_per_byte', float('nan')):.3f} bits/byte) "
            f"vs unigram model {val.get('unigram_loss', float('nan')):.4f} nats/token"
        )
    prompt = trainer.cfg.train.sample_prompt
    if prompt and trainer.cfg.model.family == "decoder":
        from jaxformer.training.evaluate import SampleOptions, generate_text

        text = generate_text(trainer, prompt, SampleOptions(trainer.cfg.train.sample_tokens))
        print(f"[sample] greedy continuation of {prompt!r}:\n{prompt}{text}")


@cli.command()
def run_compile_only(
    config_path: Optional[str],
    overrides: Sequence[str],
    topology: str,
    slices: Optional[int] = None,
    as_json: bool = False,
) -> int:
    """Compiles the train step for a TPU topology and reports per-chip memory.

    Returns 0 if it fits in HBM, 1 if it does not, 2 on bad input (config, topology, no libtpu).
    """
    # Compiling for a topology needs no local accelerator; the CPU backend keeps this process off
    # any local TPU (and libtpu's lock) and skips probing for one.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jaxformer.training import compile_only
    from jaxformer.training.config import load_experiment

    cfg = load_experiment(config_path, overrides)
    report = compile_only.compile_train_step(cfg, topology, slices)
    text = compile_only.format_report(report)
    if as_json:  # the human lines go to stderr so the last stdout line is the JSON object
        print(text, file=sys.stderr)
        print(json.dumps(report))
    else:
        print(text)
    return 0 if report["fits"] else 1
