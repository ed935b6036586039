"""Converted models as jaxformer run directories (the training checkpoint format) and back."""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import yaml
from flax import nnx

from jaxformer import models
from jaxformer import sharding as shard_lib
from jaxformer.config import dump_config, save_config
from jaxformer.models.config import ModelConfig
from jaxformer.training.checkpoint import Checkpointer, CheckpointError
from jaxformer.training.config import ExperimentConfig, RunConfig
from jaxformer.training.workload import run_config

SPM_FILES = ("spiece.model", "tokenizer.model")


def find_tokenizer(directory: str) -> bytes:
    """The tokenizer bytes to store for a HF directory, else b'': its Hugging Face tokenizer
    bundle when it has tokenizer.json or tokenizer_config.json, else its sentencepiece model
    (spiece.model/tokenizer.model: one of ours)."""
    from jaxformer.data import hf_tokenizer

    if hf_tokenizer.is_hf_directory(directory):
        files = hf_tokenizer.read_bundle(directory)
        if "tokenizer.json" not in files:  # a slow tokenizer: store transformers' conversion
            return hf_tokenizer.HfTokenizer.from_directory(directory).serialized_model()
        return hf_tokenizer.serialize_bundle(files)
    for name in SPM_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                return f.read()
    return b""


def _check_tokenizer(tokenizer_bytes: bytes, cfg: ModelConfig, source: str) -> str:
    """Loads stored tokenizer bytes (ValueError naming `source` if they do not load or have more
    ids than the model's vocabulary); returns its kind, 'Hugging Face' or 'sentencepiece'."""
    from jaxformer.data.hf_tokenizer import MissingTokenizerPackage, is_bundle
    from jaxformer.data.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(tokenizer_bytes)
    except MissingTokenizerPackage:
        raise
    except (ValueError, RuntimeError, OSError) as err:
        raise ValueError(f"the tokenizer of {source} does not load: {err}") from None
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer of {source} has {tokenizer.vocab_size} ids but the model's "
            f"vocabulary has {cfg.vocab_size} rows"
        )
    return "Hugging Face" if is_bundle(tokenizer_bytes) else "sentencepiece"


def tokenizer_for_run(
    src: str, cfg: ModelConfig, tokenizer_path: Optional[str] = None
) -> tuple[bytes, str]:
    """(tokenizer bytes to store with a model converted from `src`, a note for the printed line).

    `tokenizer_path` (a sentencepiece .model, a saved bundle, or a Hugging Face tokenizer
    directory) must load; without it the directory's own tokenizer (find_tokenizer) is used, and
    a sentencepiece model there that is not one of ours is left out (with a note)."""
    missing = " (no tokenizer stored: give one in the data config to train)"
    if tokenizer_path:
        if os.path.isdir(tokenizer_path):
            data = find_tokenizer(tokenizer_path)
            if not data:
                raise ValueError(f"--tokenizer {tokenizer_path}: no tokenizer files there")
        else:
            with open(tokenizer_path, "rb") as f:
                data = f.read()
        kind = _check_tokenizer(data, cfg, f"--tokenizer {tokenizer_path}")
        return data, f" with the {kind} tokenizer of {tokenizer_path}"
    data = find_tokenizer(src)
    if not data:
        return b"", missing
    try:
        kind = _check_tokenizer(data, cfg, src)
    except ValueError as err:
        from jaxformer.data.hf_tokenizer import MissingTokenizerPackage, is_bundle

        if is_bundle(data) or isinstance(err, MissingTokenizerPackage):
            raise
        return b"", f" ({err}: not a jaxformer sentencepiece model;{missing[2:]}"
    return data, f" with its {kind} tokenizer"


def write_tokenizer(tokenizer_bytes: bytes, out_dir: str) -> list[str]:
    """Writes a run's Hugging Face tokenizer into a save_pretrained directory (AutoTokenizer
    loads it; generation_config.json keeps its eos ids); returns the names written, none for a
    sentencepiece (or no) tokenizer, which transformers cannot load as one of its own."""
    from jaxformer.data import hf_tokenizer

    if not tokenizer_bytes or not hf_tokenizer.is_bundle(tokenizer_bytes):
        return []
    files = hf_tokenizer.deserialize_bundle(tokenizer_bytes)
    stored_generation = files.pop("generation_config.json", None)
    written = hf_tokenizer.write_bundle(files, out_dir)
    if stored_generation is not None:
        _merge_generation_config(stored_generation, os.path.join(out_dir, "generation_config.json"))
        written.append("generation_config.json")
    return sorted(written)


