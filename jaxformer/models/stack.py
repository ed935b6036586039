"""The layer stack: blocks with parameters stacked on a leading `layers` axis, run by scan.

One `Block` module holds every layer's parameters ([layers, ...] arrays, logical axis `layers`).
`run_blocks` scans over them (compile time flat in depth) or, with `scan=False`, unrolls a Python
loop over the same stacked parameters, so checkpoints do not depend on the choice. Remat wraps the
per-layer body once. The KV cache is stacked the same way: [layers, batch, kv_heads, length, dim]
(see Attention.decode for why heads come before slots).
Per-layer sliding windows (local/global patterns) are one more scanned input: inside the scanned
body a layer's window is a traced scalar, which the plain and chunked attention masks take.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.attention_layer import AttentionInputs
from jaxformer.logical import constrain
from jaxformer.models.block import Block
from jaxformer.models.config import CHOICES, ModelConfig

Array = jax.Array
CACHE_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")
# Cross-attention keys/values of an encoder output, projected once: [layers, B, S, K, H].
CROSS_CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")

REMAT_POLICIES: dict[str, Optional[Callable]] = {
    "full": None,  # save nothing but the layer input: recompute the block in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep the same matmul outputs, but in host memory (TPU/GPU backends with pinned host memory).
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims(
        offload_src="device", offload_dst="pinned_host"
    ),
}
# ModelConfig can't import this module (this module imports it), so it lists the remat names
# itself; this keeps that list and the policies in step.
assert set(REMAT_POLICIES) == set(CHOICES["remat"]) - {"none"}, "REMAT_POLICIES vs CHOICES"


def make_blocks(
    cfg: ModelConfig, depth: int, *, cross_attention: bool = False, rngs: nnx.Rngs
) -> Block:
    """`depth` blocks as one Block whose parameters are stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(layer_rngs: nnx.Rngs) -> Block:
        return Block(cfg, cross_attention=cross_attention, rngs=layer_rngs)

    return create(rngs)


def num_layers(blocks: Block) -> int:
    """Depth of a stacked Block."""
    return jax.tree.leaves(nnx.state(blocks, nnx.Param))[0].shape[0]


def _layer(tree, i: int):
    return jax.tree.map(lambda a: a[i], tree)


def _stack(trees: list):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def _loop(body: Callable, carry, xs, depth: int, scan: bool):
    """jax.lax.scan(body, carry, xs), or the same as an unrolled Python loop."""
    if scan:
        return jax.lax.scan(body, carry, xs)
    ys = []
    for i in range(depth):
        carry, y = body(carry, _layer(xs, i))
        ys.append(y)
    return carry, _stack(ys)


def _windows(windows: Optional[Sequence[int]], depth: int) -> Optional[np.ndarray]:
    """The per-layer window table as a scanned input (None: the inputs' own sliding_window)."""
    if windows is None:
        return None
    if len(windows) != depth:
        raise ValueError(f"{len(windows)} per-layer windows for {depth} layers")
    # numpy, not jnp: an unrolled loop then hands each layer a static int (any kernel may run).
    return np.asarray(windows, np.int32)


def _with_window(inputs: AttentionInputs, window) -> AttentionInputs:
    return inputs if window is None else inputs._replace(sliding_window=window)


def run_blocks(
    blocks: Block,
    x_BxLxD: Array,
    self_inputs: AttentionInputs,
    *,
    remat: str = "none",
    scan: bool = True,
    context_BxSxD: Optional[Array] = None,
    cross_inputs: AttentionInputs = AttentionInputs(),
    windows: Optional[Sequence[int]] = None,
) -> Array:
    """Applies the stacked blocks in order; rematerialises each layer as `remat` asks.

    `windows` (one per layer, e.g. ModelConfig.layer_windows) replaces self_inputs.sliding_window
    layer by layer.
    """
    # Only the RNG state comes back out of the loop (its counters move on); the rest of the
    # non-Param state (e.g. a QLoRA base's quantized kernels) is read, never changed, and
    # returning it would write a second copy of it, all layers, as the scan's output.
    graphdef, params, rngs, rest = nnx.split(blocks, nnx.Param, nnx.RngState, ...)
    depth = num_layers(blocks)

    def body(x, layer):
        *layer_state, window = layer
        block = nnx.merge(graphdef, *layer_state)
        x = block(x, _with_window(self_inputs, window), context_BxSxD, cross_inputs)
        return x, nnx.state(block, nnx.RngState)

    if remat != "none":
        if remat not in REMAT_POLICIES:
            raise ValueError(
                f"unknown remat policy {remat!r}; valid: none, {', '.join(REMAT_POLICIES)}"
            )
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    x_BxLxD, rngs = _loop(
        body, x_BxLxD, (params, rngs, rest, _windows(windows, depth)), depth, scan
    )
    nnx.update(blocks, rngs)
    return x_BxLxD


def split_layers(blocks: Block) -> Optional[list]:
    """The stacked blocks' state as one state per layer, for `decode_blocks(layers=...)`; None
    for stacks deeper than SPLIT_DECODE_MAX_LAYERS (their decode keeps its scan).

    Split once before a token loop, each step reads every layer's weights where they lie: a layer
    loop over the stack inside the token loop slices each layer's weights out of it on every token
    (a copy, on XLA's CPU backend).
    """
    depth = num_layers(blocks)
    if depth > SPLIT_DECODE_MAX_LAYERS:
        return None
    state = nnx.split(blocks)[1]
    # The barrier keeps XLA from sinking the slices back into the loop that reads them.
    return jax.lax.optimization_barrier([_layer(state, i) for i in range(depth)])


