"""The Pallas splash kernel: numerics in the Pallas interpreter on CPU, and AOT compiles for TPU v5e.

The compiles need only libtpu (`jax[tpu]`), not a TPU: `get_topology_desc` gives compile-only TPU
devices even with JAX_PLATFORMS=cpu (set by conftest). Tests skip when libtpu is unavailable.
"""

import os

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server to ask on this host

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxformer import attention as A
from jaxformer import attention_kernels as K
from jaxformer.training.compile_only import topology_devices, without_persistent_cache

AXES = ("data", "fsdp", "tensor")


@pytest.fixture(scope="module")
def v5e_mesh():
    try:  # the same compile-only devices `train.py --compile-only` uses
        devices = topology_devices("v5e:2x2")
    except Exception as e:  # no libtpu, or one that can't describe the topology
        pytest.skip(f"no TPU compiler for AOT (install jax[tpu]): {type(e).__name__}: {e}")
    return jax.sharding.Mesh(
        np.array(devices).reshape(1, 2, 2), AXES, axis_types=(AxisType.Auto,) * 3
    )


@pytest.fixture
def interpreted_splash(monkeypatch):
    """Make this CPU look like a TPU to the dispatcher and run splash in the Pallas interpreter."""
    monkeypatch.setattr(K, "current_platform", lambda: "tpu")
    monkeypatch.setattr(K, "SPLASH_INTERPRET", True)


def _loss(q, k, v, segment_ids, *, implementation, **kwargs):
    out = A.dot_product_attention(
        q, k, v, segment_ids=segment_ids, implementation=implementation, **kwargs
    )
    return jnp.sum(jnp.sin(out.astype(jnp.float32)))


CASES = {
    "causal+segments": dict(is_causal=True),
    "causal window": dict(is_causal=True, sliding_window=100),
    "two-sided window": dict(sliding_window=50),
}


@pytest.mark.parametrize(
    "case,sharded",
    [("causal+segments", True), ("causal window", False), ("two-sided window", True)],
)
def test_splash_matches_plain_in_interpreter(interpreted_splash, case, sharded):
    """Scale, layouts, GQA, masks and the shard_map wrapping (2 x 2 x 2 CPU mesh) vs plain."""
    b, t, n, k, h = 2, 128, 4, 2, 16
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, n, h))
    kk, v = (jax.random.normal(key, (b, t, k, h)) for key in keys[1:])
    segments = None
    if case == "causal+segments":
        segments = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 3, (b, t)), axis=1))
    assert A.select_implementation(q, kk, segment_ids=segments, **CASES[case])[0] == "splash"
    grads = {}
    for impl in ("plain", "splash"):
        f = jax.jit(
            jax.value_and_grad(
                functools.partial(_loss, implementation=impl, scale=0.3, **CASES[case]),
                argnums=(0, 1, 2),
            )
        )
        if sharded:  # batch over data (fsdp doesn't divide 2), heads over tensor, by shard_map
            with jax.set_mesh(jax.make_mesh((2, 2, 2), AXES, axis_types=(AxisType.Auto,) * 3)):
                grads[impl] = f(q, kk, v, segments)
                assert (impl == "splash") == (
                    "shard_map" in str(jax.make_jaxpr(f)(q, kk, v, segments))
                )
        else:
            grads[impl] = f(q, kk, v, segments)
    for s, p in zip(jax.tree.leaves(grads["splash"]), jax.tree.leaves(grads["plain"])):
        np.testing.assert_allclose(s, p, atol=2e-4, rtol=2e-4)


def test_auto_falls_back_where_splash_cannot_go(interpreted_splash):
    q = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
    assert A.select_implementation(q, q) == ("splash", "TPU: Pallas splash attention")
    for kwargs, why in (
        (dict(bias=jnp.zeros((1, 4, 256, 256))), "bias"),
        (dict(mask=A.causal_mask(256)), "arbitrary mask"),
    ):
        name, reason = A.select_implementation(q, q, **kwargs)
        assert name == "plain" and why in reason
    odd = jax.ShapeDtypeStruct((2, 1100, 4, 64), jnp.bfloat16)
    name, reason = A.select_implementation(odd, odd)
    assert name == "chunked" and "multiples of 128" in reason
    with pytest.raises(ValueError, match="multiples of 128"):
        A.dot_product_attention(
            jnp.zeros((1, 100, 2, 8)),
            jnp.zeros((1, 100, 2, 8)),
            jnp.zeros((1, 100, 2, 8)),
            implementation="splash",
        )


@pytest.mark.parametrize("case", ["causal+segments", "causal window"])
def test_splash_fwd_and_bwd_compile_for_v5e(v5e_mesh, case):
    b, t, n, k, h = 4, 512, 4, 2, 128
    act = NamedSharding(v5e_mesh, P(("data", "fsdp"), None, "tensor", None))
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16, sharding=act)
    kv = jax.ShapeDtypeStruct((b, t, k, h), jnp.bfloat16, sharding=act)
    segments = (
        jax.ShapeDtypeStruct(
            (b, t), jnp.int32, sharding=NamedSharding(v5e_mesh, P(("data", "fsdp"), None))
        )
        if case == "causal+segments"
        else None
    )
    loss_and_grads = jax.value_and_grad(
        functools.partial(_loss, implementation="splash", **CASES[case]), argnums=(0, 1, 2)
    )
    with jax.set_mesh(v5e_mesh):
        assert A.select_implementation(q, kv, **CASES[case])[0] == "splash"
        with without_persistent_cache():
            compiled = jax.jit(loss_and_grads).lower(q, kv, kv, segments).compile()
    hlo = compiled.as_text()
    # The Pallas kernels, not a fallback: forward, dq and dkv, each on its shard (batch 4 / fsdp 2,
    # heads 4 / tensor 2) with no all-gather of q, k or v.
    assert hlo.count('custom_call_target="tpu_custom_call"') == 3
    assert "splash_mha_fwd" in hlo and "splash_mha_dq" in hlo and "splash_mha_dkv" in hlo
    assert "bf16[2,2,512,128]" in hlo and "all-gather" not in hlo