def _merge_generation_config(stored: bytes, path: str) -> None:
    """The exported model's generation_config.json with the tokenizer's special ids put back."""
    ids = {
        k: v
        for k, v in json.loads(stored).items()
        if k in ("eos_token_id", "bos_token_id", "pad_token_id") and v is not None
    }
    current = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            current = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**current, **ids} if current else json.loads(stored), f, indent=2)
        f.write("\n")


def export_tokenizer(run_dir: str, step: Optional[int], out_dir: str) -> str:
    """Writes a run's Hugging Face tokenizer into an exported directory (write_tokenizer); returns
    a note for the printed line saying what was (or was not) written."""
    checkpointer = Checkpointer(run_dir, create=False)
    try:
        data = checkpointer.read_meta(step)["tokenizer"]
    finally:
        checkpointer.close()
    written = write_tokenizer(data, out_dir)
    if written:
        return f" with its Hugging Face tokenizer ({', '.join(written)})"
    if data:
        return (
            " without a tokenizer (the run's is a jaxformer sentencepiece model, which "
            "transformers cannot load; it stays in the run's checkpoint)"
        )
    return " without a tokenizer (the run stores none)"


def save_run(
    model: nnx.Module, cfg: ModelConfig, run_dir: str, *, tokenizer_model: bytes = b""
) -> str:
    """Step-0 checkpoint of the model alone (no optimizer state) with an ExperimentConfig around
    `cfg`.

    An empty `tokenizer_model` is stored as such: training or evaluating from this run then needs
    a tokenizer given in the data config. An existing checkpoint in run_dir is never overwritten.
    """
    run_dir = os.path.abspath(run_dir)
    exp = ExperimentConfig(model=cfg, run=RunConfig(dir=run_dir))
    checkpointer = Checkpointer(run_dir, async_save=False)
    try:
        if checkpointer.latest_step is not None:
            raise CheckpointError(
                f"{run_dir} already holds a checkpoint (step "
                f"{checkpointer.latest_step}); choose a new directory"
            )
        # The model alone: a fresh optimizer state would hold two more copies of the weights
        # in host memory (an 8B conversion would need three); whoever trains from this run
        # starts an optimizer anyway (Trainer restores such a step's model, not its optimizer).
        checkpointer.save(
            0,
            nnx.state((model,)),
            config=yaml.safe_load(dump_config(exp)),
            tokenizer_model=tokenizer_model,
            data_state=dict(seed=exp.train.seed, step=0),
            workload="pretraining",
            params_only=True,
        )
    finally:
        checkpointer.close()
    save_config(exp, os.path.join(run_dir, "config.yaml"))
    return run_dir


def run_head(run_dir: str, step: Optional[int] = None) -> Optional[str]:
    """The Hugging Face head a run's model is for (a fine-tuned classifier's 'classification'),
    as the workload that wrote it says; None for the family's default."""
    return run_model_config(run_dir, step)[1]


def run_model_config(run_dir: str, step: Optional[int] = None) -> tuple[ModelConfig, Optional[str]]:
    """(model config, Hugging Face head) of a run's checkpoint, read from its metadata alone (no
    weights), so an export can be refused before anything large is loaded."""
    checkpointer = Checkpointer(run_dir, create=False)
    try:
        workload, cfg = run_config(checkpointer.read_meta(step), os.path.abspath(run_dir))
    finally:
        checkpointer.close()
    return cfg.model, workload.hf_head(cfg)


def load_run(run_dir: str, step: Optional[int] = None) -> tuple[nnx.Module, ModelConfig]:
    """The model (parameters only) of a run's checkpoint, on this host's first device."""
    checkpointer = Checkpointer(run_dir, create=False)
    try:
        meta = checkpointer.read_meta(step)
        # Any workload's run (pretrained, fine-tuned): its config type says how to read it.
        _, exp = run_config(meta, os.path.abspath(run_dir))
        lora = getattr(getattr(exp, "finetune", None), "lora", None)
        if lora is not None and lora.enabled:  # its checkpoints hold adapters, not the base
            raise CheckpointError(
                f"{run_dir} is a LoRA run (its checkpoints hold only adapters); fold them into "
                f"the base first: python -m jaxformer.convert merge {run_dir} OUT"
            )
        cfg = exp.model
        with nnx.use_eager_sharding(False):
            model = models.create(cfg, rngs=nnx.Rngs(0))
        mesh = shard_lib.make_mesh(shard_lib.MeshConfig(), devices=jax.devices()[:1])
        params = nnx.state((model,), nnx.Param)
        restored = checkpointer.restore_state(
            params, mesh, exp.mesh.rules, meta["step"], partial=True
        )
        nnx.update((model,), restored)
    finally:
        checkpointer.close()
    model.eval()
    return model, cfg
