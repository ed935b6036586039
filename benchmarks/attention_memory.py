"""Peak memory of attention forward + backward, plain vs chunked, at sequence lengths 1k-16k.

Memory comes from XLA's compiled memory analysis (temporaries + arguments + outputs), so the
plain variant's quadratic buffers are measured without having to allocate them.
Usage: python benchmarks/attention_memory.py [--heads 8] [--head-dim 64] [--chunk 512]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from jaxformer.attention import dot_product_attention


def peak_bytes(implementation: str, length: int, heads: int, head_dim: int, chunk: int) -> int:
    """Compiled peak bytes of value_and_grad of a causal attention at this length."""
    shape = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.float32)

    def loss(q, k, v):
        out = dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            implementation=implementation,
            q_chunk_size=chunk,
            kv_chunk_size=chunk,
        )
        return jnp.sum(out * out)

    compiled = (
        jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
    )
    stats = compiled.memory_analysis()
    return stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes


def main() -> None:
    """Prints one row per sequence length."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=512)
    args = parser.parse_args()
    print(
        f"device: {jax.devices()[0].device_kind}; batch 1, {args.heads} heads, head_dim "
        f"{args.head_dim}, float32, causal, forward + backward"
    )
    print(f"{'length':>7} {'plain MiB':>10} {'chunked MiB':>12} {'chunked MiB/1k tokens':>22}")
    for length in (1024, 2048, 4096, 8192, 16384):
        plain = peak_bytes("plain", length, args.heads, args.head_dim, args.chunk) / 2**20
        chunked = peak_bytes("chunked", length, args.heads, args.head_dim, args.chunk) / 2**20
        print(f"{length:>7} {plain:>10.1f} {chunked:>12.1f} {chunked / (length / 1024):>22.2f}")


if __name__ == "__main__":
    main()
