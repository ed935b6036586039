"""load_config: YAML + overrides into frozen dataclasses, and the errors a user sees."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import attention, layers, models
from jaxformer.config import (
    ConfigError,
    check_choice,
    config_from_dict,
    dump_config,
    load_config,
    save_config,
)
from jaxformer.models.config import CHOICES, ModelConfig
from jaxformer.models.stack import REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class Train:
    steps: int = 10
    lr: float = 1e-3
    name: str = "run"
    eval_every: Optional[int] = None
    fast: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"Train.steps must be >= 1, got {self.steps}")


@dataclasses.dataclass(frozen=True)
class Mesh:
    shape: tuple[int, ...] = (1, -1, 1)
    axes: tuple[str, ...] = ("data", "fsdp", "tensor")
    rules: tuple[tuple[str, Optional[str]], ...] = (("batch", "data"), ("embed", None))


@dataclasses.dataclass(frozen=True)
class Top:
    train: Train = dataclasses.field(default_factory=Train)
    mesh: Mesh = dataclasses.field(default_factory=Mesh)
    seed: int = 0


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_defaults_are_frozen_nested_dataclasses():
    cfg = load_config(Top, None, [])
    assert cfg == Top()
    assert type(cfg) is Top and type(cfg.train) is Train and type(cfg.mesh) is Mesh
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 5  # type: ignore[misc]
    assert hash(cfg) == hash(Top())  # all-tuple fields keep frozen configs hashable


def test_yaml_then_overrides(tmp_path):
    path = write(
        tmp_path,
        """
        train:
          steps: 100
          lr: 3e-4
        seed: 7
    """,
    )
    cfg = load_config(Top, path, ["train.steps=200", "train.eval_every=50", "train.fast=true"])
    assert cfg.train == Train(steps=200, lr=3e-4, eval_every=50, fast=True)
    assert isinstance(cfg.train.lr, float) and cfg.seed == 7


def test_optional_int_back_to_null():
    cfg = load_config(Top, None, ["train.eval_every=5", "train.eval_every=null"])
    assert cfg.train.eval_every is None


def test_tuple_fields_from_overrides_and_yaml(tmp_path):
    cfg = load_config(
        Top, None, ["mesh.shape=[2,4,1]", "mesh.rules=[[batch,data],[mlp,tensor],[embed,null]]"]
    )
    assert cfg.mesh.shape == (2, 4, 1)
    assert cfg.mesh.rules == (("batch", "data"), ("mlp", "tensor"), ("embed", None))
    assert all(type(r) is tuple for r in cfg.mesh.rules)
    path = write(
        tmp_path,
        """
        mesh:
          shape: [8, -1, 1]
          rules:
            - [batch, data]
            - [heads, null]
    """,
    )
    assert load_config(Top, path, []).mesh == Mesh(
        shape=(8, -1, 1), rules=(("batch", "data"), ("heads", None))
    )


def test_dump_load_round_trip(tmp_path):
    cfg = Top(
        train=Train(steps=3, lr=2e-5, name="1e-3", eval_every=None),
        mesh=Mesh(shape=(2, 2, 2), rules=(("a", None), ("b", "fsdp"))),
        seed=-1,
    )
    text = dump_config(cfg)
    assert "'1e-3'" in text  # a string that looks like a float stays a string
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(Top, str(path), []) == cfg
    assert not (tmp_path / "run" / "config.yaml.tmp").exists()


def test_config_from_dict():
    d = {"train": {"steps": 4}, "mesh": {"shape": [1, 8, 1], "rules": [["x", None]]}}
    assert config_from_dict(Top, d) == Top(
        train=Train(steps=4), mesh=Mesh(shape=(1, 8, 1), rules=(("x", None),))
    )
    with pytest.raises(ConfigError, match="did you mean 'train.steps'"):
        config_from_dict(Top, {"train": {"step": 4}})


def test_unknown_key_suggests_nearest():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train.stesp'; did you mean 'train.steps'\?"
    ):
        load_config(Top, None, ["train.stesp=100"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'; did you mean 'train'\?"):
        load_config(Top, None, ["trian.steps=100"])
    with pytest.raises(
        ConfigError, match=r"unknown config key 'steps'; did you mean 'train.steps'\?"
    ):
        load_config(Top, None, ["steps=100"])


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    path = write(tmp_path, "mesh:\n  zzz: 1\n")
    with pytest.raises(
        ConfigError,
        match=r"cfg.yaml: unknown config key 'mesh.zzz'; valid keys in 'mesh': "
        r"mesh.shape, mesh.axes, mesh.rules",
    ):
        load_config(Top, path, [])


def test_wrong_type_names_key_and_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"train.steps: expected int, got 'abc'"):
        load_config(Top, None, ["train.steps=abc"])
    with pytest.raises(ConfigError, match=r"train.eval_every: expected int or null, got 'x'"):
        load_config(Top, None, ["train.eval_every=x"])
    with pytest.raises(ConfigError, match=r"mesh.shape: expected a list of int, got \['a'\]"):
        load_config(Top, None, ["mesh.shape=[a]"])
    with pytest.raises(ConfigError, match=r"train: expected a section \(Train\), got 5"):
        load_config(Top, write(tmp_path, "train: 5\n"), [])
    with pytest.raises(ConfigError, match=r"mesh.shape: expected a list of int, got \{'a': 1\}"):
        load_config(Top, None, ["mesh.shape.a=1"])


def test_wrong_type_inside_nested_tuples():
    with pytest.raises(
        ConfigError,
        match=r"mesh.rules\[0\]: expected a list \[str, str or null\], got \['a', 'b', 'c'\]",
    ):
        load_config(Top, None, ["mesh.rules=[[a,b,c]]"])
    with pytest.raises(ConfigError, match=r"mesh.rules\[1\]\[0\]: expected str, got 3"):
        load_config(Top, None, ["mesh.rules=[[a,b],[3,null]]"])


def test_post_init_error_surfaces_as_config_error():
    with pytest.raises(ConfigError, match=r"train: Train.steps must be >= 1, got 0"):
        load_config(Top, None, ["train.steps=0"])


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "train:\n  steps: 1\n lr: [1,\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml, line 3, column \d+: malformed YAML"):
        load_config(Top, path, [])


@pytest.mark.parametrize("text", ["- a\n- b\n", "5\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Top, write(tmp_path, text), [])


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_config(Top, write(tmp_path, ""), []) == Top()


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="config file .*nope.yaml' not found"):
        load_config(Top, str(tmp_path / "nope.yaml"), [])
    with pytest.raises(ConfigError, match=r"override 'train.steps' is not of the form key=value"):
        load_config(Top, None, ["train.steps"])


def test_missing_mandatory_value():
    @dataclasses.dataclass(frozen=True)
    class Needs:
        data_dir: str = "???"

    with pytest.raises(ConfigError, match=r"config key 'data_dir' has no value"):
        load_config(Needs, None, [])
    assert load_config(Needs, None, ["data_dir=/tmp/x"]).data_dir == "/tmp/x"


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_check_choice_names_field_value_choices_and_closest():
    check_choice("Cfg.kind", "b", ("a", "b"))
    with pytest.raises(
        ValueError, match=r"^Cfg.kind='gleu' is not one of gelu, relu; did you mean 'gelu'\?$"
    ):
        check_choice("Cfg.kind", "gleu", ("gelu", "relu"))
    with pytest.raises(ValueError, match=r"^Cfg.kind='zzz' is not one of gelu, relu$"):
        check_choice("Cfg.kind", "zzz", ("gelu", "relu"))


def test_model_choices_are_the_implementations_tables():
    assert set(CHOICES) <= {f.name for f in dataclasses.fields(ModelConfig)}
    assert CHOICES["mlp"] == tuple(layers.ACTIVATIONS)
    assert CHOICES["norm"] == tuple(layers.NORMS)
    assert CHOICES["attention_impl"] == attention.IMPLEMENTATIONS
    assert CHOICES["family"] == tuple(models.FAMILIES)
    assert set(CHOICES["remat"]) == {"none", *REMAT_POLICIES}


@pytest.mark.parametrize("field", sorted(CHOICES))
def test_bad_model_choice_names_field_value_and_choices(field):
    valid = ", ".join(CHOICES[field])
    with pytest.raises(ValueError, match=rf"ModelConfig.{field}='bogus' is not one of {valid}"):
        ModelConfig(**{field: "bogus"})


def test_bad_model_choice_from_yaml_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"ModelConfig.mlp='gleu' .*; did you mean 'gelu'\?"):
        load_config(ModelConfig, None, ["mlp=gleu"])


def test_gelu_mlp_is_tanh_approximate():
    x = jnp.linspace(-4.0, 4.0, 33)
    np.testing.assert_array_equal(layers.ACTIVATIONS["gelu"](x), jax.nn.gelu(x, approximate=True))
    np.testing.assert_array_equal(
        layers.ACTIVATIONS["gelu_exact"](x), jax.nn.gelu(x, approximate=False)
    )
    assert not np.allclose(layers.ACTIVATIONS["gelu"](x), layers.ACTIVATIONS["gelu_exact"](x))
