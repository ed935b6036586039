"""What a Trainer trains on: the part of a run that differs between pretraining and fine-tuning.

A `Trainer` owns the mesh, the sharded state, the jitted steps, the loop, checkpoints and metrics;
a `Workload` supplies the rest: data and tokenizer, batch shape, tokens per step, the optimizer
(e.g. with frozen parameters), initial parameters (e.g. from a pretrained checkpoint) and the
evaluation. `Pretraining` (jaxformer.training.pretraining) and `Finetuning`
(jaxformer.training.finetune) are the two built in; another project can write its own and
`register` it, so that the runs it writes (which record the workload's name) open again.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, ClassVar, Optional

import optax
from flax import nnx

from jaxformer import sharding as shard_lib
from jaxformer.data.config import DataConfig
from jaxformer.data.tokenizer import Tokenizer
from jaxformer.training.optimizer import make_optimizer


@dataclasses.dataclass(frozen=True)
class RunEnv:
    """Where and how a run happens, for a workload that prepares data or loads weights."""

    run_dir: str
    mesh: Any
    rules: Any
    log: Callable[[str], None] = print
    show_progress: bool = True


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """One model's evaluation step on the mesh: put host rows on the devices, get loss sums."""

    env: RunEnv
    step: Callable[[Any, dict], tuple]
    """The jitted `(state, sharded batch) -> (sums, predictions)`."""
    state: Any
    graphdef: Any

    def __call__(self, local: dict) -> tuple[dict, dict, Any]:
        """(the sharded batch, its loss sums, its predictions) for this process's rows."""
        batch = shard_lib.shard_batch(local, self.env.mesh, self.env.rules)
        sums, predictions = self.step(self.state, batch)
        return batch, sums, predictions

    def model(self) -> nnx.Module:
        """The evaluated model in evaluation mode (for generation metrics)."""
        model = nnx.merge(self.graphdef, self.state)[0]
        model.eval()
        return model


class Workload(abc.ABC):
    """Data, optimizer, initial parameters and evaluation of one kind of run.

    The Trainer calls `prepare` once, before it builds any state; until then only `batch_size`
    is used (to check the mesh split before any data is read).
    """

    name: ClassVar[str]
    """Recorded in every checkpoint the workload's runs write; `workload_class` finds it again."""
    config_type: ClassVar[type]
    """The frozen config dataclass of its runs (with model, optimizer, mesh, checkpoint, train and
    run sections, as `training.config.TrainerSections` says)."""

    @classmethod
    def for_run(cls, meta: dict) -> Workload:
        """The workload that reads back a run of this kind (`meta`: its checkpoint's)."""
        return cls()

    def with_eval_split(self, cfg: Any, split: str) -> Any:
        """`cfg` evaluating on another split of its data."""
        raise ValueError(f"a {self.name} run has no other evaluation split to choose")

    tokenizer: Tokenizer
    batcher: Any
    """Training batches: `.batch(step, process_index, process_count) -> dict of numpy rows`."""

    @abc.abstractmethod
    def batch_size(self, cfg: Any) -> int:
        """Global batch size in rows."""

    @abc.abstractmethod
    def prepare(self, cfg: Any, meta: Optional[dict], env: RunEnv) -> Any:
        """Reads data and builds the tokenizer and batchers; returns the config with what the data
        decides (vocabulary size, number of labels) filled in. `meta` is the run's own
        checkpoint's, when it has one."""

    @abc.abstractmethod
    def tokens_per_step(self, cfg: Any) -> int:
        """Target tokens a step trains on (for tokens/s and MFU)."""

    def row_lengths(self, cfg: Any) -> tuple[int, int]:
        """(input length, target length) of a training row, for the model FLOPs behind MFU
        (`jaxformer.models.flops.step_flops`); the target length is 0 but for an
        encoder-decoder. Default: tokens_per_step over the batch, as both."""
        length = self.tokens_per_step(cfg) // self.batch_size(cfg)
        return length, length if cfg.model.family == "encoder_decoder" else 0

    @abc.abstractmethod
    def evaluate(
        self, evaluator: Evaluator, cfg: Any, num_batches: Optional[int]
    ) -> dict[str, float]:
        """Validation metrics of the evaluator's model."""

    def prefetch_options(self, cfg: Any) -> dict[str, int]:
        """Background threads and batches made ahead for the training input; default: the data
        section's defaults."""
        defaults = DataConfig()
        return dict(threads=defaults.prefetch_threads, buffer=defaults.prefetch)

    def optimizer(self, cfg: Any) -> optax.GradientTransformation:
        """The optax transformation (AdamW/Adafactor with the config's schedule). The logged
        `learning_rate` is always cfg.optimizer's schedule, whatever this returns."""
        return make_optimizer(cfg.optimizer, cfg.train.steps)

    def trainable(self, cfg: Any) -> nnx.filterlib.Filter:
        """Which variables train (get gradients and optimizer state); default: every parameter.
        Frozen prefixes and adapters are filters here."""
        return nnx.Param

    def adapt_model(self, model: nnx.Module, cfg: Any) -> None:  # noqa: B027
        """Changes a freshly created model in place before its state is sharded (e.g. adds LoRA
        adapters); called for fresh, resumed and read-only runs alike. Default: none."""

    def saved_state(self, cfg: Any) -> Optional[nnx.filterlib.Filter]:
        """Which model variables checkpoints hold (the optimizer state always goes with them);
        None (the default): all. With a filter, `initialize` rebuilds the rest on every start,
        resumed and read-only runs included (a LoRA run saves only its adapters)."""
        return None

    def initialize(self, model: nnx.Module, cfg: Any, env: RunEnv) -> None:  # noqa: B027
        """Changes a fresh (not resumed) run's initial parameters in place; default: none."""

    def hf_head(self, cfg: Any) -> Optional[str]:
        """The head `convert to-hf` records for this run's model (None: the family's default)."""
        return None

    def sample_prompts(self, cfg: Any) -> tuple[str, ...]:
        """Prompts whose greedy continuations `eval.py` shows by default; default: none."""
        return ()


