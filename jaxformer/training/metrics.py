"""Metric sinks (JSON lines, TensorBoard) and derived figures: MFU, perplexity, bits per byte."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import jax
import numpy as np

from jaxformer.models.config import ModelConfig

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


def flops_per_token(cfg: ModelConfig, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N for the matmuls plus the attention score/value products."""
    layers = cfg.num_layers + (cfg.decoder_layers if cfg.family == "encoder_decoder" else 0)
    attention = 12 * layers * seq_len * cfg.num_heads * cfg.dims_per_head
    return 6.0 * num_params + attention


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


class MetricsWriter:
    """One JSON line per logged step in <run_dir>/metrics.jsonl, plus TensorBoard event files."""

    def __init__(self, run_dir: str, *, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # heavy import only for the process that logs

        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        """Appends one record; numbers only, converted to Python floats."""
        if not self.enabled:
            return
        record = {"step": int(step), "split": prefix}
        for key, value in metrics.items():
            value = float(value)
            record[key] = value
            self._tb.add_scalar(f"{prefix}/{key}", value, step)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        """Flushes and closes both sinks."""
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """All records of <run_dir>/metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
