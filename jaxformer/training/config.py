"""The whole run's configuration: one frozen dataclass per component, composed and loaded."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Optional, Protocol

from jaxformer.config import (
    ConfigError,
    check_choice,
    config_from_dict,
    config_to_dict,
    load_config,
    read_yaml,
)
from jaxformer.data.config import DataConfig
from jaxformer.models import OBJECTIVE_OF_FAMILY
from jaxformer.models.config import PRESETS, ModelConfig, preset
from jaxformer.sharding import MeshConfig
from jaxformer.training.optimizer import OptimizerConfig


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
    spike_factor: float = 0.0
    """Skip an update whose loss or gradient norm exceeds this multiple of its running mean
    (counted and logged as spike_steps; the running means are checkpointed); 0 disables."""
    spike_window: int = 100
    """Updates the running means reach back over."""
    spike_warmup: int = 20
    """Updates averaged before spikes are checked."""
    loss_chunk_size: int = 512
    """Positions per chunk of the cross-entropy, so [batch, length, vocab] logits never exist
    at once; 0 computes the whole logits (same loss within float rounding)."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one device for MFU; 0 detects known accelerators (CPU: no MFU)."""
    sample_prompt: Optional[str] = "def fibonacci(n):"
    """Prompt continued greedily at the end of a decoder run ('' to skip; the shell turns
    `train.sample_prompt=''` into an empty value, read as '')."""
    sample_tokens: int = 48
    step_timeout: float = 0.0
    """Seconds a step or a save may make no progress before the run prints every thread's Python
    stack and exits with status 76, so a scheduler restarts it (the rerun resumes from the last
    checkpoint); the first steps, the first save and each validation get 10x (they compile).
    0 disables."""
    profile_steps: tuple[int, ...] = ()
    """[first, last] steps (as logged, from 1) to record a `jax.profiler` trace of, into
    <run.dir>/profile (TensorBoard/XProf, and Perfetto's perfetto_trace.json.gz); only process 0
    traces. Empty: no trace."""

    def __post_init__(self) -> None:
        if self.sample_prompt is None:
            object.__setattr__(self, "sample_prompt", "")
        if self.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {self.steps}")
        if self.log_every < 1 or self.eval_every < 0 or self.eval_batches < 0:
            raise ValueError("train.log_every must be >= 1; eval_every and eval_batches >= 0")
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"train.nonfinite={self.nonfinite!r} is not one of stop, skip")
        if self.spike_factor and self.spike_factor <= 1.0:
            raise ValueError(
                f"train.spike_factor must be > 1 (or 0 to disable), got {self.spike_factor}"
            )
        if self.spike_window < 1 or self.spike_warmup < 0:
            raise ValueError("train.spike_window must be >= 1 and train.spike_warmup >= 0")
        if self.step_timeout < 0:
            raise ValueError(f"train.step_timeout must be >= 0, got {self.step_timeout}")
        if self.z_loss < 0 or self.loss_chunk_size < 0:
            raise ValueError("train.z_loss and train.loss_chunk_size must be >= 0")
        self._check_profile_steps()

    def _check_profile_steps(self) -> None:
        given = list(self.profile_steps)
        if not given:
            return
        if len(given) != 2 or not (1 <= given[0] <= given[1]):
            raise ValueError(
                f"train.profile_steps={given} is not a range [first, last] of steps with "
                "1 <= first <= last (e.g. train.profile_steps=[20,25]; [] for no trace)"
            )
        if given[1] > self.steps:
            raise ValueError(
                f"train.profile_steps={given} ends after the run's last step "
                f"(train.steps={self.steps}); choose steps within it"
            )


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When and how many orbax checkpoints are written."""

    every: int = 100
    """Steps between checkpoints (the last step is always saved)."""
    keep: int = 3
    """Keep the newest K checkpoints (at least 2 stay on disk, so a damaged newest one can fall
    back to the one before)."""
    async_save: bool = True
    """Write checkpoints in the background while training continues."""
    keep_every: int = 0
    """Also keep, for good, each checkpoint whose step is a multiple of this (durable older steps
    beside the rolling `keep`, e.g. to go back past a slow divergence); 0: only the rolling ones."""

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep < 1:
            raise ValueError("checkpoint.every and checkpoint.keep must be >= 1")
        if self.keep_every < 0:
            raise ValueError(f"checkpoint.keep_every must be >= 0, got {self.keep_every}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where the run lives."""

    dir: str = "runs/default"
    """Run directory: resolved config, tokenizer, metrics.jsonl, TensorBoard events, checkpoints."""
    wandb_project: str = ""
    """Also log the metrics and the config to this Weights & Biases project (process 0 only;
    needs `pip install -e '.[wandb]'`); '' logs to TensorBoard and metrics.jsonl alone."""
    wandb_name: str = ""
    """The W&B run's display name ('' lets W&B choose)."""
    wandb_entity: str = ""
    """The W&B team or user ('' : your default entity)."""
    wandb_mode: str = ""
    """online, offline (files under WANDB_DIR, else <run.dir>/wandb; `wandb sync` them later) or
    disabled; '' follows the WANDB_MODE variable (default online)."""

    def __post_init__(self) -> None:
        if self.wandb_mode:  # '' follows WANDB_MODE
            check_choice("run.wandb_mode", self.wandb_mode, WANDB_MODES)


