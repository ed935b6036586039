"""Typed run configuration: frozen dataclass schemas filled from YAML and key=value overrides."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration the user wrote is invalid; the message says where and why."""


def load_config(
    schema: type[T],
    yaml_path: str | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
) -> T:
    """Defaults of schema, then `base`, the YAML file, dotted key=value overrides; validated, frozen."""
    cfg = _structured(schema)
    if base:
        cfg = _merge(cfg, schema, base, "defaults")
    if yaml_path is not None:
        cfg = _merge(cfg, schema, _read_yaml(yaml_path), yaml_path)
    for item in overrides:
        cfg = _merge(cfg, schema, _parse_override(item), f"override {item!r}")
    return _instantiate(schema, cfg)


def config_from_dict(schema: type[T], data: Mapping[str, Any]) -> T:
    """Rebuilds a config from a plain dict, e.g. the resolved config stored in a checkpoint."""
    return _instantiate(schema, _merge(_structured(schema), schema, dict(data), "config dict"))


def dump_config(cfg: Any) -> str:
    """The config as YAML that load_config reads back to an equal config."""
    # OmegaConf's dumper quotes strings its loader would read as numbers (e.g. '1e-3').
    return OmegaConf.to_yaml(OmegaConf.create(_plain(cfg)))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain dicts, lists and scalars (JSON-ready; config_from_dict reverses it)."""
    return _plain(cfg)


def save_config(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Writes dump_config(cfg) to path atomically, so a crash never leaves half a config."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(dump_config(cfg))
    os.replace(tmp, path)


def check_choice(field: str, value: Any, choices: Iterable[str]) -> None:
    """ValueError naming `field`, the value, the valid choices and the closest one, if any."""
    choices = tuple(choices)
    if value in choices:
        return
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{field}={value!r} is not one of {', '.join(choices)}{hint}")


# ---------------------------------------------------------------------------------------------
# Reading the sources.


def _structured(schema: type) -> DictConfig:
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        raise TypeError(f"config schema must be a dataclass type, got {schema!r}")
    try:
        cfg = OmegaConf.structured(schema)
    except oc_errors.ValidationError as e:
        raise TypeError(
            f"omegaconf cannot type the config schema {schema.__name__} ({str(e).splitlines()[0]}); "
            "nested or fixed-length tuple fields need omegaconf>=2.4"
        ) from e
    _make_writable(cfg, schema)
    return cfg


def _make_writable(cfg: DictConfig, schema: type) -> None:
    # A frozen dataclass makes its node read-only (merging into it fails on omegaconf 2.3), and the
    # flag is set on every nested section, so clearing it on the root is not enough. The result is
    # frozen again when the dataclasses are built.
    OmegaConf.set_readonly(cfg, False)
    for name, hint in _field_hints(schema).items():
        if _is_dataclass_type(hint) and isinstance(child := cfg[name], DictConfig):
            _make_writable(child, hint)


def read_yaml(path: str) -> dict[str, Any]:
    """The YAML file as a dict, with the same clear errors as load_config."""
    return _read_yaml(path)


def _read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    try:
        loaded = OmegaConf.load(
            path
        )  # OmegaConf's loader reads 1e-3 as a float; plain PyYAML does not
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}{where}: malformed YAML: {problem}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8"
        ) from None
    except OSError as e:
        # OmegaConf.load raises a bare OSError when the document is a scalar.
        if not str(e).startswith("Invalid loaded object type"):
            raise ConfigError(f"cannot read config file {path!r}: {e}") from None
        loaded = None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(
            f"{path}: the top level must be a mapping of config keys (key: value), "
            "not a list or a single value"
        )
    return OmegaConf.to_container(loaded, resolve=False)


def _parse_override(item: str) -> dict[str, Any]:
    key, sep, _ = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=100)")
    # from_dotlist parses the value as YAML: 5 -> int, [2,4,1] -> list, null -> None.
    return OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)


def _leaves(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.extend(_leaves(value, name + "."))
        else:
            out.append((name, value))
    return out


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def _merge(cfg: DictConfig, schema: type, data: Mapping[str, Any], source: str) -> DictConfig:
    errors = (oc_errors.OmegaConfBaseException, TypeError, ValueError)
    try:
        return OmegaConf.merge(cfg, OmegaConf.create(dict(data)))
    except errors:
        pass  # redone one leaf at a time below, to name the key where OmegaConf's message does not
    for key, value in _leaves(data):
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(_nest(key, value)))
        except (oc_errors.ConfigKeyError, oc_errors.ConfigAttributeError) as e:
            raise ConfigError(f"{source}: {_unknown_key(schema, e.full_key or key)}") from None
        except errors:
            raise ConfigError(f"{source}: {_wrong_type(schema, key, value)}") from None
    return cfg


# ---------------------------------------------------------------------------------------------
# Messages.


def _all_keys(schema: type, prefix: str = "") -> list[str]:
    keys = []
    for name, hint in _field_hints(schema).items():
        keys.append(prefix + name)
        if _is_dataclass_type(hint):
            keys.extend(_all_keys(hint, f"{prefix}{name}."))
    return keys


def _unknown_key(schema: type, key: str) -> str:
    valid = _all_keys(schema)
    parent, _, leaf = key.rpartition(".")
    siblings = [k for k in valid if k.rpartition(".")[0] == parent]
    # A typo within the right section first; then the same name in another section.
    close = _close(leaf, siblings, n=1) or _close(leaf, valid, n=3)
    if close:
        return f"unknown config key {key!r}; did you mean {' or '.join(repr(c) for c in close)}?"
    where = f" in {parent!r}" if parent else ""
    return f"unknown config key {key!r}; valid keys{where}: {', '.join(siblings)}"


def _close(leaf: str, keys: list[str], n: int) -> list[str]:
    by_leaf: dict[str, list[str]] = {}
    for k in keys:
        by_leaf.setdefault(k.rpartition(".")[2], []).append(k)
    return [
        k for m in difflib.get_close_matches(leaf, by_leaf, n=n, cutoff=0.6) for k in by_leaf[m]
    ][:n]


def _wrong_type(schema: type, key: str, value: Any) -> str:
    hint, parts = schema, key.split(".")
    for i, part in enumerate(parts):
        if not _is_dataclass_type(hint):
            # The value reaches inside a field that is not a section: report at that field.
            return f"{'.'.join(parts[:i])}: expected {_type_name(hint)}, got {_nest('.'.join(parts[i:]), value)!r}"
        hint = _field_hints(hint).get(part, Any)
    return f"{key}: expected {_type_name(hint)}, got {value!r}"


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_dataclass_type(hint):
        return f"a section ({hint.__name__})"
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list [{', '.join(_type_name(a) for a in args)}]"
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


# ---------------------------------------------------------------------------------------------
# Building the frozen dataclasses.


def _instantiate(schema: type[T], cfg: DictConfig) -> T:
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=False)
    except oc_errors.MissingMandatoryValue as e:
        raise ConfigError(
            f"config key {e.full_key!r} has no value; set it in the YAML file "
            f"or with {e.full_key}=..."
        ) from None
    except oc_errors.InterpolationResolutionError as e:
        raise ConfigError(f"cannot resolve an interpolation: {str(e).splitlines()[0]}") from None
    return _convert(schema, data, "")


def _convert(hint: Any, value: Any, key: str) -> Any:
    # OmegaConf checks scalars and flat lists; nested or fixed-length tuples it keeps untyped, and it
    # returns lists where the schema says tuple. This walk finishes both jobs from the type hints.
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    origin = origin or (hint if hint in (tuple, list) else None)
    if _is_dataclass_type(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
        hints = _field_hints(hint)
        kwargs = {
            name: _convert(h, value[name], f"{key}.{name}" if key else name)
            for name, h in hints.items()
            if name in value
        }
        try:
            return hint(**kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{key}: {e}" if key else str(e)) from None
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _convert(options[0], value, key) if len(options) == 1 else value
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
            items = [_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            items = [
                _convert(args[0] if args else Any, v, f"{key}[{i}]") for i, v in enumerate(value)
            ]
        return tuple(items) if origin is tuple else items
    if origin in (tuple, list):
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    if hint in (int, float, str, bool):
        return _scalar(hint, value, key)
    return value


def _scalar(hint: type, value: Any, key: str) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # bool is an int subclass, but True is not a valid layer count.
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    return value


def _field_hints(schema: type) -> dict[str, Any]:
    hints = typing.get_type_hints(schema)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(schema) if f.init}


def _is_dataclass_type(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.name
    return value
