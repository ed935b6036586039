"""LoRA adapters <-> Hugging Face PEFT adapter directories (adapter_config.json +
adapter_model.safetensors), for the base model `to_hf` writes.

Module names come from the family converters' own `rules(cfg)` and `finish_export` (no second
name table): each of our per-layer kernel names is traced to the Hugging Face weight it becomes.
PEFT's `lora_A.weight` is our A (one layer's, flattened over its input axes) transposed to
[rank, in]; `lora_B.weight` is B flattened and transposed to [out, rank]; both for nn.Linear and
GPT-2's Conv1D (PEFT's fan_in_fan_out only changes how it merges). GPT-2's fused c_attn takes our
separate query/key/value adapters exactly as one LoRA of rank k * rank (A stacked, B block
diagonal; `rank_pattern` / `alpha_pattern` keep the scale alpha / rank); an adapter on c_attn read
back gives query/key/value the same A and their rows of B, also exact.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer import lora
from jaxformer.models.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _trace(cfg: ModelConfig, architecture: Optional[str]) -> dict[str, tuple[str, int, int]]:
    """{our flat kernel name: (HF weight name, part index, parts)}: where each kernel lands once
    exported (parts > 1 for a fused weight such as GPT-2's c_attn)."""
    from jaxformer import convert

    converter = convert._converter(cfg, architecture)
    rules = converter.rules(cfg)
    # Each weight becomes a one-element tag; concatenations (fusing) keep the tags in order.
    tagged = {r.hf: np.array([i], np.float64) for i, r in enumerate(rules)}
    out: dict[str, tuple[str, int, int]] = {}
    for hf, value in converter.finish_export(tagged, cfg).items():
        tags = [int(t) for t in np.asarray(value).ravel()]
        for part, tag in enumerate(tags):
            out.setdefault(rules[tag].ours, (hf, part, len(tags)))
    return out


def _layer_names(dotted: str, stacked: bool, depth: int) -> list[Optional[tuple[int, str]]]:
    """[(layer, our flat kernel name)] of an adapted projection ('blocks.self_attn.query')."""
    if not stacked:
        return [(None, f"{dotted}.kernel")]
    head, rest = dotted.split(".", 1)
    return [(i, f"{head}.{i}.{rest}.kernel") for i in range(depth)]


def _module_name(hf_weight: str, dotted: str) -> str:
    if not hf_weight.endswith(".weight"):
        raise ValueError(f"{dotted} exports to {hf_weight!r}, not a module's weight")
    return hf_weight[: -len(".weight")]


def adapter_weights(
    model: nnx.Module, cfg: ModelConfig, architecture: Optional[str] = None
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """({PEFT key: float32 array}, {HF module: rank} for fused modules of a larger rank)."""
    where = _trace(cfg, architecture)
    parts: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    count: dict[str, int] = {}
    for dotted, module in lora.adapted(model).items():
        a = np.asarray(module.lora_a[...], np.float32)
        b = np.asarray(module.lora_b[...], np.float32)
        rank = a.shape[-1]
        stacked = a.ndim - 1 - module.n_in > 0
        for layer, name in _layer_names(dotted, stacked, a.shape[0]):
            if name not in where:
                raise ValueError(
                    f"the LoRA target {dotted} has no Hugging Face weight ({name} is not "
                    "exported); PEFT cannot hold this adapter"
                )
            hf, part, n = where[name]
            a_i = (a[layer] if stacked else a).reshape(-1, rank)  # [in, rank]
            b_i = (b[layer] if stacked else b).reshape(rank, -1)  # [rank, out]
            parts.setdefault(hf, {})[part] = (a_i, b_i)
            count[hf] = n
    tensors, ranks = {}, {}
    for hf, got in parts.items():
        module = _module_name(hf, hf)
        n = count[hf]
        order = sorted(got)
        if n == 1:
            a_hf, b_hf = got[0][0].T, got[0][1].T
        else:  # fused: A stacked over the adapted parts, B block diagonal
            outs = {got[p][1].shape[1] for p in order}
            if len(outs) != 1:
                raise ValueError(f"{module}: fused parts of different sizes; PEFT cannot hold it")
            out, rank = outs.pop(), got[order[0]][0].shape[1]
            a_hf = np.concatenate([got[p][0].T for p in order], axis=0)
            b_hf = np.zeros((n * out, len(order) * rank), np.float32)
            for j, p in enumerate(order):
                b_hf[p * out : (p + 1) * out, j * rank : (j + 1) * rank] = got[p][1].T
            ranks[module] = len(order) * rank
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a_hf)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b_hf)
    return tensors, ranks