WANDB_MODES = ("online", "offline", "disabled")


class TrainerSections(Protocol):
    """The sections a Trainer reads, whatever the workload's config adds (data, task...)."""

    @property
    def model(self) -> ModelConfig: ...
    @property
    def optimizer(self) -> OptimizerConfig: ...
    @property
    def mesh(self) -> MeshConfig: ...
    @property
    def checkpoint(self) -> CheckpointConfig: ...
    @property
    def train(self) -> TrainConfig: ...
    @property
    def run(self) -> RunConfig: ...


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


def load_experiment(
    yaml_path: Optional[str] = None, overrides: Sequence[str] = ()
) -> ExperimentConfig:
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
    check_experiment(cfg)
    return cfg


def check_experiment(cfg: ExperimentConfig) -> None:
    """Checks between sections, made before any work (tokenizer, token caches, run directory),
    each naming the override that fixes it (ModelConfig checks its own sizes)."""
    if cfg.objective not in OBJECTIVE_OF_FAMILY.values():
        raise ConfigError(
            f"data.objective={cfg.data.objective!r} is not one of auto, "
            f"{', '.join(OBJECTIVE_OF_FAMILY.values())}"
        )
    # Span corruption makes encoder and decoder inputs; the other objectives one sequence.
    if (cfg.objective == "span_corruption") != (cfg.model.family == "encoder_decoder"):
        raise ConfigError(
            f"data.objective={cfg.data.objective} does not fit a "
            f"model.family={cfg.model.family} model; set data.objective=auto "
            f"({OBJECTIVE_OF_FAMILY[cfg.model.family]})"
        )
    check_schedule(cfg.optimizer, cfg.train.steps)
    data, model = cfg.data, cfg.model
    try:
        model.check_length(data.seq_len, "data.seq_len")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.objective == "span_corruption":
        from jaxformer.data.objectives import span_corruption_raw_length

        try:
            span_corruption_raw_length(
                data.seq_len, data.target_len, data.noise_density, data.mean_noise_span
            )
        except ValueError as err:
            raise ConfigError(f"{err}; raise data.target_len or data.seq_len") from None
    check_host_memory(cfg)
    if data.tokenizer_path and not os.path.isfile(data.tokenizer_path):
        raise ConfigError(
            f"data.tokenizer_path={data.tokenizer_path!r} is not a file; give an "
            "existing sentencepiece .model, or data.tokenizer_path='' to train one"
        )


