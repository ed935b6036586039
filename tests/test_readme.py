"""Every Python example in the README runs as written (outside any mesh, default settings)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks() -> list[str]:
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(index):
    exec(compile(python_blocks()[index], f"README.md example {index}", "exec"), {})


def test_readme_yaml_examples_are_valid_configs(tmp_path):
    from jaxformer.training.config import load_experiment

    with open(README) as f:
        blocks = re.findall(r"```yaml\n(.*?)```", f.read(), flags=re.S)
    assert blocks
    for i, block in enumerate(blocks):
        path = tmp_path / f"example{i}.yaml"
        path.write_text(block)
        cfg = load_experiment(str(path), [])
        assert cfg.data.sources()  # parsed into the typed config, mixtures included
