"""Position encodings as pure functions: sinusoidal tables and rotary embeddings (RoPE)."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

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


ROPE_SCALINGS = ("none", "linear", "llama3")
"""The RoPE frequency scalings `RopeScaling.kind` (and ModelConfig.rope_scaling) may name."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How RoPE's inverse frequencies are stretched for longer contexts (hashable: a static arg).

    'linear' divides every frequency by `factor` (positions / factor); 'llama3' is Llama 3.1's
    frequency-dependent scaling: wavelengths above original_max_len / low_freq_factor are divided by
    `factor`, those below original_max_len / high_freq_factor are kept, and the band between is
    interpolated smoothly.
    """

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALINGS:
            raise ValueError(
                f"unknown RoPE scaling {self.kind!r}; valid: {', '.join(ROPE_SCALINGS)}"
            )
        if self.factor <= 0:
            raise ValueError(f"RoPE scaling factor must be > 0, got {self.factor}")
        if self.kind == "llama3":
            if self.high_freq_factor <= self.low_freq_factor:
                raise ValueError(
                    f"llama3 RoPE scaling needs high_freq_factor ({self.high_freq_factor}) > "
                    f"low_freq_factor ({self.low_freq_factor})"
                )
            if self.low_freq_factor <= 0 or self.original_max_len <= 0:
                raise ValueError(
                    "llama3 RoPE scaling needs low_freq_factor > 0 and original_max_len > 0, "
                    f"got {self.low_freq_factor} and {self.original_max_len}"
                )


def rope_frequencies(
    head_dim: int, theta: float = 10000.0, scaling: Optional[RopeScaling] = None
) -> Array:
    """[head_dim // 2] float32 inverse frequencies of rotary embeddings, scaled as `scaling` says."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None or scaling.kind == "none":
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # llama3, op for op as transformers' _compute_llama3_parameters (float32 throughout).
    low_freq_wavelen = scaling.original_max_len / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(
    x_BxLxNxH: Array,
    positions_BxL: Array,
    *,
    theta: float = 10000.0,
    scaling: Optional[RopeScaling] = None,
) -> Array:
    """Rotates each (first half, second half) pair of head features by position * frequency."""
    head_dim = x_BxLxNxH.shape[-1]
    angles_BxLxF = positions_BxL[..., None].astype(jnp.float32) * rope_frequencies(
        head_dim, theta, scaling
    )
    sin, cos = jnp.sin(angles_BxLxF)[:, :, None, :], jnp.cos(angles_BxLxF)[:, :, None, :]
    x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxNxH.dtype)
