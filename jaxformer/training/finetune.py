"""Fine-tuning from a pretraining checkpoint: restored weights, a task head, frozen parts, own run."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Optional

import jax
from flax import nnx

from jaxformer import lora as lora_lib
from jaxformer import models
from jaxformer import sharding as shard_lib
from jaxformer.config import ConfigError, config_to_dict, load_config
from jaxformer.data.tasks import TaskConfig, load_task, task_batcher, tokenize_task_fields
from jaxformer.data.tokenizer import load_tokenizer
from jaxformer.models.config import ModelConfig
from jaxformer.sharding import MeshConfig
from jaxformer.training import cli, task_metrics
from jaxformer.training.checkpoint import Checkpointer, CheckpointError
from jaxformer.training.config import CheckpointConfig, RunConfig, TrainConfig, check_schedule
from jaxformer.training.loop import Trainer, run_to_exit_status
from jaxformer.training.optimizer import OptimizerConfig
from jaxformer.training.pretraining import EVAL_SEED
from jaxformer.training.workload import Evaluator, RunEnv, Workload, register, run_config

FAMILY_OF_KIND = models.FAMILY_OF_TASK_KIND


@dataclasses.dataclass(frozen=True)
class FinetuneSection:
    """Where the pretrained weights come from and what stays fixed."""

    from_dir: str = ""
    """Run directory of the pretraining (or converted) checkpoint, or 'hf:DIR' for a Hugging Face
    save_pretrained directory; set by --from."""
    from_step: Optional[int] = None
    """Checkpoint step to start from; None means the latest."""
    freeze: tuple[str, ...] = ()
    """Parameter path prefixes kept fixed, e.g. ['embed'] or ['embed', 'encoder_blocks']."""
    lora: lora_lib.LoraConfig = dataclasses.field(default_factory=lora_lib.LoraConfig)
    """Low-rank adapters (jaxformer.lora): with targets set, only the adapters (and
    lora.train_also) train, the base stays frozen in lora.base_dtype or quantized."""


@dataclasses.dataclass(frozen=True)
class FinetuneExperiment:
    """Everything `finetune.py` needs; the model section starts as the checkpoint's."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    finetune: FinetuneSection = dataclasses.field(default_factory=FinetuneSection)
    optimizer: OptimizerConfig = dataclasses.field(
        default_factory=lambda: OptimizerConfig(
            learning_rate=1e-3, warmup_steps=10, weight_decay=0.01
        )
    )
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(steps=200, eval_every=100, sample_prompt="")
    )
    run: RunConfig = dataclasses.field(default_factory=lambda: RunConfig(dir="runs/finetune"))


def load_finetune(
    from_dir: str, from_step: Optional[int], yaml_path: Optional[str], overrides: Sequence[str]
) -> tuple[FinetuneExperiment, dict]:
    """The fine-tuning config (model section from the checkpoint) and the checkpoint's metadata.

    The checkpoint may be of any registered workload (pretrained, converted, fine-tuned): its
    stored config is read as that workload's config type, and only its model section is taken.
    """
    if _is_hf(from_dir):
        meta = _hf_source().pretrained_meta(from_dir)
        source = _hf_source().HF_PREFIX + _hf_source().hf_directory(from_dir)
        model = meta["config"]["model"]
    else:
        meta = Checkpointer(from_dir, create=False).read_meta(from_step)
        _, stored = run_config(meta, os.path.abspath(from_dir))
        source, model = os.path.abspath(from_dir), config_to_dict(stored.model)
    base = {"model": model, "finetune": {"from_dir": source, "from_step": meta["step"]}}
    cfg = load_config(FinetuneExperiment, yaml_path, overrides, base=base)
    check_finetune(cfg)
    return cfg, meta


def _is_hf(from_dir: str) -> bool:
    return from_dir.startswith("hf:")


def _hf_source():
    """jaxformer.convert.source (the `hf` extra), imported only for an 'hf:DIR' start."""
    from jaxformer.convert import source

    return source


