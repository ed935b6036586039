"""Compiled temp memory of LM-head cross-entropy loss + gradient: full [B, L, V] logits vs chunked.

Defaults are a llama-1b-sized head (d_model 2048, vocabulary 128,256) at batch 4 x length 2048
per device with bfloat16 hidden states and float32 weights cast to bfloat16 for the matmul.
Nothing is allocated: shapes go through `.lower().compile()` and XLA's memory analysis, on this
host's CPU or, with --topology (needs libtpu), for one chip of a TPU topology.
Usage: python benchmarks/loss_memory.py [--batch 4] [--length 2048] [--chunks 256 512 1024]
                                        [--topology v5e:2x2]
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

import jax
import jax.numpy as jnp

from jaxformer.losses import cross_entropy_sums, full_cross_entropy_sums


def temp_bytes(
    loss_fn,
    batch: int,
    length: int,
    d_model: int,
    vocab: int,
    dtype,
    device: Optional[jax.Device] = None,
    **kwargs,
) -> int:
    """XLA temp bytes of value_and_grad (w.r.t. hidden and head weights) of the summed loss."""

    def loss(hidden_BxLxD, head_DxV, targets_BxL, weights_BxL):
        def logits_fn(hidden_BxCxD):
            return jnp.dot(
                hidden_BxCxD,
                head_DxV.astype(hidden_BxCxD.dtype),
                preferred_element_type=jnp.float32,
            )

        return loss_fn(hidden_BxLxD, logits_fn, targets_BxL, weights_BxL, **kwargs)["loss_sum"]

    sharding = None if device is None else jax.sharding.SingleDeviceSharding(device)
    shapes = [
        ((batch, length, d_model), dtype),
        ((d_model, vocab), jnp.float32),
        ((batch, length), jnp.int32),
        ((batch, length), jnp.float32),
    ]
    shapes = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
    """Prints one row for the full loss and one per chunk size."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--topology", help="compile for one chip of a TPU topology, e.g. v5e:2x2")
    args = parser.parse_args()
    device = None
    if args.topology:
        from jaxformer.training.compile_only import topology_devices

        device = topology_devices(args.topology)[0]
    dtype = jnp.dtype(args.dtype)
    shape = (args.batch, args.length, args.d_model, args.vocab, dtype)
    logits_mib = args.batch * args.length * args.vocab * 4 / 2**20
    print(
        f"device: {(device or jax.devices()[0]).device_kind}; B={args.batch} L={args.length} "
        f"D={args.d_model} V={args.vocab} hidden {dtype.name}; loss + grad w.r.t. hidden "
        f"and head; [B, L, V] float32 logits alone: {logits_mib:,.0f} MiB"
    )
    print(f"{'variant':>14} {'temp MiB':>10} {'compile s':>10}")
    rows = [("full", full_cross_entropy_sums, {})]
    rows += [(f"chunk {c}", cross_entropy_sums, dict(chunk_size=c)) for c in args.chunks]
    for name, fn, kwargs in rows:
        start = time.perf_counter()
        mib = temp_bytes(fn, *shape, device=device, **kwargs) / 2**20
        print(f"{name:>14} {mib:>10,.0f} {time.perf_counter() - start:>10.1f}")


if __name__ == "__main__":
    main()
