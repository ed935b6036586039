"""LoRA against full fine-tuning, from the same pretrained runs, on the built-in offline tasks.

    python benchmarks/lora_quality.py --workdir /tmp/lora_quality [--steps 200] [--json out.json]
    python benchmarks/lora_quality.py --workdir /tmp/lq --quick   # a smoke run: a few steps

Pretrains bert-tiny, t5-tiny and gpt-tiny once with their configs/*.yaml (a run already in
WORKDIR/pretrain/ at its step count is reused; --pretrained FAMILY=DIR names another), then
fine-tunes each task twice from the same checkpoint: all parameters at the task config's learning
rate, and LoRA (configs/finetune/lora_sft.yaml's adapters: all-linear, rank 8, alpha 16, dropout
0.05, bfloat16 frozen base, no weight decay; a new task head trained in full, as PEFT's
modules_to_save) at --lora-lr-scale times that rate. Same steps, batch, data order and seed. Prints
one table (task, metric, both scores, their ratio, trainable parameters, wall time) and writes it as
JSON. Runs in-process through the entry points' own functions (`load_experiment` / `load_finetune`
and the Trainer that train.py and finetune.py build).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    family: str  # which pretrained run it starts from
    metric: str  # the validation metric compared (higher is better)
    full_lr: float  # the task config's learning rate
    head: tuple[str, ...] = ()  # a new task head, trained in full beside the adapters
    percent: float = 1.0  # x this gives the metric in percent (task_metrics gives some as 0..1)


TASKS = (
    Task("code_package", "encoder", "accuracy", 2e-3, ("classifier",), 100.0),
    Task("code_tokens", "encoder", "entity_f1", 2e-3, ("classifier",)),
    Task("code_qa", "encoder", "f1", 2e-3, ("classifier",)),
    Task("code_docstring", "encoder_decoder", "rouge_l", 5e-3),
    Task("code_completion", "decoder", "token_accuracy", 1e-3, percent=100.0),
)
PRETRAIN = {
    "encoder": "configs/bert_tiny.yaml",
    "encoder_decoder": "configs/t5_tiny.yaml",
    "decoder": "configs/gpt_tiny.yaml",
}
LORA = [  # configs/finetune/lora_sft.yaml's adapter settings
    "finetune.lora.targets=[all-linear]",
    "finetune.lora.rank=8",
    "finetune.lora.alpha=16.0",
    "finetune.lora.dropout=0.05",
    "finetune.lora.base_dtype=bfloat16",
    "finetune.lora.quantize=none",
    "optimizer.weight_decay=0.0",
]


def _quiet_log(line: str) -> None:
    if line.startswith(("[eval]", "[lora] warning", "[done]")):
        print("   ", line, file=sys.stderr, flush=True)


def _latest_step(run_dir: str) -> Optional[int]:
    from jaxformer.training.checkpoint import Checkpointer

    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        return None
    try:
        return int(Checkpointer(run_dir, create=False).read_meta(None)["step"])
    except Exception:  # noqa: BLE001 - no readable checkpoint: pretrain again
        return None


def pretrain(family: str, run_dir: str, steps: Optional[int]) -> dict:
    """train.py's run of PRETRAIN[family] (reused if run_dir already holds its last step)."""
    from jaxformer.training.config import load_experiment
    from jaxformer.training.loop import Trainer

    overrides = [f"run.dir={run_dir}", "checkpoint.async_save=false"]
    if steps is not None:
        overrides += [f"train.steps={steps}", f"optimizer.warmup_steps={min(20, steps)}"]
    cfg = load_experiment(os.path.join(ROOT, PRETRAIN[family]), overrides)
    if (_latest_step(run_dir) or -1) >= cfg.train.steps:
        print(f"[pretrain] {family}: reusing {run_dir}", file=sys.stderr, flush=True)
        return dict(family=family, run_dir=run_dir, steps=cfg.train.steps, reused=True)
    print(f"[pretrain] {family}: {PRETRAIN[family]}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    trainer = Trainer(cfg, show_progress=False, log=_quiet_log)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    return dict(
        family=family,
        run_dir=run_dir,
        steps=cfg.train.steps,
        reused=False,
        seconds=round(time.perf_counter() - start, 1),
        train_loss=result["train"].get("loss"),
    )


def finetune(
    task: Task, method: str, base: str, run_dir: str, steps: int, lr: float, batch: Optional[int]
) -> dict:
    """finetune.py's run of configs/finetune/TASK.yaml from `base`, full or LoRA, fresh."""
    import jax
    from flax import nnx

    from jaxformer.training.finetune import Finetuning, load_finetune
    from jaxformer.training.loop import Trainer

    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run (a leftover one would resume)
    overrides = [
        f"run.dir={run_dir}",
        f"train.steps={steps}",
        "train.eval_every=0",  # one evaluation, on the whole validation split, at the end
        f"train.log_every={min(10, steps)}",
        f"checkpoint.every={steps}",
        "checkpoint.async_save=false",
        f"optimizer.learning_rate={lr}",
        f"optimizer.warmup_steps={min(20, max(steps // 10, 1))}",
    ]
    if batch:
        overrides.append(f"task.batch_size={batch}")
    if method == "lora":
        overrides += LORA
        if task.head:
            overrides.append(f"finetune.lora.train_also=[{','.join(task.head)}]")
    config = os.path.join(ROOT, "configs", "finetune", f"{task.name}.yaml")
    start = time.perf_counter()
    cfg, meta = load_finetune(base, None, config, overrides)
    trainer = Trainer(cfg, Finetuning(meta), show_progress=False, log=_quiet_log)
    try:
        model = nnx.merge(trainer.graphdef, trainer.state)[0]
        leaves = jax.tree.leaves(nnx.state(model, trainer.trainable))
        trainable = int(sum(math.prod(x.shape) for x in leaves))
        total = int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
        result = trainer.run()
    finally:
        trainer.close()
    val = result["validation"]
    return dict(
        task=task.name,
        method=method,
        metric=task.metric,
        score=task.percent * float(val[task.metric]),
        validation={k: float(v) for k, v in val.items() if isinstance(v, (int, float))},
        train_loss=result["train"].get("loss"),
        step_seconds=result["train"].get("step_seconds"),
        learning_rate=lr,
        steps=steps,
        batch_size=cfg.task.batch_size,
        trainable_params=trainable,
        model_params=total,
        seconds=round(time.perf_counter() - start, 1),
    )


