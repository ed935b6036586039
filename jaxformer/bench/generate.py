"""`python -m jaxformer.bench generate`: greedy generation speed with and without the KV cache,
and beside Hugging Face `generate` on the same weights (converted with `jaxformer.convert.to_hf`).

With the cache: `jaxformer.inference.generate` (prefill, then one cached step per token, in one
compiled loop). Without: the same loop shape, but each step reruns the full forward pass over a
fixed [B, P + N] buffer (the decoder over [B, N] for an encoder-decoder, whose encoder runs once)
and reads the logits of the current position. Hugging Face: `generate(do_sample=False)` with its
default dynamic cache, and with `cache_implementation="static"` plus `torch.compile` of the
forward pass where that works. All must give the same tokens; the report says whether they do.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer import models

Timed = tuple[Any, float]


@functools.partial(jax.jit, static_argnums=(0, 3))
def greedy_without_cache(graphdef: nnx.GraphDef, state: Any, prompt_BxP: jax.Array, n: int):
    """[B, n] greedy tokens, rerunning the whole forward pass for every new token."""
    model = nnx.merge(graphdef, state)
    b, p = prompt_BxP.shape
    if model.config.family == "decoder":
        width, start = p + n - 1, p
        buffer = jnp.zeros((b, width), jnp.int32).at[:, :p].set(prompt_BxP)
        logits_of = lambda m, tokens: m(tokens)  # noqa: E731
    else:
        encoded = model.encode(prompt_BxP)
        width, start = n, 1
        buffer = jnp.zeros((b, width), jnp.int32)  # decoder start token 0
        logits_of = lambda m, tokens: m.decoder_logits(tokens, encoded)  # noqa: E731

    def body(i, carry):
        buffer, out = carry
        # A model copy per step: running it updates its RNG counters, which the Variables of a
        # model merged outside the loop body cannot take from inside it (TraceContextError).
        step_model = nnx.merge(graphdef, state, copy=True)
        logits = logits_of(step_model, buffer)  # the full forward pass, every step
        tok = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, start - 1 + i, 1, False), -1)
        out = out.at[:, i].set(tok.astype(jnp.int32))
        buffer = jax.lax.dynamic_update_index_in_dim(
            buffer, tok.astype(jnp.int32), jnp.minimum(start + i, width - 1), 1
        )
        return buffer, out

    return jax.lax.fori_loop(0, n, body, (buffer, jnp.zeros((b, n), jnp.int32)))[1]


def timed(fn: Callable[[], Any], repeats: int = 3) -> Timed:
    """(output, median seconds of `repeats` calls after one warm-up/compile call)."""
    out = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def gpt2_shaped(
    layers: int = 6, d_model: int = 384, heads: int = 6, vocab: int = 50257, max_len: int = 1024
) -> models.ModelConfig:
    """A GPT-2-shaped decoder (learned positions, LayerNorm, GELU, tied head) of the given size."""
    import dataclasses

    return dataclasses.replace(
        models.preset("gpt2-124m"),
        num_layers=layers,
        d_model=d_model,
        num_heads=heads,
        d_ff=4 * d_model,
        vocab_size=vocab,
        max_len=max_len,
        preset="",
    )


def hf_model(model: nnx.Module, cfg: models.ModelConfig, directory: str) -> Any:
    """The transformers model loaded (`from_pretrained`) from `to_hf`'s export of `model`."""
    from transformers import AutoModelForCausalLM

    from jaxformer import convert

    convert.to_hf(model, cfg, directory, overwrite=True)
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype="float32")
    return hf.eval()


def hf_generate(hf: Any, prompt: np.ndarray, n: int, static: bool = False) -> np.ndarray:
    """[B, n] greedy tokens from transformers' `generate` (never stopping early)."""
    import torch

    ids = torch.tensor(np.array(prompt), dtype=torch.long)
    kwargs = dict(cache_implementation="static") if static else {}
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )
    return out[:, ids.shape[1] :].numpy()


def _row(impl: str, batch: int, n: int, seconds: float, same: Optional[bool], **more) -> dict:
    return dict(
        impl=impl,
        batch=batch,
        new_tokens=n,
        seconds=seconds,
        tokens_per_second=batch * n / seconds,
        same_tokens=same,
        **more,
    )


