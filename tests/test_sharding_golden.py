"""Golden sharding files: every parameter's PartitionSpec per family on the 8-device mesh.

A change to the rules, the logical names or the parameter layout shows up as a diff of
`tests/golden/sharding_<preset>.json`. After an intended change, regenerate with
`JAXFORMER_UPDATE_GOLDEN=1 pytest tests/test_sharding_golden.py` and review the diff.
"""

import json
import os

import jax
import pytest
from flax import nnx

from jaxformer import models
from jaxformer import sharding as shard_lib

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")
MESH_SHAPE = (2, 2, 2)  # data, fsdp, tensor: every rule has a mesh axis of size > 1 to use


def _spec_str(spec) -> list:
    return [None if a is None else a if isinstance(a, str) else list(a) for a in spec]


def parameter_layouts(preset: str) -> dict[str, dict]:
    """{'blocks.mlp.up.kernel': {'shape': [...], 'names': [...], 'spec': [...]}, ...}."""
    mesh = shard_lib.make_mesh(shard_lib.MeshConfig(shape=MESH_SHAPE))
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: models.create(models.preset(preset), rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    shardings = shard_lib.state_shardings(state, mesh, shard_lib.DEFAULT_RULES)
    out = {}
    for (path, var), (_, sh) in zip(nnx.to_flat_state(state), nnx.to_flat_state(shardings)):
        out[".".join(map(str, path))] = dict(
            shape=list(var.get_value().shape),
            names=list(var.get_metadata().get("out_sharding") or ()),
            spec=_spec_str(sh.get_value().spec),
        )
    return out


@pytest.mark.parametrize("preset", ["gpt-tiny", "bert-tiny", "t5-tiny", "llama-tiny"])
def test_parameter_shardings_match_golden_file(preset):
    layouts = parameter_layouts(preset)
    path = os.path.join(GOLDEN_DIR, f"sharding_{preset}.json")
    if os.environ.get("JAXFORMER_UPDATE_GOLDEN"):
        with open(path, "w") as f:  # one line per parameter: diffs read as layout changes
            lines = [
                f" {json.dumps(k)}: {json.dumps(layouts[k], sort_keys=True)}"
                for k in sorted(layouts)
            ]
            f.write("{\n" + ",\n".join(lines) + "\n}\n")
    with open(path) as f:
        golden = json.load(f)
    assert sorted(layouts) == sorted(golden), "parameter paths changed"
    changed = {k: (golden[k], layouts[k]) for k in layouts if layouts[k] != golden[k]}
    assert not changed, f"layouts changed (golden, now): {changed}"


def test_stacked_blocks_and_heads_are_split_as_the_rules_say():
    layouts = parameter_layouts("llama-tiny")
    query = layouts["blocks.self_attn.query.kernel"]
    assert query["names"] == ["layers", "embed", "heads", "head_dim"]
    assert query["spec"] == [None, "fsdp", "tensor", None]
    assert layouts["blocks.self_attn.out.kernel"]["spec"] == [None, "tensor", None, "fsdp"]
    assert layouts["embed.token_embed.embedding"]["spec"] == ["tensor", "fsdp"]


def test_batch_rule_splits_rows_over_data_and_fsdp():
    mesh = shard_lib.make_mesh(shard_lib.MeshConfig(shape=MESH_SHAPE))
    assert shard_lib.batch_sharding(mesh, 2).spec == jax.sharding.PartitionSpec(
        ("data", "fsdp"), None
    )
    assert shard_lib.batch_shards(mesh) == 4
    rules = (("batch", "data"),) + shard_lib.DEFAULT_RULES
    assert shard_lib.batch_sharding(mesh, 3, rules).spec == jax.sharding.PartitionSpec(
        "data", None, None
    )
