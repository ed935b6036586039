"""Converted models as jaxformer run directories (the training checkpoint format) and back."""

from __future__ import annotations

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
from jaxformer.training.optimizer import make_optimizer
from jaxformer.training.workload import run_config

SPM_FILES = ("spiece.model", "tokenizer.model")


def find_spm(directory: str) -> bytes:
    """The sentencepiece model a HF directory ships (T5's spiece.model), else b''."""
    for name in SPM_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                return f.read()
    return b""


def save_run(
    model: nnx.Module, cfg: ModelConfig, run_dir: str, *, tokenizer_model: bytes = b""
) -> str:
    """Step-0 checkpoint of (model, fresh optimizer) with an ExperimentConfig around `cfg`.

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
        optimizer = nnx.Optimizer(
            model, make_optimizer(exp.optimizer, exp.train.steps), wrt=nnx.Param
        )
        checkpointer.save(
            0,
            nnx.state((model, optimizer)),
            config=yaml.safe_load(dump_config(exp)),
            tokenizer_model=tokenizer_model,
            data_state=dict(seed=exp.train.seed, step=0),
            workload="pretraining",
        )
    finally:
        checkpointer.close()
    save_config(exp, os.path.join(run_dir, "config.yaml"))
    return run_dir


def run_head(run_dir: str, step: Optional[int] = None) -> Optional[str]:
    """The Hugging Face head a run's model is for (a fine-tuned classifier's 'classification'),
    as the workload that wrote it says; None for the family's default."""
    checkpointer = Checkpointer(run_dir, create=False)
    try:
        workload, cfg = run_config(checkpointer.read_meta(step), os.path.abspath(run_dir))
    finally:
        checkpointer.close()
    return workload.hf_head(cfg)


def load_run(run_dir: str, step: Optional[int] = None) -> tuple[nnx.Module, ModelConfig]:
    """The model (parameters only) of a run's checkpoint, on this host's first device."""
    checkpointer = Checkpointer(run_dir, create=False)
    try:
        meta = checkpointer.read_meta(step)
        # Any workload's run (pretrained, fine-tuned): its config type says how to read it.
        _, exp = run_config(meta, os.path.abspath(run_dir))
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
