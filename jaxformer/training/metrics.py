"""Metric sinks (JSON lines, TensorBoard, Weights & Biases) and derived figures: peak FLOP/s
for MFU, perplexity, bits per byte."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
from collections.abc import Callable
from typing import Any, Optional

import jax
import numpy as np

# Dense bf16 peak FLOP/s per chip, by the start of jax.Device.device_kind.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA GH200": 989e12,
    "NVIDIA B200": 2250e12,
}


def detect_peak_flops(device: Optional[jax.Device] = None) -> float:
    """Peak FLOP/s of a known accelerator, or 0.0 (unknown: no MFU is reported)."""
    kind = (device or jax.devices()[0]).device_kind
    for prefix, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(prefix):
            return flops
    return 0.0


def token_byte_lengths(tokenizer) -> np.ndarray:
    """[vocab] UTF-8 bytes each token id stands for (0 for special tokens): the tokenizer says."""
    return np.asarray(tokenizer.token_byte_lengths(), np.float64)


def summarize_eval(sums: dict[str, float]) -> dict[str, float]:
    """Loss, accuracy, perplexity and bits per byte from summed eval totals."""
    weight = max(sums["weight_sum"], 1.0)
    loss = sums["loss_sum"] / weight
    out = dict(
        loss=loss, accuracy=sums["correct_sum"] / weight, perplexity=math.exp(min(loss, 50.0))
    )
    if sums.get("byte_sum"):
        out["bits_per_byte"] = sums["loss_sum"] / math.log(2) / sums["byte_sum"]
    return out


def sum_over_processes(values) -> np.ndarray:
    """Float64 sums, over all processes, of each process's host-side vector of totals."""
    local = np.ascontiguousarray(values, np.float64).reshape(-1)
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    # Without jax_enable_x64 a float64 gather would round to float32; int32 words travel exactly.
    gathered = multihost_utils.process_allgather(local.view(np.int32))
    # Summed in process order, so every host gets the same bits.
    return np.ascontiguousarray(gathered).view(np.float64).sum(axis=0)


def unigram_log_probs_from_counts(counts_V: np.ndarray) -> np.ndarray:
    """[V] add-one-smoothed log-probabilities from token counts."""
    counts = counts_V.astype(np.float64) + 1.0
    return np.log(counts / counts.sum())


METRICS_FILE = "metrics.jsonl"
TORN_SUFFIX = ".torn"  # where a torn last line of metrics.jsonl is set aside


def set_aside_torn_line(path: str) -> Optional[str]:
    """Moves an unfinished last line of a JSON-lines file (a kill or a full disk in mid-write)
    to `path + '.torn'`, so the file is valid again and the next record starts on its own line;
    returns a line saying so, or None when the file ends cleanly."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    with open(path, "rb+") as f:
        start = max(size - (1 << 20), 0)  # a record is far shorter than 1 MiB
        f.seek(start)
        tail = f.read()
        if tail.endswith(b"\n"):
            return None
        cut = tail.rfind(b"\n") + 1  # 0 when the whole tail is one unfinished line
        torn = tail[cut:]
        with open(path + TORN_SUFFIX, "ab") as aside:
            aside.write(torn + b"\n")
        f.truncate(start + cut)
    return (
        f"[metrics] {path} ended in an unfinished line ({len(torn)} bytes, from a run stopped "
        f"in mid-write); moved it to {path + TORN_SUFFIX} so the file stays valid JSON lines"
    )


WANDB_ID_FILE = "wandb_run_id"  # a resumed run directory continues the same W&B run


@dataclasses.dataclass(frozen=True)
class WandbSettings:
    """Where a W&B run logs (the `run.wandb_*` settings) and the config it records."""

    project: str
    name: str = ""
    entity: str = ""
    mode: str = ""
    """online, offline, disabled; '' follows WANDB_MODE."""
    config: Optional[dict[str, Any]] = None


def require_wandb(project: str) -> None:
    """MissingDependency, before any work, when `project` is set and wandb is not installed."""
    if project:
        from jaxformer.training.cli import require

        require("wandb", "wandb", f"run.wandb_project={project!r} (Weights & Biases logging)")


def start_wandb(run_dir: str, settings: WandbSettings, log: Callable[[str], None]) -> Any:
    """A W&B run beside metrics.jsonl: its files under WANDB_DIR, else <run_dir>/wandb; the
    same W&B run again when `run_dir` is resumed (its id is kept in <run_dir>/wandb_run_id)."""
    import wandb

    id_path = os.path.join(run_dir, WANDB_ID_FILE)
    if os.path.exists(id_path):
        with open(id_path, encoding="utf-8") as f:
            run_id = f.read().strip()
    else:
        run_id = secrets.token_hex(4)
        with open(id_path, "w", encoding="utf-8") as f:
            f.write(run_id + "\n")
    run = wandb.init(
        project=settings.project,
        name=settings.name or None,
        entity=settings.entity or None,
        mode=settings.mode or None,
        id=run_id,
        resume="allow",
        dir=None if os.environ.get("WANDB_DIR") else run_dir,
    )
    # A resumed run may record changed settings (more steps, ...), as config.yaml does.
    run.config.update(settings.config or {}, allow_val_change=True)
    log(f"[wandb] project {settings.project}, run {run.id} ({run.settings.mode}): {run.dir}")
    return run


class MetricsWriter:
    """One JSON line per logged step in <run_dir>/metrics.jsonl, plus TensorBoard event files
    and, with `wandb` settings, the same scalars (named as in TensorBoard) in a W&B run."""

    def __init__(
        self,
        run_dir: str,
        *,
        enabled: bool = True,
        log: Callable[[str], None] = print,
        wandb: Optional[WandbSettings] = None,
    ):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # heavy import only for the process that logs

        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, METRICS_FILE)
        said = set_aside_torn_line(path)
        if said:
            log(said)
        self._jsonl = open(path, "a", encoding="utf-8")
        self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        self._wandb = None
        if wandb is not None and wandb.project:
            self._wandb = start_wandb(run_dir, wandb, log)

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        """Appends one record; numbers only, converted to Python floats."""
        if not self.enabled:
            return
        record = {"step": int(step), "split": prefix}
        scalars = {}
        for key, value in metrics.items():
            value = float(value)
            record[key] = value
            scalars[f"{prefix}/{key}"] = value
            self._tb.add_scalar(f"{prefix}/{key}", value, step)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))

    def close(self) -> None:
        """Flushes and closes every sink."""
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()
                self._wandb = None


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """All records of <run_dir>/metrics.jsonl; a ValueError names the file and line of one that
    is not a JSON object."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                record = err
            if not isinstance(record, dict):
                why = record.msg if isinstance(record, json.JSONDecodeError) else "not an object"
                raise ValueError(
                    f"{path}, line {number}: not a JSON record ({why}); move that line out of "
                    "the file (a resumed run sets an unfinished last line aside itself)"
                )
            records.append(record)
    return records