def check_finetune(cfg: FinetuneExperiment) -> None:
    """Checks between sections, made before any data is read or anything written."""
    check_schedule(cfg.optimizer, cfg.train.steps)
    cfg.finetune.lora.check()
    if cfg.finetune.lora.enabled and cfg.finetune.freeze:
        raise ConfigError(
            "finetune.freeze and finetune.lora.targets exclude each other (with LoRA only the "
            "adapters and finetune.lora.train_also train)"
        )
    kind = cfg.task.resolved().kind
    needed = FAMILY_OF_KIND[kind]
    if cfg.model.family != needed:
        raise CheckpointError(
            f"task {cfg.task.name!r} ({kind}) needs a model of family {needed!r}, but the "
            f"checkpoint in {cfg.finetune.from_dir} holds a {cfg.model.family!r} model"
        )
    lengths = [("task.max_input_len", cfg.task.max_input_len)]
    if kind == "text2text":
        lengths.append(("task.max_target_len", cfg.task.max_target_len))
    for key, length in lengths:
        try:
            cfg.model.check_length(length, key)
        except ValueError as err:
            raise ConfigError(f"{err} (the checkpoint's model)") from None


def _under(name: str, prefix: str) -> bool:
    """Whether the dotted parameter path `name` is `prefix` or lies below it."""
    return name == prefix or name.startswith(prefix + ".")