def _ratio(lora: float, full: float) -> Optional[float]:
    return lora / full if full else None


def table(rows: list[dict]) -> str:
    """A Markdown table: one line per task, full FT against LoRA."""
    head = (
        "| task | metric (%) | full FT | LoRA | LoRA/full | trainable full | trainable LoRA "
        "| lr full / LoRA | wall full (s) | wall LoRA (s) |\n"
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"
    )
    lines = [head]
    for r in rows:
        f, lo = r["full"], r["lora"]
        lines.append(
            f"| {r['task']} | {r['metric']} | {f['score']:.2f} | {lo['score']:.2f} | "
            f"{'n/a' if r['ratio'] is None else format(r['ratio'], '.3f')} | {f['trainable_params']:,} | {lo['trainable_params']:,} "
            f"({100 * lo['trainable_params'] / f['trainable_params']:.1f}%) | "
            f"{f['learning_rate']:g} / {lo['learning_rate']:g} | {f['seconds']:.0f} | "
            f"{lo['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True, help="pretraining and fine-tuning runs go here")
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps of each run")
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=None,
        help="pretraining steps (default: each configs/*_tiny.yaml's own)",
    )
    parser.add_argument("--batch", type=int, default=None, help="task.batch_size (default: 16)")
    parser.add_argument(
        "--lora-lr-scale",
        type=float,
        default=5.0,
        help="LoRA learning rate = this x the task config's full fine-tuning rate",
    )
    parser.add_argument(
        "--tasks", default=",".join(t.name for t in TASKS), help="comma-separated task names"
    )
    parser.add_argument(
        "--pretrained",
        action="append",
        default=[],
        metavar="FAMILY=DIR",
        help="reuse this run for a family (encoder, encoder_decoder, decoder)",
    )
    parser.add_argument(
        "--methods",
        default="full,lora",
        help="which of full,lora to run (one of them: e.g. a LoRA learning-rate sweep)",
    )
    parser.add_argument("--json", default=None, help="write the results here too")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: code_package and code_docstring only, 3 pretraining and 4 fine-tuning "
        "steps, batch 4",
    )
    args = parser.parse_args(argv)
    names = args.tasks.split(",")
    if args.quick:
        args.steps, args.pretrain_steps, args.batch = 4, 3, 4
        if "--tasks" not in (argv if argv is not None else sys.argv):
            names = ["code_package", "code_docstring"]
    tasks = [t for t in TASKS if t.name in names]
    unknown = set(names) - {t.name for t in tasks}
    if unknown:
        parser.error(f"unknown tasks {sorted(unknown)}; known: {[t.name for t in TASKS]}")
    methods = args.methods.split(",")
    if not methods or not set(methods) <= {"full", "lora"}:
        parser.error(f"--methods {args.methods!r}: give full, lora or full,lora")
    given = dict(p.split("=", 1) for p in args.pretrained)
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)

    bases, pretraining = {}, []
    for family in dict.fromkeys(t.family for t in tasks):
        if family in given:
            bases[family] = os.path.abspath(given[family])
            continue
        run_dir = os.path.join(workdir, "pretrain", family)
        pretraining.append(pretrain(family, run_dir, args.pretrain_steps))
        bases[family] = run_dir

    rows = []
    for task in tasks:
        runs = {}
        for method, lr in (("full", task.full_lr), ("lora", task.full_lr * args.lora_lr_scale)):
            if method not in methods:
                continue
            print(f"[finetune] {task.name} {method} lr {lr:g}", file=sys.stderr, flush=True)
            run_dir = os.path.join(workdir, "finetune", f"{task.name}-{method}")
            runs[method] = finetune(
                task, method, bases[task.family], run_dir, args.steps, lr, args.batch
            )
        full, lora = runs.get("full"), runs.get("lora")
        ratio = _ratio(lora["score"], full["score"]) if full and lora else None
        rows.append(dict(task=task.name, metric=task.metric, full=full, lora=lora, ratio=ratio))
        scores = ", ".join(f"{m} {r['score']:.3f}" for m, r in runs.items())
        print(f"[result] {task.name} {task.metric}: {scores}", file=sys.stderr, flush=True)

    report = dict(
        steps=args.steps,
        lora_lr_scale=args.lora_lr_scale,
        lora=LORA,
        pretraining=pretraining,
        bases=bases,
        rows=rows,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if len(methods) == 2:
        print(table(rows))
    print(json.dumps(report))  # the last line: the whole report, for scripts
    return 0


if __name__ == "__main__":
    sys.exit(main())
