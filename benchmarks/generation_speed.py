"""Greedy generation speed with and without the KV cache, for a decoder and an encoder-decoder.

With the cache: `jaxformer.inference.generate` (prefill, then one cached step per token, all in one
compiled while_loop). Without: the same compiled loop shape, but every step reruns the full
forward pass over a fixed [B, P + N] token buffer (the decoder over [B, N] for the encoder-decoder,
whose encoder runs once either way) and reads the logits of the current position. Both must give
the same tokens; the script checks it.

    python benchmarks/generation_speed.py [--batch 2] [--lengths 32 128 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import jax
from flax import nnx

from jaxformer import models
from jaxformer.bench.generate import greedy_without_cache  # the no-cache loop lives there
from jaxformer.inference import generate

PROMPT = 16  # decoder prompt / encoder input length
COMMON = dict(vocab_size=8192, d_model=256, num_layers=4, num_heads=8, d_ff=1024, max_len=1024)
CONFIGS = {
    "decoder (gpt-style)": models.ModelConfig(**{**models.PRESETS["gpt-tiny"].__dict__, **COMMON}),
    "encoder-decoder (t5-style)": models.ModelConfig(
        **{**models.PRESETS["t5-tiny"].__dict__, **COMMON, "head_dim": 32}
    ),
}


def timed(fn, repeats):
    out = jax.block_until_ready(fn())  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return out, best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), batch {args.batch}, "
        f"prompt/encoder length {PROMPT}, best of {args.repeats}"
    )
    print(
        f"{'model':28s} {'new':>5s} {'cache tok/s':>12s} {'no-cache tok/s':>15s} {'speed-up':>9s}"
    )
    for name, cfg in CONFIGS.items():
        with nnx.use_eager_sharding(False):
            model = models.create(cfg, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        prompt = jax.random.randint(jax.random.key(0), (args.batch, PROMPT), 3, cfg.vocab_size)
        for n in args.lengths:
            cached, t_cache = timed(lambda: generate(model, prompt, max_new_tokens=n), args.repeats)
            plain, t_plain = timed(
                lambda: greedy_without_cache(graphdef, state, prompt, n), args.repeats
            )
            same = "" if cached.tolist() == plain.tolist() else "  (tokens differ!)"
            tokens = args.batch * n
            print(
                f"{name:28s} {n:5d} {tokens / t_cache:12.0f} {tokens / t_plain:15.0f} "
                f"{t_plain / t_cache:8.1f}x{same}",
                flush=True,
            )


if __name__ == "__main__":
    main()
