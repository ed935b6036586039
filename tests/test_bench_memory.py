"""bench finetune-memory on a tiny preset: sizes without allocating, one compiled step's peak."""

import dataclasses
import json
import pathlib
import shlex

import pytest

from jaxformer.bench import finetune_memory
from jaxformer.bench.__main__ import main as bench_main


def test_methods_compare_as_they_must():
    sized = {
        m: finetune_memory.measure("llama-tiny", m, 64, 2, rank=4, compile_step=False)
        for m in finetune_memory.METHODS
    }
    full, lora = sized["full"], sized["lora"]
    assert full["trainable_params"] == full["params"]
    assert 0 < lora["trainable_params"] < full["trainable_params"]
    assert lora["params"] == full["params"]  # the same base model
    # AdamW: two float32 moments per trainable parameter (+ the step counter).
    for r in sized.values():
        assert 8 * r["trainable_params"] <= r["optimizer_bytes"] <= 8 * r["trainable_params"] + 64
        assert r["gradient_bytes"] == 4 * r["trainable_params"]
    assert sized["qlora-nf4"]["param_bytes"] < sized["qlora-int8"]["param_bytes"]
    assert sized["qlora-int8"]["param_bytes"] < lora["param_bytes"] < full["param_bytes"]


def _readme_command() -> list[str]:
    """The finetune-memory command of README.md's "Fine-tuning on one GPU", as written."""
    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    prefix = "python -m jaxformer.bench finetune-memory "
    (line,) = [x for x in readme.read_text().splitlines() if x.startswith(prefix)]
    return shlex.split(line)[3:]


def test_the_readme_command_compiles_a_step_and_reports_its_peak(capsys):
    assert bench_main([*_readme_command(), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    inputs = report["param_bytes"] + report["optimizer_bytes"]
    assert report["argument_bytes"] >= inputs  # the state (and the batch) are the arguments
    assert report["peak_bytes"] >= report["argument_bytes"]
    assert report["fits_gib"] == {"24": True, "40": True, "80": True}
    assert report["compiler"].startswith("XLA CPU")  # the default: this host's backend


def test_bad_method_is_clear():
    with pytest.raises(ValueError, match="--method 'qlora'"):
        finetune_memory.lora_config("qlora")


def test_topology_compiles_for_one_tpu_chip_and_says_so(capsys):
    pytest.importorskip("libtpu", reason="--topology compiles for a TPU chip with libtpu")
    argv = ["finetune-memory", "--preset", "llama-tiny", "--method", "qlora-nf4"]
    argv += ["--seq-len", "64", "--batch", "2", "--rank", "4", "--topology", "v5p:2x2x1", "--json"]
    assert bench_main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert report["platform"] == "tpu"
    assert report["compiler"].startswith("XLA TPU (libtpu)")
    assert any(line.strip().startswith("compiler: XLA TPU") for line in out)
    assert report["peak_bytes"] >= report["argument_bytes"] >= report["param_bytes"]


def test_a_qlora_step_reads_its_base_without_copying_or_gathering_it():
    """The NF4 base is dequantized elementwise (a gather of the levels made int32 index arrays
    the size of a layer, which a TPU pads to 30x its bytes), and the scanned layers do not hand
    the quantized kernels back out of the loop (that wrote a copy of every layer's base)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxformer import lora, models, quantize_nf4

    q = quantize_nf4.quantize(jnp.ones((2, 64, 48)), 1)
    jaxpr = jax.make_jaxpr(lambda q: quantize_nf4.dequantize(q, (64, 48), jnp.bfloat16))(q)
    assert "gather" not in str(jaxpr)
    cfg = dataclasses.replace(models.preset("llama-tiny"), remat="full")  # as the bench's step
    model = models.create(cfg, rngs=nnx.Rngs(0))
    lora.apply_lora(model, lora.LoraConfig(targets=("all-linear",), rank=4, quantize="nf4"))
    tokens = jnp.ones((1, 16), jnp.int32)
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens))(state)
    (scan,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert not [v for v in scan.outvars if v.aval.dtype in (jnp.uint8, jnp.int8)]
    assert [v for v in scan.invars if v.aval.dtype == jnp.uint8]  # the codes go in
