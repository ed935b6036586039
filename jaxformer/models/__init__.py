"""The three Transformer families, built from a frozen ModelConfig, and their named presets."""

from __future__ import annotations

from flax import nnx

from jaxformer.models.config import CHOICES, PRESETS, PROMISED_PARAMS, ModelConfig, preset
from jaxformer.models.decoder import DecoderLM
from jaxformer.models.encoder import EncoderLM
from jaxformer.models.encoder_decoder import EncoderDecoderLM

FAMILIES = {"decoder": DecoderLM, "encoder": EncoderLM, "encoder_decoder": EncoderDecoderLM}
# ModelConfig validates `family` against its own list (it can't import the model classes).
assert tuple(FAMILIES) == CHOICES["family"], "FAMILIES vs CHOICES"
# The family table above is the one place that says what each family does; these views of it
# serve the data, fine-tuning and generation code.
OBJECTIVE_OF_FAMILY = {name: cls.objective for name, cls in FAMILIES.items()}
"""family -> the objective it pretrains on."""
FAMILY_OF_TASK_KIND = {kind: name for name, cls in FAMILIES.items() for kind in cls.task_kinds}
"""fine-tuning task kind -> the family that trains on it."""
GENERATING_FAMILIES = tuple(name for name, cls in FAMILIES.items() if cls.generates)


def create(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model of the config's family (create under `jax.set_mesh` to shard it at birth)."""
    return FAMILIES[cfg.family](cfg, rngs=rngs)


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (works on abstract models from nnx.eval_shape too)."""
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


__all__ = [
    "ModelConfig",
    "PRESETS",
    "PROMISED_PARAMS",
    "preset",
    "create",
    "count_params",
    "DecoderLM",
    "EncoderLM",
    "EncoderDecoderLM",
    "FAMILIES",
    "OBJECTIVE_OF_FAMILY",
    "FAMILY_OF_TASK_KIND",
    "GENERATING_FAMILIES",
]
