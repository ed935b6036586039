"""Hugging Face checkpoints in and out: GPT-2, BERT, T5 and the Llama-like decoders (Llama 2/3.x,
Mistral, Qwen2/2.5, Qwen3, Gemma 2), checked by logit parity in the tests.

    from jaxformer import convert
    model, cfg = convert.from_hf(hf_model_or_dir)  # our nnx model (eval mode), ModelConfig
    convert.to_hf(model, cfg, "out/")                    # -> config.json + model.safetensors

to_hf writes the architecture the model's features call for (`architecture_of`), or the one given
as `architecture`; a model that architecture cannot express is refused, naming the fields.

Needs the `hf` extra (torch, transformers, safetensors), imported only when these functions run;
`import jaxformer` never imports this package. Command line: `python -m jaxformer.convert`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Optional

import jax
from flax import nnx

from jaxformer.convert import bert, common, gpt2, llama, streaming, t5
from jaxformer.models.config import ModelConfig

# One converter per HF model type: a module (gpt2, bert, t5) or a llama.Flavour, each offering
# NAME, ARCHITECTURES, OPTIONAL, IGNORED, normalize, config_from_hf, rules, check, finish_export
# and config_to_hf.
BY_MODEL_TYPE: dict[str, Any] = {"gpt2": gpt2, "bert": bert, "t5": t5, **llama.FLAVOURS}
ARCHITECTURES = tuple(BY_MODEL_TYPE)
"""The names `to_hf(architecture=...)` and `--architecture` accept (HF model types)."""


def _family_of(src: Any) -> Any:
    model_type, arch = common.model_type_of(src)
    if model_type not in BY_MODEL_TYPE:
        classes = ", ".join(a for c in BY_MODEL_TYPE.values() for a in c.ARCHITECTURES.values())
        raise ValueError(
            f"unsupported Hugging Face model type {model_type!r} ({arch}); jaxformer "
            f"converts {', '.join(BY_MODEL_TYPE)} ({classes})"
        )
    return BY_MODEL_TYPE[model_type]


def architecture_of(cfg: ModelConfig) -> str:
    """The HF model type `to_hf` writes `cfg` as, chosen by its features, not its family alone.

    Encoders are BERT, encoder-decoders T5; a decoder with RoPE or RMSNorm is Llama-like (Gemma 2
    with Gemma features, Qwen3 with q/k norm, Qwen2 with q/k/v-only biases, Mistral with a window
    on every layer, else Llama; see llama.select); any other decoder is GPT-2.
    """
    if cfg.family == "encoder":
        return "bert"
    if cfg.family == "encoder_decoder":
        return "t5"
    if cfg.position == "rope" or cfg.norm == "rmsnorm":
        return llama.select(cfg)
    return "gpt2"


def _converter(cfg: ModelConfig, architecture: Optional[str]) -> Any:
    """The converter that writes `cfg` (forced by `architecture`), once it has checked it can."""
    name = architecture or architecture_of(cfg)
    if name not in BY_MODEL_TYPE:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    converter = BY_MODEL_TYPE[name]
    converter.check(cfg)
    if not isinstance(converter, llama.Flavour):  # GPT-2, BERT, T5 have none of these options
        common.check_representable(cfg, converter.NAME, **llama.plain_options(cfg))
    return converter


def _read(src: Any, param_dtype: Optional[str]) -> tuple[Any, ModelConfig, Any]:
    """(converter module, our config, lazy normalized weights) of a source; no tensor is read."""
    family = _family_of(src)
    hf_config, weights = common.read_hf(src)
    weights = family.normalize(weights)
    cfg = family.config_from_hf(hf_config, weights)
    dtype = param_dtype or streaming.stored_float_dtype(weights)
    return family, dataclasses.replace(cfg, param_dtype=dtype), weights


def hf_model_config(src: Any, *, param_dtype: Optional[str] = None) -> ModelConfig:
    """The ModelConfig `from_hf` would build for `src`, without reading any weight."""
    return _read(src, param_dtype)[1]


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
    family, cfg, weights = _read(src, param_dtype)
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


def hf_weights(
    model: nnx.Module, cfg: ModelConfig, architecture: Optional[str] = None
) -> dict[str, Any]:
    """{Hugging Face name: float32 numpy array} of a model (tied copies left out)."""
    converter = _converter(cfg, architecture)
    weights = common.export_rules(converter.rules(cfg), common.flat_params(model))
    return converter.finish_export(weights, cfg)


def hf_config(
    cfg: ModelConfig, head: Optional[str] = None, architecture: Optional[str] = None
) -> Any:
    """The transformers config (with `architectures`) that describes our config."""
    converter = _converter(cfg, architecture)
    head = head or next(iter(converter.ARCHITECTURES))
    if head not in converter.ARCHITECTURES:
        raise ValueError(
            f"head {head!r} is not one of {', '.join(converter.ARCHITECTURES)} for a "
            f"{converter.NAME} checkpoint"
        )
    config = converter.config_to_hf(cfg, head)
    config.architectures = [converter.ARCHITECTURES[head]]
    return config


def to_hf(
    model: nnx.Module,
    cfg: ModelConfig,
    out_dir: str | os.PathLike[str],
    *,
    head: Optional[str] = None,
    architecture: Optional[str] = None,
    overwrite: bool = False,
) -> str:
    """Writes a directory that transformers' `from_pretrained` loads (config.json, safetensors).

    `architecture` (one of ARCHITECTURES) forces the checkpoint format; by default it follows the
    model's features (`architecture_of`). `head` picks the recorded architecture of an encoder:
    'masked_lm' (default) or 'classification'; both heads' weights are always written, so either
    class loads the directory. An existing non-empty `out_dir` is an error unless `overwrite`.
    """
    config = hf_config(cfg, head, architecture)
    weights = hf_weights(model, cfg, architecture)
    for_head = getattr(_converter(cfg, architecture), "weights_for_head", None)
    if for_head is not None and head is not None:  # names a head's class reads (BERT QA)
        weights = for_head(weights, head)
    return common.write_hf(os.fspath(out_dir), config, weights, overwrite=overwrite)


__all__ = [
    "from_hf",
    "hf_model_config",
    "to_hf",
    "hf_weights",
    "hf_config",
    "architecture_of",
    "ARCHITECTURES",
]
