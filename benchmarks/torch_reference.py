"""The default run's GPT block in PyTorch, timed beside `python -m jaxformer.bench train`.

Same model as jaxformer's GPT-2-style decoder: pre-norm LayerNorm, learned positions, tied
embedding, tanh-GELU MLP (4 d), causal `F.scaled_dot_product_attention`, AdamW (weight decay
0.01 off biases/norms/embeddings as jaxformer's default decay mask, clipping at 1.0 as
`optimizer.clip_norm`), float32 parameters. Torch runs eager in float32, and in bfloat16 under
`torch.autocast("cpu")`; jaxformer runs its real train step (`jaxformer.bench.train.run`) with
`model.dtype` float32 and bfloat16. Runs are interleaved (torch, jaxformer, torch, ...) so a change
in the machine's load hits both; each row prints the ratio jaxformer / torch tokens/s.

    python benchmarks/torch_reference.py                         # the three default shapes
    python benchmarks/torch_reference.py --shapes 4x128x128 --dtypes float32 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

# layers x d_model x seq_len; heads are d_model // 32 (the default run: 128 / 4 heads)
DEFAULT_SHAPES = ("4x128x128", "8x256x128", "6x384x256")


class Block(nn.Module):
    """Pre-norm GPT-2 block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-5), nn.LayerNorm(d, eps=1e-5)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x_BxLxD: torch.Tensor) -> torch.Tensor:
        b, length, d = x_BxLxD.shape
        q, k, v = self.qkv(self.ln1(x_BxLxD)).split(d, dim=-1)
        q, k, v = (
            t.view(b, length, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x_BxLxD = x_BxLxD + self.proj(a.transpose(1, 2).reshape(b, length, d))
        return x_BxLxD + self.down(F.gelu(self.up(self.ln2(x_BxLxD)), approximate="tanh"))


class GPT(nn.Module):
    """Token + learned position embeddings, blocks, final LayerNorm, tied LM head."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, max_len: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d, eps=1e-5)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens_BxL: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens_BxL) + self.pos(torch.arange(tokens_BxL.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.tok.weight.T


def torch_tokens_per_second(
    layers: int, d: int, seq: int, vocab: int, batch: int, dtype: str, steps: int
) -> float:
    """Median tokens/s of `steps` AdamW steps (after 2 warm-up steps) on random tokens."""
    torch.manual_seed(0)
    model = GPT(vocab, d, layers, heads_of(d), seq)
    decay = [
        p for n, p in model.named_parameters() if p.dim() > 1 and "tok" not in n and "pos" not in n
    ]
    rest = [
        p
        for n, p in model.named_parameters()
        if not (p.dim() > 1 and "tok" not in n and "pos" not in n)
    ]
    opt = torch.optim.AdamW(
        [dict(params=decay, weight_decay=0.01), dict(params=rest, weight_decay=0.0)],
        lr=2e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    tokens = torch.randint(3, vocab, (batch, seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return batch * seq / statistics.median(times)


def heads_of(d: int) -> int:
    """The default run's head size (128 / 4 = 32) carried to other widths."""
    return max(d // 32, 1)


def jax_tokens_per_second(
    layers: int, d: int, seq: int, vocab: int, batch: int, dtype: str, steps: int
) -> float:
    """jaxformer's real train step on the same shape (a fresh process would only add noise)."""
    from jaxformer.bench import train

    cfg = train.experiment(
        layers=layers,
        d_model=d,
        heads=heads_of(d),
        seq_len=seq,
        vocab=vocab,
        batch=batch,
        dtype=dtype,
    )
    report = train.run(cfg, steps=steps, warmup=2, peak_flops=1.0)
    return report["tokens_per_second"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="LxDxS")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved A/B rounds")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), batch {args.batch}, "
        f"vocab {args.vocab}, {args.steps} timed steps (median), {args.rounds} interleaved rounds; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'shape LxDxS':>12s} {'dtype':>9s} {'torch tok/s':>12s} {'jaxformer tok/s':>16s} {'ratio':>6s}"
    )
    for shape in args.shapes:
        layers, d, seq = (int(x) for x in shape.split("x"))
        for dtype in args.dtypes:
            ours, theirs = [], []
            for _ in range(args.rounds):
                theirs.append(
                    torch_tokens_per_second(
                        layers, d, seq, args.vocab, args.batch, dtype, args.steps
                    )
                )
                ours.append(
                    jax_tokens_per_second(layers, d, seq, args.vocab, args.batch, dtype, args.steps)
                )
            t, j = statistics.median(theirs), statistics.median(ours)
            print(
                f"{shape:>12s} {dtype:>9s} {t:12,.0f} {j:16,.0f} {j / t:6.2f}  "
                f"(rounds: torch {' '.join(f'{x:,.0f}' for x in theirs)}; "
                f"jaxformer {' '.join(f'{x:,.0f}' for x in ours)}; load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
