"""Hugging Face checkpoints in and out: GPT-2, BERT and T5, checked by logit parity in the tests.

    from jaxformer import convert
    model, cfg = convert.from_hf(hf_model_or_dir)  # our nnx model (eval mode), ModelConfig
    convert.to_hf(model, cfg, "out/")                    # -> config.json + model.safetensors

Needs the `hf` extra (torch, transformers, safetensors), imported only when these functions run;
`import jaxformer` never imports this package. Command line: `python -m jaxformer.convert`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Optional

import jax
from flax import nnx

from jaxformer.convert import bert, common, gpt2, streaming, t5
from jaxformer.models.config import ModelConfig

BY_MODEL_TYPE: dict[str, ModuleType] = {"gpt2": gpt2, "bert": bert, "t5": t5}
BY_FAMILY: dict[str, ModuleType] = {"decoder": gpt2, "encoder": bert, "encoder_decoder": t5}


def _family_of(src: Any) -> ModuleType:
    model_type, arch = common.model_type_of(src)
    if model_type not in BY_MODEL_TYPE:
        raise ValueError(
            f"unsupported Hugging Face model type {model_type!r} ({arch}); jaxformer "
            f"converts {', '.join(BY_MODEL_TYPE)} (GPT2LMHeadModel, BertForMaskedLM, "
            "BertForSequenceClassification, T5ForConditionalGeneration)"
        )
    return BY_MODEL_TYPE[model_type]


def from_hf(
    src: Any,
    *,
    seed: int = 0,
    param_dtype: Optional[str] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    rules: Optional[Sequence] = None,
) -> tuple[nnx.Module, ModelConfig]:
    """(model, config) from a transformers model or a save_pretrained directory.

    Weights are read tensor by tensor (safetensors shards included) straight into the model,
    placed on `mesh` by the logical-axis `rules` when a mesh is given. `param_dtype` defaults to
    the checkpoint's ('bfloat16' stays bfloat16, anything else becomes float32). Heads the
    checkpoint lacks (e.g. BERT's classifier in a BertForMaskedLM) keep our random initialisation
    from `seed`. The model is returned in eval mode (dropout off).
    """
    family = _family_of(src)
    hf_config, weights = common.read_hf(src)
    weights = family.normalize(weights)
    cfg = family.config_from_hf(hf_config, weights)
    cfg = dataclasses.replace(cfg, param_dtype=param_dtype or streaming.stored_float_dtype(weights))
    params = common.apply_rules(
        family.rules(cfg),
        weights,
        model=family.NAME,
        optional=family.OPTIONAL,
        ignored=family.IGNORED,
    )
    place = common.placer(params)
    model = streaming.build_model(cfg, place, seed=seed, mesh=mesh, rules=rules)
    place.check_all_used()
    model.eval()
    return model, cfg


def hf_weights(model: nnx.Module, cfg: ModelConfig) -> dict[str, Any]:
    """{Hugging Face name: float32 numpy array} of a model (tied copies left out)."""
    family = BY_FAMILY[cfg.family]
    family.check(cfg)
    weights = common.export_rules(family.rules(cfg), common.flat_params(model))
    return family.finish_export(weights, cfg)


def hf_config(cfg: ModelConfig, head: Optional[str] = None) -> Any:
    """The transformers config (with `architectures`) that describes our config."""
    family = BY_FAMILY[cfg.family]
    family.check(cfg)
    head = head or next(iter(family.ARCHITECTURES))
    if head not in family.ARCHITECTURES:
        raise ValueError(
            f"head {head!r} is not one of {', '.join(family.ARCHITECTURES)} for a "
            f"{cfg.family} model"
        )
    config = family.config_to_hf(cfg, head)
    config.architectures = [family.ARCHITECTURES[head]]
    return config


def to_hf(
    model: nnx.Module,
    cfg: ModelConfig,
    out_dir: str | os.PathLike[str],
    *,
    head: Optional[str] = None,
    overwrite: bool = False,
) -> str:
    """Writes a directory that transformers' `from_pretrained` loads (config.json, safetensors).

    `head` picks the recorded architecture of an encoder: 'masked_lm' (default) or
    'classification'; both heads' weights are always written, so either class loads the directory.
    An existing non-empty `out_dir` is an error unless `overwrite`.
    """
    config = hf_config(cfg, head)
    return common.write_hf(os.fspath(out_dir), config, hf_weights(model, cfg), overwrite=overwrite)


__all__ = ["from_hf", "to_hf", "hf_weights", "hf_config"]