def check_freeze_prefixes(
    model_cfg: ModelConfig, prefixes: Sequence[str], key: str = "finetune.freeze"
) -> None:
    """A clear error for a `finetune.freeze` (or other `key`) prefix naming no parameter."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: models.create(model_cfg, rngs=nnx.Rngs(0)))
    names = [
        ".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    ]
    unused = sorted(p for p in prefixes if not any(_under(n, p) for n in names))
    if unused:
        # Layers are stacked on one axis, so per-layer prefixes such as blocks.0 are gone.
        tops = sorted({".".join(n.split(".")[:2]) for n in names})
        raise ValueError(
            f"{key} prefixes {unused} match no parameter; "
            f"parameter paths start with: {', '.join(tops)}"
        )


@register
class Finetuning(Workload):
    """A task's batches and metrics, a task head and pretrained weights, frozen parts."""

    name = "finetuning"
    config_type = FinetuneExperiment

    def __init__(self, pretrained_meta: Optional[dict] = None):
        """`pretrained_meta`: read_meta of the checkpoint the weights (and tokenizer) come from
        (default: read from cfg.finetune.from_dir when the run is prepared)."""
        self.pretrained_meta = pretrained_meta
        self.new_parameters: list[str] = []
        """Paths that kept their fresh initialisation (a new or resized task head)."""
        self.base_hash = ""
        """Content hash of the pretrained parameters `initialize` read (lora.content_hash)."""

    @classmethod
    def for_run(cls, meta: dict) -> Finetuning:
        # A fine-tuned run's own checkpoint holds the tokenizer and every weight it needs.
        return cls(meta)

    def with_eval_split(self, cfg: FinetuneExperiment, split: str) -> FinetuneExperiment:
        return dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, eval_split=split))

    def hf_head(self, cfg: FinetuneExperiment) -> Optional[str]:
        # An encoder's head is its task kind; only encoders get here, and their tasks are never
        # jsonl (whose kind 'auto' would read its maybe moved files).
        if cfg.model.family != FAMILY_OF_KIND["classification"]:
            return None
        return cfg.task.resolved().kind

    def batch_size(self, cfg: FinetuneExperiment) -> int:
        return cfg.task.batch_size

    def tokens_per_step(self, cfg: FinetuneExperiment) -> int:
        task = cfg.task
        return task.batch_size * (
            task.max_target_len if self.kind == "text2text" else task.max_input_len
        )

    def row_lengths(self, cfg: FinetuneExperiment) -> tuple[int, int]:
        task = cfg.task
        return task.max_input_len, task.max_target_len if self.kind == "text2text" else 0

    def prepare(
        self, cfg: FinetuneExperiment, meta: Optional[dict], env: RunEnv
    ) -> FinetuneExperiment:
        if self.pretrained_meta is None:
            from_dir = cfg.finetune.from_dir
            self.pretrained_meta = (
                _hf_source().pretrained_meta(from_dir)
                if _is_hf(from_dir)
                else Checkpointer(from_dir, create=False).read_meta(cfg.finetune.from_step)
            )
        source = meta if meta is not None else self.pretrained_meta
        if not source["tokenizer"]:
            raise CheckpointError(
                f"{cfg.finetune.from_dir} stores no tokenizer (a converted "
                "checkpoint?); fine-tuning needs one"
            )
        self.tokenizer = load_tokenizer(source["tokenizer"])
        train = load_task(cfg.task, cfg.task.train_split)
        evaluation = load_task(cfg.task, cfg.task.eval_split)
        self.kind = cfg.task.resolved().kind
        needed = FAMILY_OF_KIND[self.kind]
        if cfg.model.family != needed:
            raise CheckpointError(
                f"task {cfg.task.name!r} ({self.kind}) needs a model of family {needed!r}, but "
                f"the checkpoint in {cfg.finetune.from_dir} holds a {cfg.model.family!r} model"
            )
        model_cfg = cfg.model
        if self.kind in ("classification", "token_classification"):
            model_cfg = dataclasses.replace(model_cfg, num_labels=train.num_labels)
        elif self.kind == "question_answering":  # start and end logits
            model_cfg = dataclasses.replace(model_cfg, num_labels=2)
        self.label_names = getattr(train, "label_names", None)
        cfg = dataclasses.replace(cfg, model=model_cfg)
        # Text fields are tokenized once into token stores, as pretraining corpora are.
        fields = [
            tokenize_task_fields(
                cfg.task, split, self.tokenizer, log=env.log, show_progress=env.show_progress
            )
            for split in (train, evaluation)
        ]
        self.batcher = task_batcher(
            cfg.task, train, self.tokenizer, cfg.train.seed, token_fields=fields[0]
        )
        self.eval_batcher = task_batcher(
            cfg.task, evaluation, self.tokenizer, EVAL_SEED, shuffle=False, token_fields=fields[1]
        )
        return cfg

    def trainable(self, cfg: FinetuneExperiment) -> nnx.filterlib.Filter:
        """Every parameter but those under a `finetune.freeze` prefix (these get no gradients and
        no optimizer state)."""
        if cfg.finetune.lora.enabled:
            if cfg.finetune.lora.train_also:
                check_freeze_prefixes(
                    cfg.model, cfg.finetune.lora.train_also, "finetune.lora.train_also"
                )
            return lora_lib.trainable_filter(cfg.finetune.lora)
        prefixes = tuple(cfg.finetune.freeze)
        if not prefixes:
            return nnx.Param
        check_freeze_prefixes(cfg.model, prefixes)

        def frozen(path, _) -> bool:
            dotted = ".".join(map(str, path))
            return any(_under(dotted, p) for p in prefixes)

        return nnx.All(nnx.Param, nnx.Not(frozen))

    def saved_state(self, cfg: FinetuneExperiment) -> Optional[nnx.filterlib.Filter]:
        """With LoRA: the adapters (and lora.train_also) and RNG counters; the frozen base is
        read again from finetune.from_dir on every start."""
        if not cfg.finetune.lora.enabled:
            return None
        return nnx.Any(lora_lib.trainable_filter(cfg.finetune.lora), nnx.RngState)

    def adapt_model(self, model: nnx.Module, cfg: FinetuneExperiment) -> None:
        """Adds the finetune.lora adapters (none without targets)."""
        if cfg.finetune.lora.enabled:
            lora_lib.apply_lora(model, cfg.finetune.lora, seed=cfg.train.seed)

    def initialize(self, model: nnx.Module, cfg: FinetuneExperiment, env: RunEnv) -> None:
        """Copies the pretrained parameters in (quantizing LoRA bases that are quantized); the
        task head (if new) and the adapters keep their initialisation."""
        from_dir = cfg.finetune.from_dir

        def copy(model: nnx.Module, pretrained: dict) -> list[str]:
            if cfg.finetune.lora.enabled:
                self.base_hash = lora_lib.content_hash(pretrained)
            return copy_base_params(model, pretrained)

        if _is_hf(from_dir):
            fresh = _hf_source().load_params(model, from_dir, env.mesh, env.rules, copy=copy)
        else:
            base_meta = self.pretrained_meta
            if cfg.finetune.lora.enabled:  # also for a resumed or read-only LoRA run: its base
                base_meta = Checkpointer(from_dir, create=False).read_meta(cfg.finetune.from_step)
            fresh = load_pretrained_params(
                model, from_dir, base_meta, env.mesh, env.rules, copy=copy
            )
        if cfg.finetune.lora.from_peft:  # a resumed run then restores its own adapters over these
            from jaxformer.convert import peft as peft_io

            loaded = peft_io.load_adapter(model, cfg.model, cfg.finetune.lora.from_peft)
            fresh = [p for p in fresh if p not in loaded]  # e.g. its modules_to_save's classifier
        adapters = {
            ".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
        }
        self.new_parameters = [p for p in fresh if p not in adapters]
        if cfg.finetune.lora.enabled:
            check_lora_base(env.run_dir, cfg, self.base_hash)
            prefixes = cfg.finetune.lora.train_also
            frozen_fresh = [
                p for p in self.new_parameters if not any(lora_lib.under(p, q) for q in prefixes)
            ]
            if frozen_fresh:
                env.log(
                    f"[lora] warning: {', '.join(frozen_fresh)} are newly initialised but frozen; "
                    "train them with finetune.lora.train_also=[...] (e.g. [classifier])"
                )
        if self.new_parameters:
            env.log("[finetune] newly initialised: " + ", ".join(self.new_parameters))

    def evaluate(
        self, evaluator: Evaluator, cfg: FinetuneExperiment, num_batches: Optional[int]
    ) -> dict[str, float]:
        """Task metrics over the whole validation split (or its first batches)."""
        return task_metrics.evaluate_task(
            evaluator,
            self.kind,
            self.eval_batcher,
            self.tokenizer,
            cfg.task.max_target_len,
            num_batches,
        )