# name -> class; the built-in workloads register when their module is imported, so the table
# names where to find them without importing them here (they import this module).
_REGISTRY: dict[str, type[Workload]] = {}
_BUILT_IN = {
    "pretraining": "jaxformer.training.pretraining",
    "finetuning": "jaxformer.training.finetune",
}


def register(cls: type[Workload]) -> type[Workload]:
    """Class decorator: makes runs of this workload (recorded by `cls.name`) readable again."""
    _REGISTRY[cls.name] = cls
    return cls


def workload_class(name: str) -> type[Workload]:
    """The registered workload of that name (the one a checkpoint records)."""
    if name not in _REGISTRY and name in _BUILT_IN:
        importlib.import_module(_BUILT_IN[name])
    if name not in _REGISTRY:
        known = sorted(set(_REGISTRY) | set(_BUILT_IN))
        raise ValueError(
            f"no workload named {name!r} is registered (known: {', '.join(known)}); import the "
            "module that registers it (jaxformer.training.workload.register) before reading the run"
        )
    return _REGISTRY[name]


def workload_for_config(cfg: Any) -> Workload:
    """The built-in workload whose runs use `cfg`'s type (an ExperimentConfig -> Pretraining,
    a FinetuneExperiment -> Finetuning); other workloads are always passed explicitly."""
    for name in _BUILT_IN:
        cls = workload_class(name)
        if isinstance(cfg, cls.config_type):
            return cls()
    raise TypeError(f"no registered workload trains a {type(cfg).__name__}; pass one to Trainer")


def run_config(meta: dict, run_dir: str) -> tuple[Workload, Any]:
    """(the workload that wrote a checkpoint, its stored config typed, pointing at `run_dir`)."""
    from jaxformer.config import config_from_dict

    workload = workload_class(meta["workload"]).for_run(meta)
    stored = dict(meta["config"], run={"dir": run_dir})
    return workload, config_from_dict(workload.config_type, stored)
