"""Small builders shared by the model and generation tests."""

import dataclasses

import jax
from flax import nnx

from jaxformer import models


def build(name, **overrides):
    """An unsharded model of the named preset with some fields replaced."""
    cfg = dataclasses.replace(models.preset(name), **overrides)
    with nnx.use_eager_sharding(False):
        return models.create(cfg, rngs=nnx.Rngs(0))


def tokens(seed, shape, vocab=512):
    """Random ordinary token ids (above the special ids 0-2)."""
    return jax.random.randint(jax.random.key(seed), shape, 3, vocab)
