"""Position encodings as pure functions: sinusoidal tables and rotary embeddings (RoPE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def sinusoidal_table(length: int, dim: int, *, max_timescale: float = 10000.0) -> np.ndarray:
    """[length, dim] table of the original Transformer: sin on the first half, cos on the second."""
    positions = np.arange(length, dtype=np.float64)[:, None]
    half = dim // 2
    inv_freq = np.exp(-np.log(max_timescale) * np.arange(half) / max(half - 1, 1))
    angles = positions * inv_freq[None, :]
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)
    if dim % 2:
        table = np.pad(table, ((0, 0), (0, 1)))
    return table.astype(np.float32)


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> Array:
    """[head_dim // 2] inverse frequencies of rotary embeddings."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x_BxLxNxH: Array, positions_BxL: Array, *, theta: float = 10000.0) -> Array:
    """Rotates each (first half, second half) pair of head features by position * frequency."""
    head_dim = x_BxLxNxH.shape[-1]
    angles_BxLxF = positions_BxL[..., None].astype(jnp.float32) * rope_frequencies(head_dim, theta)
    sin, cos = jnp.sin(angles_BxLxF)[:, :, None, :], jnp.cos(angles_BxLxF)[:, :, None, :]
    x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxNxH.dtype)