def load_pretrained_params(
    model: nnx.Module, run_dir: str, meta: dict, mesh, rules, *, copy=None
) -> list[str]:
    """Copies the parameters of run_dir's checkpoint (`meta` from read_meta) into `model`
    wherever path and shape agree.

    Returns the paths that kept their fresh initialisation (a new or resized task head).
    """
    checkpointer = Checkpointer(run_dir, create=False)
    stored_cfg = ModelConfig(**meta["config"]["model"])
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: models.create(stored_cfg, rngs=nnx.Rngs(0)))
    restored = checkpointer.restore_state(
        nnx.state((abstract,)), mesh, rules, meta["step"], partial=True
    )
    pretrained = {
        path: var[...] for path, var in nnx.to_flat_state(nnx.state(restored[0], nnx.Param))
    }
    return (copy or copy_base_params)(model, pretrained)


LORA_BASE_FILE = "lora_base.json"
"""In a LoRA run directory: the base it adapts (finetune.from_dir, from_step, content sha256)."""


def check_lora_base(run_dir: str, cfg: FinetuneExperiment, digest: str) -> None:
    """Records the base of a new LoRA run; for an existing one, a clear error if the base read
    now is not the one its adapters were trained on."""
    path = os.path.join(run_dir, LORA_BASE_FILE)
    record = dict(from_dir=cfg.finetune.from_dir, from_step=cfg.finetune.from_step, sha256=digest)
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        if stored.get("sha256") != digest:
            raise CheckpointError(
                f"the base weights in {cfg.finetune.from_dir} (step {cfg.finetune.from_step}) are "
                f"not those the adapters in {run_dir} were trained on (sha256 "
                f"{stored.get('sha256', '?')[:12]}... recorded in {path}, {digest[:12]}... now)"
            )
    elif jax.process_index() == 0 and os.path.isdir(run_dir):
        with open(path, "w") as f:
            json.dump(record, f, indent=1)