def run(
    cfg: models.ModelConfig,
    batches: tuple[int, ...] = (1, 16),
    prompt_len: int = 16,
    new_tokens: int = 128,
    repeats: int = 3,
    cache_off: bool = True,
    hf: bool = False,
    hf_compile: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Tokens/s of each implementation at each batch size; `same_tokens` compares each one's
    tokens with jaxformer's cached decode."""
    with nnx.use_eager_sharding(False):
        model = models.create(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    torch_model = None
    workdir = contextlib.ExitStack()
    if hf:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as err:
            notes.append(f"Hugging Face side skipped: {err} (pip install -e '.[hf]')")
            hf = False
        else:
            directory = workdir.enter_context(tempfile.TemporaryDirectory())
            torch_model = hf_model(model, cfg, directory)
    with workdir:
        for b in batches:
            prompt = jax.random.randint(jax.random.key(b), (b, prompt_len), 3, cfg.vocab_size)
            ref, t = timed(lambda: generate_cached(model, prompt, new_tokens), repeats)
            ref = np.asarray(ref)
            rows.append(_row("jaxformer kv-cache", b, new_tokens, t, True))
            log(_line(rows[-1]))
            if cache_off:
                out, t = timed(
                    lambda: greedy_without_cache(graphdef, state, prompt, new_tokens), repeats
                )
                rows.append(_row("jaxformer no cache", b, new_tokens, t, _same(out, ref)))
                log(_line(rows[-1]))
            if hf:
                p = np.asarray(prompt)
                out, t = _timed_host(lambda: hf_generate(torch_model, p, new_tokens), repeats)
                rows.append(_row("hf generate (dynamic cache)", b, new_tokens, t, _same(out, ref)))
                log(_line(rows[-1]))
            if hf and hf_compile:
                row = _hf_static_compiled(torch_model, np.asarray(prompt), new_tokens, repeats)
                if "error" in row:
                    notes.append(f"hf static cache + torch.compile at batch {b}: {row['error']}")
                    log(f"  hf static+compile failed: {row['error']}")
                else:
                    rows.append(
                        _row(
                            "hf generate (static cache, torch.compile)",
                            b,
                            new_tokens,
                            row["seconds"],
                            _same(row["tokens"], ref),
                            compile_seconds=row["compile_seconds"],
                        )
                    )
                    log(_line(rows[-1]))
    return dict(rows=rows, notes=notes)


def generate_cached(model: nnx.Module, prompt: jax.Array, n: int) -> jax.Array:
    """jaxformer's KV-cached greedy decode."""
    from jaxformer.inference import generate

    return generate(model, prompt, max_new_tokens=n, method="greedy")


def _timed_host(fn: Callable[[], Any], repeats: int) -> Timed:
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def _hf_static_compiled(hf: Any, prompt: np.ndarray, n: int, repeats: int) -> dict[str, Any]:
    """Static cache and a compiled forward pass; the model's forward is restored afterwards."""
    import torch

    plain = hf.forward
    try:
        hf.forward = torch.compile(plain, mode="reduce-overhead", fullgraph=True)
        start = time.perf_counter()
        tokens = hf_generate(hf, prompt, n, static=True)  # compiles (prefill and decode shapes)
        hf_generate(hf, prompt, n, static=True)
        compile_seconds = time.perf_counter() - start
        _, t = _timed_host(lambda: hf_generate(hf, prompt, n, static=True), repeats)
        return dict(tokens=tokens, seconds=t, compile_seconds=compile_seconds)
    except Exception as err:  # noqa: BLE001 - reported, not fatal: the plain row stands
        return dict(error=f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}")
    finally:
        hf.forward = plain


def _same(tokens: Any, reference: np.ndarray) -> bool:
    return bool(np.array_equal(np.asarray(tokens), reference))


def _line(r: dict[str, Any]) -> str:
    same = "" if r["same_tokens"] else "  (tokens differ from the cached decode!)"
    return (
        f"  {r['impl']:42s} batch {r['batch']:3d}: {r['tokens_per_second']:10,.0f} tokens/s "
        f"({r['seconds']:.3f} s for {r['new_tokens']} new tokens){same}"
    )


def add_parser(sub) -> None:
    """The `generate` subcommand's options."""
    p = sub.add_parser("generate", help="greedy generation tokens/s, with/without KV cache, vs HF")
    p.add_argument("--preset", help="a decoder preset instead of the GPT-2-shaped model below")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--no-cache-off", action="store_true", help="skip the decode without cache")
    p.add_argument("--hf", action="store_true", help="also time transformers' generate")
    p.add_argument(
        "--hf-compile", action="store_true", help="also static cache + torch.compile (slow)"
    )
    p.add_argument("--json", action="store_true")


def main(args) -> int:
    """Runs `generate` from parsed arguments."""
    import dataclasses
    import json

    if args.preset:
        cfg = models.preset(args.preset)
        if cfg.family != "decoder":
            raise ValueError(f"--preset {args.preset}: generate benchmarks decoders only")
    else:
        cfg = gpt2_shaped(args.layers, args.d_model, args.heads, args.vocab)
    cfg = dataclasses.replace(cfg, dtype=args.dtype)
    cfg.check_length(args.prompt_len + args.new_tokens, "--prompt-len + --new-tokens")
    device = jax.devices()[0]
    print(
        f"[bench generate] {cfg.preset or 'gpt2-shaped'} {cfg.num_layers}x{cfg.d_model} "
        f"vocab {cfg.vocab_size} {cfg.dtype}, prompt {args.prompt_len}, {args.new_tokens} new "
        f"tokens, median of {args.repeats}, on {device.device_kind}",
        flush=True,
    )
    report = run(
        cfg,
        tuple(args.batch),
        args.prompt_len,
        args.new_tokens,
        args.repeats,
        cache_off=not args.no_cache_off,
        hf=args.hf or args.hf_compile,
        hf_compile=args.hf_compile,
        log=lambda line: print(line, flush=True),
    )
    for note in report["notes"]:
        print(f"  note: {note}")
    report.update(
        command="generate",
        model=cfg.preset or "gpt2-shaped",
        layers=cfg.num_layers,
        d_model=cfg.d_model,
        vocab=cfg.vocab_size,
        dtype=cfg.dtype,
        prompt_len=args.prompt_len,
        device=device.device_kind,
    )
    if args.json:
        print(json.dumps(report, default=str))
    return 0
