"""bench finetune-memory on a tiny preset: sizes without allocating, one compiled step's peak."""

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


def test_bad_method_is_clear():
    with pytest.raises(ValueError, match="--method 'qlora'"):
        finetune_memory.lora_config("qlora")
