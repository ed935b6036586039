"""Streamed reading of Hugging Face checkpoints: shards read tensor by tensor, the stored dtype
kept, parameters placed on a mesh as they are read. Skipped without torch/transformers."""

import jax
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from jaxformer import convert  # noqa: E402
from jaxformer import sharding as shard_lib  # noqa: E402
from jaxformer.convert import common, streaming  # noqa: E402

tf.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def sharded_gpt2(tmp_path_factory):
    """A GPT-2 saved as bfloat16 in several safetensors shards, and its float32 original."""
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=3, n_head=4)
    model = tf.GPT2LMHeadModel(cfg).eval()
    out = tmp_path_factory.mktemp("hf") / "gpt2-bf16"
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="40KB")
    return out, model


def test_shards_are_read_lazily_in_their_stored_dtype(sharded_gpt2):
    directory, _ = sharded_gpt2
    shards = sorted(p.name for p in directory.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2, shards
    _, weights = common.read_hf(directory)
    assert isinstance(weights, streaming.LazyWeights)
    wte = weights["transformer.wte.weight"]
    assert isinstance(wte, streaming.LazyTensor) and wte.shape == (128, 64)
    assert wte.dtype == np.dtype(ml_dtypes.bfloat16)
    assert np.asarray(wte).dtype == np.dtype(ml_dtypes.bfloat16)
    assert np.asarray(wte.T).shape == (64, 128)


def test_bfloat16_checkpoint_stays_bfloat16_and_matches_its_weights(sharded_gpt2):
    directory, hf = sharded_gpt2
    model, cfg = convert.from_hf(directory)
    assert cfg.param_dtype == "bfloat16"
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert {p.dtype for p in params} == {jax.numpy.dtype("bfloat16")}
    ours = common.flat_params(model)
    theirs = hf.to(torch.bfloat16).state_dict()
    np.testing.assert_array_equal(
        ours["blocks.1.mlp.up.kernel"].astype(np.float32),
        theirs["transformer.h.1.mlp.c_fc.weight"].float().numpy(),
    )
    # Asked for float32, the same checkpoint converts up exactly.
    wide, wide_cfg = convert.from_hf(directory, param_dtype="float32")
    assert wide_cfg.param_dtype == "float32"
    np.testing.assert_array_equal(
        common.flat_params(wide)["embed.token_embed.embedding"],
        ours["embed.token_embed.embedding"].astype(np.float32),
    )


def test_parameters_land_sharded_on_a_mesh(sharded_gpt2):
    directory, _ = sharded_gpt2
    mesh = shard_lib.make_mesh(shard_lib.MeshConfig(shape=(1, 4, 2)))
    model, _ = convert.from_hf(directory, mesh=mesh, rules=shard_lib.DEFAULT_RULES)
    state = nnx.state(model, nnx.Param)
    expected = shard_lib.state_shardings(state, mesh, shard_lib.DEFAULT_RULES)
    for (path, var), (_, want) in zip(nnx.to_flat_state(state), nnx.to_flat_state(expected)):
        assert var.get_value().sharding.is_equivalent_to(want.get_value(), var.ndim), path
    kernel = state["blocks"]["mlp"]["up"]["kernel"].get_value()
    assert len(kernel.addressable_shards) == 8
    assert kernel.addressable_shards[0].data.size < kernel.size  # split, not replicated