def save_adapter(
    model: nnx.Module,
    cfg: ModelConfig,
    lora_cfg: lora.LoraConfig,
    out_dir: str,
    *,
    base_model: str = "",
    architecture: Optional[str] = None,
    overwrite: bool = False,
) -> str:
    """Writes the model's adapters as a PEFT LoRA directory for `to_hf(model's base)`."""
    from safetensors.numpy import save_file

    from jaxformer import convert
    from jaxformer.convert import common

    if lora_cfg.train_also:
        raise ValueError(
            f"finetune.lora.train_also={list(lora_cfg.train_also)}: exporting fully trained "
            "modules (PEFT's modules_to_save) is not supported; merge the run instead "
            "(python -m jaxformer.convert merge RUN OUT)"
        )
    tensors, ranks = adapter_weights(model, cfg, architecture)
    if not tensors:
        raise ValueError("the model has no LoRA adapters to export")
    modules = sorted({k[len(PREFIX) :].rsplit(".lora_", 1)[0] for k in tensors})
    name = architecture or convert.architecture_of(cfg)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model or None,
        "r": lora_cfg.rank,
        "lora_alpha": lora_cfg.alpha,
        "lora_dropout": lora_cfg.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": name == "gpt2",  # Conv1D stores [in, out]
        "use_rslora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {m: r for m, r in ranks.items()},
        "alpha_pattern": {m: lora_cfg.alpha * r / lora_cfg.rank for m, r in ranks.items()},
        "inference_mode": True,
    }
    common.check_destination(out_dir, overwrite=overwrite)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    return out_dir


def base_model(model: nnx.Module) -> nnx.Module:
    """A plain copy of a LoRA model's frozen base (quantized bases dequantized, float32)."""
    copy = nnx.clone(model)  # merge(*split(model)) would share the Variables
    for module in lora.adapted(copy).values():
        module.lora_b.set_value(jnp.zeros_like(module.lora_b[...]))
    return lora.merge_lora(copy)


