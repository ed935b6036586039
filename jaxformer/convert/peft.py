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

Parameters trained in full beside the adapters (`finetune.lora.train_also`, e.g. a new classifier)
go where PEFT keeps them: `modules_to_save` in adapter_config.json names the Hugging Face modules,
and adapter_model.safetensors holds each module's whole state under its own name
(`base_model.model.classifier.weight`: what PEFT's ModulesToSaveWrapper.adapter_state_dict writes;
in memory PEFT holds it as `classifier.modules_to_save.default.weight`, which also reads back). A
leaf that no whole Hugging Face module holds (one part of GPT-2's fused c_attn, a tied embedding, a
module that also carries LoRA adapters) is refused by name before anything is written.
"""

from __future__ import annotations

import json
import os
import re
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


def _exported(
    cfg: ModelConfig, architecture: Optional[str], head: Optional[str] = None
) -> dict[str, list[str]]:
    """{HF weight name: [our flat parameter names, in order]}: what each exported weight is made
    of (several names for a fused weight such as GPT-2's c_attn), under `head`'s names."""
    from jaxformer import convert

    converter = convert._converter(cfg, architecture)
    rules = converter.rules(cfg)
    # Each weight becomes a one-element tag; concatenations (fusing) keep the tags in order.
    tagged = {r.hf: np.array([i], np.float64) for i, r in enumerate(rules)}
    weights = converter.finish_export(tagged, cfg)
    for_head = getattr(converter, "weights_for_head", None)
    if for_head is not None and head is not None:  # BERT QA: the classifier is qa_outputs
        weights = for_head(weights, head)
    return {
        hf: [rules[int(t)].ours for t in np.asarray(value).ravel()] for hf, value in weights.items()
    }


def _trace(cfg: ModelConfig, architecture: Optional[str]) -> dict[str, tuple[str, int, int]]:
    """{our flat kernel name: (HF weight name, part index, parts)}: where each kernel lands once
    exported (parts > 1 for a fused weight such as GPT-2's c_attn)."""
    out: dict[str, tuple[str, int, int]] = {}
    for hf, ours in _exported(cfg, architecture).items():
        for part, name in enumerate(ours):
            out.setdefault(name, (hf, part, len(ours)))
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


def _module_of(hf_weight: str) -> str:
    return hf_weight.rsplit(".", 1)[0] if "." in hf_weight else ""


def _layer_leaves(path: tuple, var: nnx.Variable) -> list[str]:
    """Our flat per-layer names of a parameter ('blocks.mlp_norm.scale' of a stacked block ->
    'blocks.0.mlp_norm.scale', ...)."""
    from jaxformer.convert import common

    axes = tuple(var.get_metadata().get("out_sharding") or ())
    if axes[:1] == ("layers",):
        return common._per_layer_names(path, var.shape[0])
    return [".".join(map(str, path))]


def _lora_modules(model: nnx.Module, exported: dict[str, list[str]]) -> set[str]:
    """The Hugging Face modules that carry the model's LoRA adapters."""
    kernels = set()
    for dotted, module in lora.adapted(model).items():
        a = module.lora_a[...]
        kernels.update(n for _, n in _layer_names(dotted, a.ndim - 1 - module.n_in > 0, a.shape[0]))
    return {_module_of(hf) for hf, ours in exported.items() if kernels.intersection(ours)}


def modules_to_save(
    model: nnx.Module,
    cfg: ModelConfig,
    lora_cfg: lora.LoraConfig,
    *,
    head: Optional[str] = None,
    architecture: Optional[str] = None,
) -> dict[str, list[str]]:
    """{Hugging Face module: its weight names}: PEFT's modules_to_save for the parameters
    `lora_cfg.train_also` trains in full. A ValueError names a leaf that no whole Hugging Face
    module holds (nothing is read or written before)."""
    if not lora_cfg.train_also:
        return {}
    from jaxformer import convert

    name = architecture or convert.architecture_of(cfg)
    exported = _exported(cfg, architecture, head)
    where: dict[str, list[str]] = {}
    for hf, ours in exported.items():
        for leaf in ours:
            where.setdefault(leaf, []).append(hf)
    adapted = _lora_modules(model, exported)
    trained: dict[str, list[str]] = {}
    frozen_base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    for path, var in nnx.to_flat_state(nnx.state(model, frozen_base)):
        dotted = ".".join(map(str, path))
        if any(lora.under(dotted, p) for p in lora_cfg.train_also):
            trained[dotted] = _layer_leaves(path, var)
    chosen = {leaf for leaves in trained.values() for leaf in leaves}
    why = (
        "; PEFT's modules_to_save saves whole Hugging Face modules (merge the run instead: "
        "python -m jaxformer.convert merge RUN OUT)"
    )
    saved: dict[str, list[str]] = {}
    for dotted, leaves in sorted(trained.items()):
        refuse = f"finetune.lora.train_also: {dotted} "
        if dotted == "embed.token_embed.embedding" and (
            cfg.tie_embeddings or cfg.family == "encoder_decoder"
        ):
            raise ValueError(
                refuse + f"is tied to other weights of the {name} checkpoint (the output head or "
                "the stacks' embeddings), and PEFT's copy of the module would not be" + why
            )
        for leaf in leaves:
            if leaf not in where:
                raise ValueError(refuse + f"has no weight of its own in a {name} checkpoint" + why)
            for hf in where[leaf]:
                module = _module_of(hf)
                others = [o for o in exported[hf] if o not in chosen]
                if others:
                    raise ValueError(
                        refuse + f"is one part of the fused Hugging Face weight {hf}, whose "
                        f"other parts ({', '.join(others)}) it leaves out" + why
                    )
                if module in adapted:
                    raise ValueError(
                        refuse + f"lies in {module}, which also carries LoRA adapters "
                        "(finetune.lora.targets); PEFT cannot both adapt and save a module"
                    )
                inner = sorted(w for w in exported if w.startswith(module + "."))
                nested = [w for w in inner if "." in w[len(module) + 1 :]]
                if not module or nested:
                    raise ValueError(
                        refuse + f"exports to {hf}, whose module {module or '(the model)'} "
                        f"holds other modules ({', '.join(nested[:3])})" + why
                    )
                saved[module] = inner
    return saved


def adapter_files(
    model: nnx.Module,
    cfg: ModelConfig,
    lora_cfg: lora.LoraConfig,
    *,
    base_model: str = "",
    head: Optional[str] = None,
    architecture: Optional[str] = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(adapter_config.json, {key: float32 array}) of the model's adapters and, under
    modules_to_save, the modules finetune.lora.train_also trains; refusals come from here."""
    from jaxformer import convert

    tensors, ranks = adapter_weights(model, cfg, architecture)
    if not tensors:
        raise ValueError("the model has no LoRA adapters to export")
    modules = sorted({k[len(PREFIX) :].rsplit(".lora_", 1)[0] for k in tensors})
    saved = modules_to_save(model, cfg, lora_cfg, head=head, architecture=architecture)
    if saved:
        weights = convert.hf_weights(_frozen_base(model), cfg, architecture)
        for_head = getattr(convert._converter(cfg, architecture), "weights_for_head", None)
        if for_head is not None and head is not None:
            weights = for_head(weights, head)
        for names in saved.values():
            for w in names:
                tensors[PREFIX + w] = np.ascontiguousarray(weights[w], np.float32)
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
        "modules_to_save": sorted(saved) or None,
        "rank_pattern": {m: r for m, r in ranks.items()},
        "alpha_pattern": {m: lora_cfg.alpha * r / lora_cfg.rank for m, r in ranks.items()},
        "inference_mode": True,
    }
    return config, tensors


def write_adapter(
    config: dict[str, Any],
    tensors: dict[str, np.ndarray],
    out_dir: str,
    *,
    overwrite: bool = False,
) -> str:
    """Writes adapter_config.json and adapter_model.safetensors into out_dir."""
    from safetensors.numpy import save_file

    from jaxformer.convert import common

    common.check_destination(out_dir, overwrite=overwrite)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    return out_dir


def save_adapter(
    model: nnx.Module,
    cfg: ModelConfig,
    lora_cfg: lora.LoraConfig,
    out_dir: str,
    *,
    base_model: str = "",
    head: Optional[str] = None,
    architecture: Optional[str] = None,
    overwrite: bool = False,
) -> str:
    """Writes the model's adapters (and the train_also modules) as a PEFT LoRA directory for
    `to_hf(model's base, head=head)`."""
    from jaxformer.convert import common

    common.check_destination(out_dir, overwrite=overwrite)
    config, tensors = adapter_files(
        model, cfg, lora_cfg, base_model=base_model, head=head, architecture=architecture
    )
    return write_adapter(config, tensors, out_dir, overwrite=overwrite)


def base_model(model: nnx.Module) -> nnx.Module:
    """A plain copy of a LoRA model's frozen base (quantized bases dequantized, float32)."""
    copy = nnx.clone(model)  # merge(*split(model)) would share the Variables
    for module in lora.adapted(copy).values():
        module.lora_b.set_value(jnp.zeros_like(module.lora_b[...]))
    return lora.merge_lora(copy)


def _frozen_base(model: nnx.Module) -> nnx.Module:
    return base_model(model)  # (an argument of adapter_files has that name)


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


def _saved_params(
    adapter_dir: str,
    config: dict[str, Any],
    tensors: dict[str, np.ndarray],
    cfg: ModelConfig,
    architecture: Optional[str] = None,
) -> dict[str, np.ndarray]:
    """{our flat per-layer parameter name: value} of the adapter's modules_to_save weights
    (read through the family converter's own normalize and rules, as from_hf reads them)."""
    from jaxformer import convert

    names = config.get("modules_to_save") or []
    lora_modules = _modules(tensors)
    saved = {}
    for key, value in tensors.items():
        if ".lora_" in key:
            continue
        # PEFT writes a saved module under its own name; its in-memory name reads too.
        name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", key.removeprefix(PREFIX))
        module = _module_of(name)
        if not any(module == m or module.endswith("." + m) for m in names):
            raise ValueError(
                f"{adapter_dir}: {key} is neither a LoRA weight nor in modules_to_save "
                f"({names}); such adapters are not supported"
            )
        if module in lora_modules:
            raise ValueError(f"{adapter_dir}: {module} is both adapted and in modules_to_save")
        saved[name] = value
    if not saved:
        return {}
    converter = convert._converter(cfg, architecture)
    weights = converter.normalize(saved)
    params, used = {}, set()
    for rule in converter.rules(cfg):
        if rule.hf in weights:
            value = np.asarray(weights[rule.hf])
            params[rule.ours] = value.T if rule.transpose else value
            used.add(rule.hf)
    left = sorted(set(weights) - used)
    if left:
        raise ValueError(
            f"{adapter_dir}: modules_to_save weights this model has no place for: "
            + ", ".join(left[:4])
        )
    return params


def _train_also(params: dict[str, np.ndarray], where: dict[str, Any]) -> tuple[str, ...]:
    """finetune.lora.train_also prefixes for the flat parameter names `params` fills: a module
    when all its exported parameters are among them, else the parameters."""

    def stacked(name: str) -> str:
        path = name.split(".")
        return ".".join([path[0], *path[2:]] if len(path) > 2 and path[1].isdigit() else path)

    leaves = {stacked(n) for n in params}
    every = {stacked(n) for n in where}
    out = set()
    for leaf in leaves:
        parent = leaf.rsplit(".", 1)[0]
        whole = "." in leaf and all(e in leaves for e in every if lora.under(e, parent))
        out.add(parent if whole else leaf)
    return tuple(sorted(out))


def _modules(tensors: dict[str, np.ndarray]) -> set[str]:
    return {
        k[len(PREFIX) :].rsplit(".lora_", 1)[0]
        for k in tensors
        if k.startswith(PREFIX) and ".lora_A." in k
    }


def lora_config_from_peft(
    adapter_dir: str, cfg: ModelConfig, architecture: Optional[str] = None
) -> lora.LoraConfig:
    """The LoraConfig (targets as our projection paths; train_also the parameters of the
    adapter's modules_to_save) that holds a PEFT adapter's weights."""
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
    train_also = _train_also(_saved_params(adapter_dir, config, tensors, cfg, architecture), where)
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
        train_also=train_also,
    )


def load_adapter(
    model: nnx.Module, cfg: ModelConfig, adapter_dir: str, architecture: Optional[str] = None
) -> list[str]:
    """Writes a PEFT adapter's weights into the model's LoRA adapters (made by apply_lora with
    `lora_config_from_peft`) and its modules_to_save into the parameters they hold; returns the
    adapted projection paths, then the parameter paths it restored."""
    config, tensors = read_adapter(adapter_dir)
    where = _trace(cfg, architecture)
    saved = _saved_params(adapter_dir, config, tensors, cfg, architecture)  # refused before
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
    return done + _restore_saved(model, saved)


def _restore_saved(model: nnx.Module, params: dict[str, np.ndarray]) -> list[str]:
    """Writes {our flat per-layer name: value} into the model's (non-adapter) parameters, in their
    dtypes and shardings; returns the parameter paths written."""
    if not params:
        return []
    from jaxformer.convert import common

    place = common.placer(params)
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    restored = []
    for path, var in nnx.to_flat_state(state):
        value = place(path, var)
        if value is not None:
            var[...] = jax.device_put(jnp.asarray(value, var[...].dtype), var[...].sharding)
            restored.append(".".join(map(str, path)))
    place.check_all_used()
    nnx.update(model, state)
    return restored


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
    config, tensors = adapter_files(
        model, cfg, exp.finetune.lora, head=head, architecture=architecture
    )
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
    config["base_model_name_or_path"] = base or None
    return write_adapter(config, tensors, out_dir, overwrite=overwrite)
