"""A Hugging Face directory as the starting point of fine-tuning (`finetune.py --from hf:DIR`).

The directory is read where a run directory would be: its model config and tokenizer stand in for
a checkpoint's metadata, and its weights are streamed into the fine-tuning model on its mesh. No
converted copy is written; the fine-tuning run's own checkpoints hold everything it needs after.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from flax import nnx

from jaxformer.config import config_to_dict

HF_PREFIX = "hf:"


def is_hf_source(from_dir: str) -> bool:
    """Whether a `--from` value names a Hugging Face directory ('hf:DIR')."""
    return from_dir.startswith(HF_PREFIX)


def hf_directory(from_dir: str) -> str:
    """The directory of an 'hf:DIR' value, checked to be a save_pretrained directory."""
    directory = os.path.abspath(from_dir[len(HF_PREFIX) :])
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ValueError(
            f"--from {from_dir}: {directory} is not a Hugging Face save_pretrained directory "
            "(no config.json)"
        )
    return directory


def pretrained_meta(from_dir: str) -> dict[str, Any]:
    """What fine-tuning reads from a checkpoint's metadata, for an 'hf:DIR' source: step 0, the
    converted model config and the directory's own tokenizer (empty bytes if it has none)."""
    from jaxformer import convert
    from jaxformer.convert import runs

    directory = hf_directory(from_dir)
    cfg = convert.hf_model_config(directory)
    return dict(
        step=0,
        workload="pretraining",
        config=dict(model=config_to_dict(cfg)),
        tokenizer=runs.find_tokenizer(directory),
        data={},
    )


def load_params(model: nnx.Module, from_dir: str, mesh: Any, rules: Any, *, copy: Any) -> list[str]:
    """Streams an 'hf:DIR' source's weights onto `mesh` and copies them into `model` with
    `copy(model, {path: array})` (the fine-tuning rule: same path and shape); returns the paths
    that kept their fresh initialisation."""
    from jaxformer import convert

    param_dtype: Optional[str] = getattr(model.config, "param_dtype", None)
    converted, _ = convert.from_hf(
        hf_directory(from_dir), param_dtype=param_dtype, mesh=mesh, rules=rules
    )
    pretrained = {
        path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(converted, nnx.Param))
    }
    del converted
    return copy(model, pretrained)