def split_cache(cache: dict) -> list[dict]:
    """A stacked cache as one cache per layer ([B, ...] arrays), for `decode_blocks` with split
    `layers`: each layer then attends over its own buffer, where reading a layer of the stack
    copies it out, per layer and token (on CPUs, 1.46x the tokens/s of a batch-16 GPT-2 decode
    after 896-token prompts)."""
    depth = jax.tree.leaves(cache)[0].shape[0]
    return [_layer(cache, i) for i in range(depth)]


def without_batch_axis(caches: list[dict]) -> list[dict]:
    """Split caches of one row without the batch axis, keys [K, H, M] and values [K, M, H]
    (`Attention.decode` takes them so). XLA's CPU backend drops a size-1 batch axis from the
    attention's matmuls; a cache updated with that axis and read without it was copied four times
    per layer and token (GPT-2 shape, batch 1 after 896-token prompts: 192-200 vs 233-242
    tokens/s), and keys kept [K, M, H] were transposed whole for q @ k on every token
    (benchmarks/RESULTS.md)."""
    # Cross-attention's keys and values are only read: they keep their batch axis.
    return [dict(cache, k=jnp.swapaxes(cache["k"][0], 1, 2), v=cache["v"][0]) for cache in caches]


def cache_length(cache: Union[dict, list]) -> int:
    """The number of self-attention slots of a stacked or split cache."""
    return (cache[0] if isinstance(cache, list) else cache)["v"].shape[-2]


# Split layers unroll the decode step's layer loop: its compile time grows with depth.
SPLIT_DECODE_MAX_LAYERS = 16


def decode_blocks(
    blocks: Block,
    x_BxTxD: Array,
    cache: Union[dict, list],
    *,
    index: Array,
    self_inputs: AttentionInputs,
    cross_inputs: AttentionInputs = AttentionInputs(),
    scan: bool = True,
    windows: Optional[Sequence[int]] = None,
    layers: Optional[list] = None,
    last_only: bool = False,
) -> tuple[Array, Union[dict, list]]:
    """Applies the stacked blocks to new tokens with a stacked cache; returns the new cache.

    `windows` as in `run_blocks`. `layers` (`split_layers`, made outside a token loop) stands in
    for the blocks' stacked state, the layers unrolled; with them `cache` may be split
    (`split_cache`), and comes back split. `last_only`: returns the last token's output alone,
    [B, 1, D]; the last layer writes every token's keys and values but runs its queries, output
    projection and MLP for that token only (a prefill needs no more)."""
    graphdef, state = nnx.split(blocks)
    depth = num_layers(blocks)
    table = _windows(windows, depth)
    if layers is not None and len(layers) != depth:
        raise ValueError(f"{len(layers)} split layers for a stack of {depth}")

    def decode_layer(x, cache, layer_state, window, layer, last=False):
        return nnx.merge(graphdef, layer_state).decode(
            x,
            cache,
            index=index,
            self_inputs=_with_window(self_inputs, window),
            cross_inputs=cross_inputs,
            layer=layer,
            last_only=last,
        )

    def window_of(i: int):
        return None if table is None else table[i]

    def constrained(cache: dict, drop: int) -> dict:
        axes = dict(k=CACHE_AXES[drop:], v=CACHE_AXES[drop:])
        return {k: constrain(v, axes.get(k, CROSS_CACHE_AXES[drop:])) for k, v in cache.items()}

    if isinstance(cache, list):  # split: each layer's own buffers (layer=None)
        if layers is None:
            raise ValueError("a split cache (split_cache) needs split layers (split_layers)")
        new_cache = []
        for i, (layer_state, layer_cache) in enumerate(zip(layers, cache)):
            x_BxTxD, layer_cache = decode_layer(
                x_BxTxD, layer_cache, layer_state, window_of(i), None, last_only and i == depth - 1
            )
            new_cache.append(constrained(layer_cache, 1))
        return x_BxTxD, new_cache

    if layers is not None:
        for i, layer_state in enumerate(layers):
            last = last_only and i == depth - 1
            x_BxTxD, cache = decode_layer(
                x_BxTxD, cache, layer_state, window_of(i), np.int32(i), last
            )
        return x_BxTxD, constrained(cache, 0)

    # The stacked cache is carried, not scanned over as xs/ys: each layer writes its T new slots
    # into it in place (Attention.decode with `layer`). As xs/ys, XLA copied every layer's whole
    # cache out and back in for every token: passes over [B, M, K, H] that dominate a step with
    # a long prompt.
    def body(carry, layer):
        i, window = layer
        # The layer's weights read out of the stack, as scanning over them would; not the stack
        # sliced beforehand (a copy), which `last_only` would need for its loop one layer short.
        layer_state = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, False), state)
        return decode_layer(*carry, layer_state, window, i), None

    looped = depth - 1 if last_only else depth
    if looped:
        xs = (np.arange(looped, dtype=np.int32), None if table is None else table[:looped])
        (x_BxTxD, cache), _ = _loop(body, (x_BxTxD, cache), xs, looped, scan)
    if last_only:
        i = depth - 1
        x_BxTxD, cache = decode_layer(
            x_BxTxD, cache, _layer(state, i), window_of(i), np.int32(i), True
        )
    return x_BxTxD, constrained(cache, 0)


def init_cache(cfg: ModelConfig, depth: int, batch: int, length: int) -> dict:
    """An empty self-attention cache: keys and values [layers, B, K, length, H] of zeros."""
    shape = (depth, batch, cfg.kv_heads, length, cfg.dims_per_head)
    zeros = constrain(jnp.zeros(shape, cfg.dtype), CACHE_AXES)
    return dict(k=zeros, v=zeros)
