"""Peak FLOP/s: datasheet figures by device kind, and this machine's sustained matmul rate.

On CPUs the measured matmul rate is the MFU denominator (no datasheet fits every CPU); on GPUs
and TPUs the datasheet's dense bfloat16 figure is, with the measured rate reported beside it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Chip:
    """Datasheet figures of one device (as JAX counts devices: a v7x die, a GPU)."""

    flops: float
    """Dense bfloat16 FLOP/s."""
    hbm_bytes_per_second: float
    ici_bytes_per_second: float
    """Inter-chip bandwidth per device, all links together (NVLink on GPUs)."""


# By the start of jax.Device.device_kind, longest match first. Vendor datasheets: Cloud TPU
# system-architecture pages (per chip); NVIDIA H100/H200 SXM, A100 SXM 80GB, B200 (dense, no
# sparsity). v7x figures are per die, the unit JAX calls a device there.
CHIPS: dict[str, Chip] = {
    "TPU v4": Chip(275e12, 1228e9, 300e9),
    "TPU v5 lite": Chip(197e12, 819e9, 200e9),
    "TPU v5e": Chip(197e12, 819e9, 200e9),
    "TPU v5p": Chip(459e12, 2765e9, 600e9),
    "TPU v5": Chip(459e12, 2765e9, 600e9),
    "TPU v6 lite": Chip(918e12, 1640e9, 448e9),
    "TPU v6e": Chip(918e12, 1640e9, 448e9),
    "TPU7x": Chip(2307e12 / 2, 7380e9 / 2, 1200e9 / 2),
    "NVIDIA H100": Chip(989e12, 3350e9, 900e9),
    "NVIDIA H200": Chip(989e12, 4800e9, 900e9),
    "NVIDIA GH200": Chip(989e12, 4000e9, 900e9),
    "NVIDIA A100": Chip(312e12, 2039e9, 600e9),
    "NVIDIA B200": Chip(2250e12, 8000e9, 1800e9),
}


def datasheet(device_kind: str) -> Optional[Chip]:
    """The datasheet figures of a device kind (e.g. 'NVIDIA H100 80GB HBM3'), None if unknown."""
    for prefix in sorted(CHIPS, key=len, reverse=True):
        if device_kind.startswith(prefix):
            return CHIPS[prefix]
    return None


def measure_matmul(
    dtype: str = "float32", size: Optional[int] = None, repeats: int = 5, chain: int = 0
) -> dict[str, float]:
    """Sustained FLOP/s of square matmuls on the default device: `chain` dependent [size, size]
    products per compiled call (bfloat16 inputs accumulate in float32), `repeats` timed calls.
    Returns best and median FLOP/s and the shape used."""
    on_cpu = jax.default_backend() == "cpu"
    size = size or (1024 if on_cpu else 8192)
    chain = chain or (4 if on_cpu else 32)
    kind = jnp.dtype(dtype)
    key_a, key_b = jax.random.split(jax.random.key(0))
    # Entries of size**-0.5 keep the chained products at unit scale (no overflow, no denormals).
    a = jax.random.normal(key_a, (size, size), jnp.float32).astype(kind)
    b = (jax.random.normal(key_b, (size, size), jnp.float32) * size**-0.5).astype(kind)

    @jax.jit
    def chained(a, b):
        def body(_, x):
            return jnp.dot(x, b, preferred_element_type=jnp.float32).astype(kind)

        return jax.lax.fori_loop(0, chain, body, a)

    jax.block_until_ready(chained(a, b))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(chained(a, b))
        times.append(time.perf_counter() - start)
    flops = 2.0 * size**3 * chain
    return dict(
        dtype=dtype,
        size=size,
        chain=chain,
        best_flops_per_second=flops / min(times),
        median_flops_per_second=flops / statistics.median(times),
    )


def peak_flops(
    dtype: str, device: Optional[jax.Device] = None, measured: Optional[float] = None
) -> tuple[float, str]:
    """(peak FLOP/s of one device, where it came from): the datasheet's dense bfloat16 figure
    for a known accelerator, else `measured` or a fresh matmul measurement in `dtype`."""
    device = device or jax.devices()[0]
    chip = datasheet(device.device_kind)
    if chip is not None and device.platform != "cpu":
        return chip.flops, f"datasheet dense bfloat16 of {device.device_kind}"
    if measured is None:
        measured = measure_matmul(dtype)["best_flops_per_second"]
        how = "measured"
    else:
        how = "given"
    return (
        measured,
        f"{how} {dtype} matmul peak of {device.device_kind} ({jax.device_count()} devices)",
    )
