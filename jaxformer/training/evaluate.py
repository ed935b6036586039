"""What `eval.py` does: evaluate any checkpoint, print a table, write JSON, plot, generate."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from jaxformer.config import config_to_dict, load_config
from jaxformer.training import cli
from jaxformer.training.checkpoint import Checkpointer
from jaxformer.training.metrics import read_metrics
from jaxformer.training.task_metrics import until_eos


def open_run(
    run_dir: str, step: Optional[int], split: Optional[str], overrides: Sequence[str] = ()
):
    """A read-only trainer at `step`, with the workload that wrote the run (its checkpoint says);
    dotted `overrides` change the stored config (e.g. task.batch_size=8)."""
    from jaxformer.training.loop import Trainer
    from jaxformer.training.workload import run_config

    meta = Checkpointer(run_dir, create=False).read_meta(step)
    workload, cfg = run_config(meta, os.path.abspath(run_dir))
    if overrides:
        cfg = load_config(type(cfg), None, overrides, base=config_to_dict(cfg))
    if split:
        cfg = workload.with_eval_split(cfg, split)
    return Trainer(cfg, workload, read_only=True, step=meta["step"], show_progress=False)


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """How `eval.py` generates: greedy at temperature 0, else sampled from the top_p nucleus."""

    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    chat: bool = False
    """Render the prompt as one user turn with the tokenizer's chat template (and its generation
    prompt) before generating."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


def stop_ids(tokenizer) -> tuple[int, ...]:
    """The ids that end generated text: the tokenizer's (a checkpoint's generation config may
    name several), else its EOS."""
    return tuple(getattr(tokenizer, "stop_ids", None) or (tokenizer.eos_id,))


def generate_text(trainer, prompt: str, options: SampleOptions = SampleOptions()) -> str:
    """Continuation (decoder) or output (encoder-decoder) for a text prompt, up to a stop id."""
    from jaxformer.inference import generate

    family = trainer.cfg.model.family
    if family == "encoder":
        raise ValueError("an encoder-only model does not generate text")
    tok = trainer.tokenizer
    if options.chat:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
    ids = tok.encode(prompt)
    model = trainer.model()
    max_new_tokens = options.max_new_tokens
    if family == "decoder":
        # Shorten the continuation to fit the context; a prompt that alone overflows it is left
        # to generate's error, which names both lengths.
        budget = trainer.cfg.model.max_len - len(ids)
        max_new_tokens = min(max_new_tokens, budget) if budget > 0 else max_new_tokens
    else:
        ids = ids + [tok.eos_id]  # encoder inputs end with EOS, as in training
    stops = stop_ids(tok)
    out = generate(
        model,
        np.asarray([ids], np.int32),
        max_new_tokens=max_new_tokens,
        method="greedy" if options.temperature == 0 else "sample",
        temperature=options.temperature,
        top_p=options.top_p,
        rng=options.seed,
        eos_id=stops,
        pad_id=tok.pad_id,
    )
    return tok.decode(until_eos(np.asarray(out)[0], stops))


def evaluate_int8(trainer, num_batches: Optional[int] = None) -> dict[str, float]:
    """The same evaluation with int8 weights, plus weight bytes before and after."""
    from jaxformer.inference import param_bytes, quantize_model

    model = trainer.model()
    quantized = quantize_model(model)
    metrics = trainer.evaluate(num_batches, model=quantized)
    metrics.update(
        weight_bytes_float=float(param_bytes(model)),
        weight_bytes_int8=float(param_bytes(quantized)),
    )
    return metrics


def plot_curves(run_dir: str, path: str) -> str:
    """Writes a PNG of the training and validation loss curves from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir} has no metrics.jsonl to plot")
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("validation", "o-")):
        points = [(r["step"], r["loss"]) for r in records if r["split"] == split and "loss" in r]
        if points:
            steps, losses = zip(*sorted(dict(points).items()))
            ax.plot(steps, losses, style, label=f"{split} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(os.path.basename(os.path.abspath(run_dir)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(metrics: dict[str, Any]) -> str:
    """A two-column terminal table of numeric results."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    width = max(len(k) for k, _ in rows) if rows else 10
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


@cli.command(interrupted="no report written")
def run_eval(
    run_dir: str,
    step: Optional[int],
    split: Optional[str],
    out: Optional[str],
    plot: bool,
    prompt: Optional[str],
    num_batches: Optional[int] = None,
    int8: bool = False,
    sampling: SampleOptions = SampleOptions(),
    overrides: Sequence[str] = (),
) -> int:
    """Evaluates and reports; 0 on success, 2 with one clear message on bad input.

    Everything an option needs (matplotlib for --plot, a directory for --out) is checked before
    any evaluation, and the finished report is written before the plot is drawn.
    """
    curves = os.path.join(os.path.abspath(run_dir), "curves.png")
    if plot:
        cli.require("matplotlib", "plot", "--plot")
        Checkpointer(run_dir, create=False)  # a wrong RUN_DIR is named as such first
        if not read_metrics(run_dir):
            raise ValueError(f"--plot: {run_dir} has no metrics.jsonl to plot")
    if out:
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise FileNotFoundError(errno.ENOENT, "--out: no such directory", parent)
    if prompt is not None and not prompt.strip():
        raise ValueError("--generate needs a non-empty prompt")
    trainer = open_run(run_dir, step, split, overrides)
    try:
        report = _evaluate(trainer, run_dir, num_batches, int8, prompt, sampling)
    finally:
        trainer.close()
    if out:
        write_report(report, out)
    print(f"{report['run_dir']} at step {report['step']} ({report['family']})")
    print(format_table(report["metrics"]))
    if "int8" in report:
        print("\nwith int8 weights:")
        print(format_table(report["int8"]))
    for sample in report["samples"]:
        print(f"\n--- {sample['prompt']!r}\n{sample['prompt']}{sample['output']}")
    if out:
        print(f"\nreport written to {out}")
    if plot:
        report["plot"] = plot_curves(run_dir, curves)
        print(f"curves written to {report['plot']}")
        if out:  # now with the plot's path
            write_report(report, out)
    return 0


def _evaluate(
    trainer,
    run_dir: str,
    num_batches: Optional[int],
    int8: bool,
    prompt: Optional[str],
    sampling: SampleOptions,
) -> dict[str, Any]:
    report: dict[str, Any] = dict(
        run_dir=os.path.abspath(run_dir), step=trainer.start_step, family=trainer.cfg.model.family
    )
    report["metrics"] = trainer.evaluate(num_batches)
    if int8:
        report["int8"] = evaluate_int8(trainer, num_batches)
    samples = []
    if prompt is not None:
        samples.append(dict(prompt=prompt, output=generate_text(trainer, prompt, sampling)))
    else:
        short = dataclasses.replace(sampling, max_new_tokens=min(24, sampling.max_new_tokens))
        samples = [
            dict(prompt=p, output=generate_text(trainer, p, short))
            for p in trainer.workload.sample_prompts(trainer.cfg)
        ]
    report["samples"] = samples
    return report


def write_report(report: dict[str, Any], path: str) -> None:
    """Writes the report as JSON atomically: a failed write leaves any earlier report whole."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
