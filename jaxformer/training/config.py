"""The whole run's configuration: one frozen dataclass per component, composed and loaded."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from jaxformer.config import ConfigError, config_from_dict, load_config, read_yaml
from jaxformer.data.config import DataConfig
from jaxformer.models.config import PRESETS, ModelConfig, preset
from jaxformer.sharding import MeshConfig
from jaxformer.training.optimizer import OptimizerConfig

OBJECTIVE_OF_FAMILY = {"decoder": "causal_lm", "encoder": "masked_lm",
                       "encoder_decoder": "span_corruption"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Length of the run and what happens along the way."""

    steps: int = 300
    """Optimizer updates in the whole run."""
    seed: int = 0
    """Seeds parameter init, dropout and the data order."""
    log_every: int = 10
    eval_every: int = 100
    """Steps between validation passes (0: only at the end)."""
    eval_batches: int = 8
    nonfinite: str = "stop"
    """A step whose loss or gradients are NaN/Inf is never applied; then 'stop' ends the run with
    a message naming the step, 'skip' goes on with the next batch (counted as skipped_steps)."""
    z_loss: float = 0.0
    """Weight of the z-loss (mean squared log-normaliser of the logits) added to the training
    loss; 0 disables it. Logged as z_loss."""
    loss_chunk_size: int = 512
    """Positions per chunk of the cross-entropy, so [batch, length, vocab] logits never exist
    at once; 0 computes the whole logits (same loss within float rounding)."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one device for MFU; 0 detects known accelerators (CPU: no MFU)."""
    sample_prompt: str = "def fibonacci(n):"
    """Prompt continued greedily at the end of a decoder run ('' to skip)."""
    sample_tokens: int = 48

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {self.steps}")
        if self.log_every < 1 or self.eval_every < 0 or self.eval_batches < 0:
            raise ValueError("train.log_every must be >= 1; eval_every and eval_batches >= 0")
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"train.nonfinite={self.nonfinite!r} is not one of stop, skip")
        if self.z_loss < 0 or self.loss_chunk_size < 0:
            raise ValueError("train.z_loss and train.loss_chunk_size must be >= 0")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When and how many orbax checkpoints are written."""

    every: int = 100
    """Steps between checkpoints (the last step is always saved)."""
    keep: int = 3
    """Keep the newest K checkpoints."""
    async_save: bool = True
    """Write checkpoints in the background while training continues."""

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep < 1:
            raise ValueError("checkpoint.every and checkpoint.keep must be >= 1")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where the run lives."""

    dir: str = "runs/default"
    """Run directory: resolved config, tokenizer, metrics.jsonl, TensorBoard events, checkpoints."""


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything `train.py` needs; written resolved to <run.dir>/config.yaml."""

    model: ModelConfig = dataclasses.field(default_factory=lambda: preset("gpt-tiny"))
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    @property
    def objective(self) -> str:
        """The data objective, 'auto' resolved from the model family."""
        if self.data.objective == "auto":
            return OBJECTIVE_OF_FAMILY[self.model.family]
        return self.data.objective


def _preset_name(yaml_path: Optional[str], overrides: Sequence[str]) -> Optional[str]:
    name = None
    if yaml_path is not None:
        model = read_yaml(yaml_path).get("model") or {}
        name = model.get("preset") if isinstance(model, dict) else None
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "model.preset":
            name = value.strip()
    return name or None


def load_experiment(yaml_path: Optional[str] = None,
                    overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Defaults, then the model preset the YAML or overrides name, the YAML, the overrides."""
    name = _preset_name(yaml_path, overrides)
    base: dict[str, Any] = {}
    if name is not None:
        if name not in PRESETS:
            try:
                preset(name)
            except ValueError as err:
                raise ConfigError(f"model.preset: {err}") from None
        base = {"model": dataclasses.asdict(preset(name))}
    cfg = load_config(ExperimentConfig, yaml_path, overrides, base=base)
    if cfg.objective not in OBJECTIVE_OF_FAMILY.values():
        raise ConfigError(f"data.objective={cfg.data.objective!r} is not one of auto, "
                          f"{', '.join(OBJECTIVE_OF_FAMILY.values())}")
    return cfg


def experiment_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Rebuilds a stored (resolved) config, e.g. from a checkpoint."""
    return config_from_dict(ExperimentConfig, data)