def available_memory() -> Optional[int]:
    """Bytes of memory available to a new allocation on this host (MemAvailable), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # not Linux: free pages, an underestimate that still catches absurd batches
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if num_bytes < 1024 or unit == "TiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    return ""


def batch_host_bytes(cfg: ExperimentConfig) -> tuple[int, int]:
    """(bytes of one batch on this host, bytes of the batches alive at once: the prefetch buffer,
    the one being built and its stacked copy). A row is int32/float32 arrays: five of seq_len
    (inputs, targets, weights, segments, positions), or for span corruption three of seq_len
    and five of target_len."""
    data = cfg.data
    if cfg.objective == "span_corruption":
        row = 4 * (3 * data.seq_len + 5 * data.target_len)
    else:
        row = 4 * 5 * data.seq_len
    rows = data.batch_size // max(cfg.mesh.num_processes, 1)  # each host builds its share
    one = rows * row
    return one, one * (data.prefetch + 2)


def check_host_memory(cfg: ExperimentConfig) -> None:
    """Refuses a batch (with its prefetch buffer) larger than this host's available memory,
    before a run grows towards it for minutes."""
    available = available_memory()
    if available is None:
        return
    one, alive = batch_host_bytes(cfg)
    if alive <= available:
        return
    data = cfg.data
    fits = max(data.batch_size * available // alive // 2, 1)  # half the memory, for the rest
    raise ConfigError(
        f"data.batch_size={data.batch_size} (data.seq_len={data.seq_len}): one batch takes "
        f"{_size(one)} of host memory, {_size(alive)} with data.prefetch={data.prefetch} "
        f"batches made ahead, but this host has {_size(available)} available; lower "
        f"data.batch_size (e.g. data.batch_size={fits}) or data.prefetch"
    )


def check_schedule(optimizer: OptimizerConfig, steps: int) -> None:
    """The learning-rate schedule fits the run (the checks make_schedule makes, made early)."""
    warmup = optimizer.warmup_steps
    if warmup > steps and optimizer.schedule != "inverse_sqrt":
        raise ConfigError(
            f"optimizer.warmup_steps={warmup} exceeds train.steps={steps} (the run "
            f"would end before its peak learning rate); set optimizer.warmup_steps"
            f"=<={steps} (e.g. optimizer.warmup_steps={steps // 10}) or "
            f"train.steps=>={warmup}"
        )
    if optimizer.schedule == "warmup_stable_decay":
        decay_steps = max(round(optimizer.decay_fraction * steps), 1)
        if steps - decay_steps < warmup:
            raise ConfigError(
                f"optimizer.warmup_steps={warmup} overlaps the decay phase of warmup_stable_decay "
                f"(the last {decay_steps} of train.steps={steps}); set optimizer.warmup_steps=<="
                f"{steps - decay_steps} or lower optimizer.decay_fraction"
            )


# ---------------------------------------------------------------------------------------------
# Resuming: which settings may differ from the ones the checkpoint was trained with.

# How long the run goes on, how it is watched, where it lives and how it is laid out on devices:
# none of these changes what the saved steps computed. (train.steps also re-spreads the schedule
# over the new length, which is what extending a run means.)
RESUME_CHANGEABLE = (
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.nonfinite",
    "train.loss_chunk_size",
    "train.peak_flops",
    "train.sample_prompt",
    "train.sample_tokens",
    "train.step_timeout",
    "train.profile_steps",
    "checkpoint.",
    "mesh.",
    "run.",
    "model.remat",
    "model.attention_impl",
    "model.scan_layers",
    "data.data_dir",
    "data.tokens_dir",
    "data.prepare_workers",
    "data.prefetch",
    "data.prefetch_threads",
    "task.data_dir",
)
# Filled in when the run is prepared (from the checkpoint's tokenizer and task) and compared
# then; the preset is only the name the model fields started from.
_RESOLVED_LATER = ("model.vocab_size", "model.num_labels", "model.preset")


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix[:-1]: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def _changeable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_CHANGEABLE)


def resume_changes(
    stored: dict[str, Any], cfg: Any
) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """([(key, checkpoint value, new value)] that may change on resume, [those that may not]),
    comparing the config stored in a checkpoint with the one asked for now."""
    old, new = _flat(stored), _flat(config_to_dict(cfg))
    allowed, refused = [], []
    for key, value in new.items():
        if key not in old or key in _RESOLVED_LATER or key == "run.dir" or old[key] == value:
            continue  # run.dir is where the run was found: always the one in use
        (allowed if _changeable(key) else refused).append((key, old[key], value))
    return allowed, refused


def model_changes(stored_model: dict[str, Any], model: ModelConfig) -> list[str]:
    """Once the run is prepared (vocabulary and labels resolved from its data): the model fields
    that differ from the checkpoint's and may not change on resume, as 'key: old vs new'."""
    return [
        f"{key}: checkpoint {stored_model[key]!r} vs config {value!r}"
        for key, value in config_to_dict(model).items()
        if key != "preset"
        and key in stored_model
        and not _changeable(f"model.{key}")
        and stored_model[key] != value
    ]


def check_resume(cfg: Any, stored: dict[str, Any], step: int, run_dir: str) -> str:
    """Refuses (ConfigError) a resume that would silently train a different run; returns a line
    naming the changeable settings that differ from the checkpoint's ('' when none)."""
    allowed, refused = resume_changes(stored, cfg)
    if refused:
        kind = (
            "a different model"
            if any(k.startswith("model.") for k, _, _ in refused)
            else "different settings"
        )
        shown = "; ".join(f"{k} {o!r} -> {n!r}" for k, o, n in refused[:8])
        more = f"; and {len(refused) - 8} more" if len(refused) > 8 else ""
        raise ConfigError(
            f"{run_dir} holds a checkpoint (step {step}) of a run trained with {kind}: {shown}"
            f"{more}. Resuming it so would silently make a different run: use a new run.dir, or "
            "drop these overrides to resume the run as it was (changeable on resume: "
            + ", ".join(k + "*" if k.endswith(".") else k for k in RESUME_CHANGEABLE)
            + ")"
        )
    steps = cfg.train.steps
    if steps < step:
        raise ConfigError(
            f"train.steps={steps} is below step {step}, where the checkpoint in "
            f"{run_dir} already is; give train.steps=>={step} to resume (more "
            "steps extend the run), or use a new run.dir"
        )
    if not allowed:
        return ""
    return (
        "[resume] settings changed since the checkpoint: "
        + ", ".join(f"{k} {o!r} -> {n!r}" for k, o, n in allowed)
        + "; config.yaml now records them"
    )


def experiment_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Rebuilds a stored (resolved) config, e.g. from a checkpoint."""
    return config_from_dict(ExperimentConfig, data)