def load_lora_run(run_dir: str, step: Optional[int] = None) -> tuple[nnx.Module, dict]:
    """(base + adapters of a LoRA run's checkpoint on this host's first device, its metadata);
    the base is read again from the run's finetune.from_dir."""
    checkpointer = Checkpointer(run_dir, create=False)
    try:
        meta = checkpointer.read_meta(step)
        workload, cfg = run_config(meta, os.path.abspath(run_dir))
        if not isinstance(workload, Finetuning) or not cfg.finetune.lora.enabled:
            raise CheckpointError(
                f"{run_dir} is not a LoRA run (no finetune.lora.targets): nothing to merge"
            )
        mesh = shard_lib.make_mesh(MeshConfig(), devices=jax.devices()[:1])
        rules = cfg.mesh.rules
        with nnx.use_eager_sharding(False):
            model = models.create(cfg.model, rngs=nnx.Rngs(0))
        workload.adapt_model(model, cfg)
        env = RunEnv(os.path.abspath(run_dir), mesh, rules, log=lambda _: None)
        workload.initialize(model, cfg, env)
        saved = nnx.filter_state(nnx.state(model), workload.saved_state(cfg))
        restored = checkpointer.restore_state(
            nnx.State({0: saved}), mesh, rules, meta["step"], partial=True
        )
        nnx.update(model, restored[0])
    finally:
        checkpointer.close()
    model.eval()
    return model, meta


def copy_base_params(model: nnx.Module, pretrained: dict[tuple, jax.Array]) -> list[str]:
    """copy_matching_params, then the quantized bases of LoRA projections (quantized here)."""
    fresh = copy_matching_params(model, pretrained)
    filled = set(lora_lib.load_base(model, pretrained))
    return [p for p in fresh if p not in filled]


def copy_matching_params(model: nnx.Module, pretrained: dict[tuple, jax.Array]) -> list[str]:
    """Copies each pretrained array ({parameter path: array}) into the model's parameter of the
    same path and shape (in the model's dtype and sharding); returns the paths left fresh."""
    fresh = []
    target = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(target):
        source = pretrained.get(path)
        if source is not None and source.shape == var[...].shape:
            var[...] = jax.device_put(source.astype(var[...].dtype), var[...].sharding)
        else:
            fresh.append(".".join(map(str, path)))
    nnx.update(model, target)
    return fresh


@cli.command(interrupted=cli.RESUME_HINT)
def run_finetune(
    from_dir: str, from_step: Optional[int], config_path: Optional[str], overrides: Sequence[str]
) -> int:
    """What `finetune.py` does; 0 on success, 2 with one message on bad input, 3, 75 and 130
    as `run_training`."""
    cfg, meta = load_finetune(from_dir, from_step, config_path, overrides)
    trainer = Trainer(cfg, Finetuning(meta))
    status, result = run_to_exit_status(trainer)
    if status:
        return status
    val = result.get("validation") or {}
    scores = ", ".join(f"{k} {v:.4f}" for k, v in val.items() if isinstance(v, float))
    if cli.already_complete(trainer, result):
        print(
            f"\n[done] {trainer.run_dir} was already complete at step {trainer.start_step} "
            f"(train.steps={cfg.train.steps}): no training done; raise train.steps to extend "
            f"it. Validation: {scores}"
        )
    else:
        trained = result["steps"] - trainer.start_step
        print(
            f"\n[done] fine-tuned to step {result['steps']} ({trained} step"
            f"{'s' if trained != 1 else ''}) in {trainer.run_dir}: {scores}"
        )
    return 0
