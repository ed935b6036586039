"""Shared pieces of the Hugging Face converters: reading sources, our flat parameters, writing.

torch and transformers are imported inside the functions that need them, so importing this module
costs nothing and core jaxformer never depends on them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Optional

import numpy as np
from flax import nnx

from jaxformer.convert import streaming
from jaxformer.models.config import ModelConfig

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class Rule(NamedTuple):
    """One weight: its Hugging Face name, our flat parameter name, whether it is transposed."""

    hf: str
    ours: str
    transpose: bool = False


# ----------------------------------------------------------------------------- reading HF sources


def read_hf(src: Any) -> tuple[Any, dict[str, Any]]:
    """(transformers config, {name: LazyTensor}) of a model or a save_pretrained directory.

    Nothing is read yet: each tensor is read, in its stored dtype, when `np.asarray` asks.
    """
    if isinstance(src, (str, os.PathLike)):
        return _read_dir(os.fspath(src))
    if hasattr(src, "state_dict") and hasattr(src, "config"):
        return src.config, streaming.lazy_state_dict(src)
    raise TypeError(
        f"from_hf expects a transformers model or a directory, got {type(src).__name__}"
    )


def model_type_of(src: Any) -> tuple[str, str]:
    """(model_type, architecture name) without importing transformers' model code."""
    if isinstance(src, (str, os.PathLike)):
        path = os.path.join(os.fspath(src), "config.json")
        if not os.path.isdir(os.fspath(src)):
            raise ValueError(
                f"{os.fspath(src)} is not a directory (expected one written by save_pretrained)"
            )
        if not os.path.isfile(path):
            raise ValueError(
                f"{os.fspath(src)} has no config.json (expected a directory written "
                "by save_pretrained)"
            )
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return str(data.get("model_type", "")), ",".join(data.get("architectures") or []) or "?"
    config = getattr(src, "config", None)
    return str(getattr(config, "model_type", "")), type(src).__name__


def _read_dir(directory: str) -> tuple[Any, dict[str, Any]]:
    import transformers

    present = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(directory, name))]
    if not present:
        raise ValueError(
            f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)} "
            "(a directory written by save_pretrained)"
        )
    config = transformers.AutoConfig.from_pretrained(directory)
    name = present[0]
    if name.endswith(".index.json"):  # shards: model-00001-of-0000N.safetensors, ...
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [name]
    paths = [os.path.join(directory, file) for file in files]
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing ({name} lists it)")
    if all(path.endswith(".safetensors") for path in paths):
        return config, streaming.LazyWeights(paths)
    weights: dict[str, Any] = {}
    for path in paths:
        weights.update(streaming.lazy_torch_file(path))
    return config, weights