def read_adapter(adapter_dir: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(adapter_config.json, {key: array}) of a PEFT LoRA directory; clear errors otherwise."""
    from safetensors.numpy import load_file

    config_path = os.path.join(adapter_dir, CONFIG_FILE)
    weights_path = os.path.join(adapter_dir, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise ValueError(f"{adapter_dir} is not a PEFT adapter directory: {path} is missing")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r}; only LORA reads")
    for option in ("use_rslora", "use_dora"):
        if config.get(option):
            raise ValueError(f"{config_path}: {option}=true is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{config_path}: bias={config['bias']!r}; only 'none' is supported")
    return config, load_file(weights_path)


def _modules(tensors: dict[str, np.ndarray]) -> set[str]:
    return {
        k[len(PREFIX) :].rsplit(".lora_", 1)[0]
        for k in tensors
        if k.startswith(PREFIX) and ".lora_A." in k
    }


def lora_config_from_peft(
    adapter_dir: str, cfg: ModelConfig, architecture: Optional[str] = None
) -> lora.LoraConfig:
    """The LoraConfig (targets as our projection paths) that holds a PEFT adapter's weights."""
    config, tensors = read_adapter(adapter_dir)
    where = _trace(cfg, architecture)
    modules = _modules(tensors)
    targets = set()
    for ours, (hf, _, _) in where.items():
        if ours.endswith(".kernel") and _module_name(hf, ours) in modules:
            path = ours[: -len(".kernel")].split(".")
            if len(path) > 1 and path[1].isdigit():
                path = [path[0], *path[2:]]
            targets.add(".".join(path))
    known = {_module_name(hf, o) for o, (hf, _, _) in where.items() if hf.endswith(".weight")}
    unknown = sorted(modules - known)
    if unknown:
        raise ValueError(
            f"{adapter_dir}: adapters on modules this model does not export: {', '.join(unknown[:4])}"
        )
    if config.get("modules_to_save"):
        raise ValueError(f"{adapter_dir}: modules_to_save is not supported")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    for module, r in (config.get("rank_pattern") or {}).items():
        a = (config.get("alpha_pattern") or {}).get(module, alpha)
        if float(a) / int(r) != alpha / rank:
            raise ValueError(f"{adapter_dir}: module {module} has another scale (alpha / r)")
    return lora.LoraConfig(
        targets=tuple(sorted(targets)),
        rank=rank,
        alpha=alpha,
        dropout=float(config.get("lora_dropout") or 0.0),
    )


def load_adapter(
    model: nnx.Module, cfg: ModelConfig, adapter_dir: str, architecture: Optional[str] = None
) -> list[str]:
    """Writes a PEFT adapter's weights into the model's LoRA adapters (made by apply_lora with
    `lora_config_from_peft`); returns the adapted projection paths."""
    config, tensors = read_adapter(adapter_dir)
    where = _trace(cfg, architecture)
    scale = float(config["lora_alpha"]) / int(config["r"])
    done: list[str] = []
    used: set[str] = set()
    for dotted, module in lora.adapted(model).items():
        if not np.isclose(module.scale, scale):
            raise ValueError(f"{dotted}: scale {module.scale} differs from the adapter's {scale}")
        a = np.array(module.lora_a[...], np.float32)
        b = np.array(module.lora_b[...], np.float32)
        rank = a.shape[-1]
        stacked = a.ndim - 1 - module.n_in > 0
        for layer, name in _layer_names(dotted, stacked, a.shape[0]):
            hf, part, n = where[name]
            key = PREFIX + _module_name(hf, name)
            used.add(key[len(PREFIX) :])
            if key + ".lora_A.weight" not in tensors:
                raise ValueError(f"{adapter_dir} has no adapter for {key} ({dotted})")
            a_hf, b_hf = tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"]
            out = b_hf.shape[0] // n
            b_part = b_hf[part * out : (part + 1) * out]
            if a_hf.shape[0] != rank:  # fused: our export, A stacked over blocks of `rank`
                blocks = a_hf.shape[0] // rank
                if n == 1 or a_hf.shape[0] % rank:
                    raise ValueError(
                        f"{key}: rank {a_hf.shape[0]}; the model's adapters have rank {rank}"
                    )
                cols = [b_part[:, j * rank : (j + 1) * rank] for j in range(blocks)]
                nonzero = [j for j in range(blocks) if np.any(cols[j])]
                if len(nonzero) > 1:
                    raise ValueError(
                        f"{key}: part {part} of the fused weight mixes {len(nonzero)} rank-{rank} "
                        "blocks; separate adapters of that rank cannot hold it"
                    )
                j = nonzero[0] if nonzero else 0
                a_hf, b_part = a_hf[j * rank : (j + 1) * rank], cols[j]
            shape_a = a[layer].shape if stacked else a.shape
            shape_b = b[layer].shape if stacked else b.shape
            value_a = a_hf.T.reshape(shape_a)
            value_b = b_part.T.reshape(shape_b)
            if stacked:
                a[layer], b[layer] = value_a, value_b
            else:
                a, b = value_a, value_b
        for var, value in ((module.lora_a, a), (module.lora_b, b)):
            var.set_value(jax.device_put(value.astype(var[...].dtype), var[...].sharding))
        done.append(dotted)
    left = _modules(tensors) - used
    if left:
        raise ValueError(
            f"{adapter_dir} adapts modules that finetune.lora.targets leaves out: "
            + ", ".join(sorted(left)[:4])
        )
    return done


def is_lora_run(run_dir: str, step: Optional[int] = None) -> bool:
    """Whether a run directory's checkpoint is a LoRA run's (adapters only), from its metadata."""
    from jaxformer.training.checkpoint import Checkpointer
    from jaxformer.training.workload import run_config

    checkpointer = Checkpointer(run_dir, create=False)
    try:
        _, exp = run_config(checkpointer.read_meta(step), os.path.abspath(run_dir))
    finally:
        checkpointer.close()
    spec = getattr(getattr(exp, "finetune", None), "lora", None)
    return spec is not None and spec.enabled


def export_run(
    run_dir: str,
    out_dir: str,
    *,
    step: Optional[int] = None,
    base_out: Optional[str] = None,
    head: Optional[str] = None,
    architecture: Optional[str] = None,
    overwrite: bool = False,
) -> str:
    """A LoRA run's adapters as a PEFT directory; with `base_out`, its base as a Hugging Face
    directory too (the adapter's base_model_name_or_path), else the run's recorded base."""
    from jaxformer import convert
    from jaxformer.convert import common, runs
    from jaxformer.training.finetune import load_lora_run
    from jaxformer.training.workload import run_config

    common.check_destination(out_dir, overwrite=overwrite)
    if base_out:
        common.check_destination(base_out, overwrite=overwrite)
    model, meta = load_lora_run(run_dir, step)
    workload, exp = run_config(meta, os.path.abspath(run_dir))
    cfg, head = exp.model, head or workload.hf_head(exp)
    convert.hf_config(cfg, head, architecture)  # refused before anything is written
    base = exp.finetune.from_dir
    if base_out:
        convert.to_hf(
            base_model(model),
            cfg,
            base_out,
            head=head,
            architecture=architecture,
            overwrite=overwrite,
        )
        runs.export_tokenizer(run_dir, step, base_out)
        base = os.path.abspath(base_out)
    elif base.startswith("hf:"):
        base = base[len("hf:") :]
    return save_adapter(
        model,
        cfg,
        exp.finetune.lora,
        out_dir,
        base_model=base,
        architecture=architecture,
        overwrite=overwrite,
    )