def strip_prefix(weights: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Drops a base-model prefix ('transformer.', 'bert.') so headless and headed models agree."""
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in weights.items()}


# ----------------------------------------------------------------------------- config checks


def check_representable(cfg: ModelConfig, target: str, **expected: Any) -> None:
    """ValueError naming every ModelConfig field that the target format cannot express."""
    bad = [
        f"{k}={getattr(cfg, k)!r} (needs {v!r})"
        for k, v in expected.items()
        if getattr(cfg, k) != v
    ]
    if bad:
        raise ValueError(
            f"this model cannot be written as a {target} checkpoint: "
            + ", ".join(f"ModelConfig.{b}" for b in bad)
        )


def unsupported(model: str, option: str, value: Any, why: str = "") -> ValueError:
    """The error for a Hugging Face config option jaxformer cannot represent."""
    return ValueError(
        f"{model} config option {option}={value!r} is not supported by jaxformer"
        + (f" ({why})" if why else "")
        + "; refusing to build a model that would "
        "compute something else"
    )


def pick(table: dict[str, str], model: str, option: str, value: Any) -> str:
    """table[value], or the unsupported-option error listing the valid values."""
    if value not in table:
        raise unsupported(model, option, value, f"supported: {', '.join(table)}")
    return table[value]


def same(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> bool:
    """Whether two optional weights are present and identical (a tied copy)."""
    return a is not None and b is not None and a.shape == b.shape and np.array_equal(a, b)


# ----------------------------------------------------------------------------- our parameters


def _merge_heads(value: np.ndarray, names: tuple) -> np.ndarray:
    """[.., heads, head_dim, ..] -> [.., heads * head_dim, ..]: the 2-D matrices HF stores."""
    for i in range(len(names) - 1):
        if names[i] in ("heads", "kv_heads") and names[i + 1] == "head_dim":
            return value.reshape(*value.shape[:i], -1, *value.shape[i + 2 :])
    return value


def _per_layer_names(path: tuple, depth: int) -> list[str]:
    """'blocks.self_attn.query.kernel' of a stacked block -> 'blocks.{i}.self_attn.query.kernel'."""
    return [".".join(map(str, (path[0], i, *path[1:]))) for i in range(depth)]


def _variables(model: nnx.Module):
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        yield path, var, tuple(var.get_metadata().get("out_sharding") or ())


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """{'blocks.0.self_attn.query.kernel': array, ...}: one entry per layer, attention heads
    merged into one axis ([embed, heads * head_dim]), the layout Hugging Face weights have."""
    out = {}
    for path, var, names in _variables(model):
        value = np.asarray(var.get_value())
        if names[:1] == ("layers",):
            for i, name in enumerate(_per_layer_names(path, value.shape[0])):
                out[name] = _merge_heads(value[i], names[1:])
        else:
            out[".".join(map(str, path))] = _merge_heads(value, names)
    return out


def apply_rules(
    rules: Iterable[Rule],
    weights: dict[str, np.ndarray],
    *,
    model: str,
    optional: tuple[str, ...] = (),
    ignored: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """Our flat parameters from HF weights; any HF weight left over (not ignored) is an error."""
    params, used = {}, set()
    for rule in rules:
        if rule.hf not in weights:
            if rule.ours.startswith(optional):
                continue
            raise ValueError(f"{model} weights lack {rule.hf!r} (needed for {rule.ours})")
        value = weights[rule.hf]
        params[rule.ours] = value.T if rule.transpose else value
        used.add(rule.hf)
    left = sorted(
        k for k in weights if k not in used and not any(re.fullmatch(p, k) for p in ignored)
    )
    if left:
        raise ValueError(
            f"{model} weights that jaxformer's model has no place for (an option we "
            f"cannot represent?): {', '.join(left[:6])}"
            + (f" and {len(left) - 6} more" if len(left) > 6 else "")
        )
    return params


def placer(params: dict[str, Any]) -> Callable[[tuple, nnx.Variable], Optional[np.ndarray]]:
    """`place(path, variable)` for `streaming.build_model`: the variable's value from flat
    per-layer parameters (the `flat_params` layout), layers stacked and heads split as the model
    stores them, read one tensor at a time; names and shapes are checked. After the model is
    built, `place.check_all_used()` raises if a parameter had no place in it."""
    left = dict(params)

    def place(path: tuple, var: nnx.Variable) -> Optional[np.ndarray]:
        names = tuple(var.get_metadata().get("out_sharding") or ())
        shape, dtype = tuple(var.shape), var.dtype
        if names[:1] == ("layers",):
            layer_names = _per_layer_names(path, shape[0])
            present = [n for n in layer_names if n in left]
            if not present:
                return None
            if len(present) != len(layer_names):
                raise ValueError(
                    f"weights for {len(present)} of {len(layer_names)} layers of "
                    f"{'.'.join(map(str, path))}; all or none are needed"
                )
            stacked = np.empty(shape, dtype)
            for i, n in enumerate(layer_names):
                stacked[i] = _fit(n, left.pop(n), shape[1:], names[1:])
            return stacked
        name = ".".join(map(str, path))
        if name not in left:
            return None
        return np.asarray(_fit(name, left.pop(name), shape, names), dtype)

    def check_all_used() -> None:
        if left:
            raise ValueError(f"converter produced parameters the model lacks: {sorted(left)[:6]}")

    place.check_all_used = check_all_used  # type: ignore[attr-defined]
    return place


def _fit(name: str, value: np.ndarray, shape: tuple, names: tuple) -> np.ndarray:
    """`value` in the model's `shape`, given in it or with the heads merged (`flat_params`)."""
    merged = _merge_heads(np.empty(shape, np.int8), names).shape
    if tuple(value.shape) not in (tuple(shape), tuple(merged)):
        raise ValueError(
            f"weight for {name} has shape {tuple(value.shape)}, the model expects {tuple(merged)}"
        )
    return np.asarray(value).reshape(shape)


def export_rules(rules: Iterable[Rule], params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF weights from our flat parameters (rules whose parameter the model lacks are skipped)."""
    return {
        r.hf: np.ascontiguousarray(
            params[r.ours].T if r.transpose else params[r.ours], dtype=np.float32
        )
        for r in rules
        if r.ours in params
    }


# ----------------------------------------------------------------------------- writing


def check_destination(out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    """ValueError unless `out_dir` is new, empty, or to be overwritten."""
    out_dir = os.fspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(
            f"{out_dir} exists and is not empty; choose a new directory (nothing was written)"
        )


def write_hf(
    out_dir: str, hf_config: Any, weights: dict[str, np.ndarray], *, overwrite: bool = False
) -> str:
    """config.json + model.safetensors that transformers' from_pretrained reads."""
    from safetensors.numpy import save_file

    out_dir = os.fspath(out_dir)
    check_destination(out_dir, overwrite=overwrite)
    os.makedirs(out_dir, exist_ok=True)
    hf_config.save_pretrained(out_dir)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in weights.items()},
        os.path.join(out_dir, "model.safetensors"),
        metadata={"format": "pt"},
    )
    return out_dir
