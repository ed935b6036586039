"""Attention as pure functions: dot-product attention (plain, chunked, cuDNN, splash) and masks.

Shapes follow `jax.nn.dot_product_attention`: query [B, T, N, H], key/value [B, S, K, H] with
N a multiple of K (GQA/MQA); masks are boolean (True = may attend) and biases additive, each
broadcastable to [B, N, T, S]. No Flax and no config here, so any JAX code can call these.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer import attention_kernels as kernels
from jaxformer import attention_plain as plain_lib
from jaxformer.attention_plain import softcap

Array = jax.Array
Window = Union[int, Array]
"""A sliding window: a Python int (static), or a traced integer scalar (e.g. one per scanned layer)."""

# A large finite negative rather than -inf keeps fully masked rows finite (uniform weights, no NaN).
# The chunked variant gives such a row uniform weights over the key blocks it visits (0 if it
# skipped them all); the output of a row that may see nothing is meaningless, only its finiteness
# matters (0 x NaN would poison the rows that do see keys).
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

IMPLEMENTATIONS = ("auto", "plain", "chunked", "cudnn", "splash")
"""The kernels `implementation` (and ModelConfig.attention_impl) may name."""

# "auto" switches from plain to chunked attention at this many logits per (example, head). Plain
# materialises [B, N, T, S] float32 logits and probabilities and keeps them for the backward pass
# (4 MiB each per example and head at 1024 x 1024); chunked keeps O(T x chunk). Measured on CPU
# (fwd+bwd, 8 heads of 64): chunked is 1.5x slower at 512 (one block, only overhead), 1.2-1.4x
# faster at 1024, and at 2048 causal 1.7x faster (it skips the fully masked blocks).
CHUNKED_MIN_LOGITS = 1024 * 1024
# Plain causal self-attention from this length on runs blocks of query rows apart, each against
# the keys up to its last row: two halves up to 2 x CAUSAL_BLOCK_ROWS, blocks of about that many
# rows beyond. Measured on CPUs, bfloat16 train steps: 88 vs 101 ms at the default run's shape
# (T = 128; 4 blocks: 110-124 ms), 1.47 vs 1.61 s at 6 x 384, T = 256 (4 blocks: 1.53-1.57 s);
# float32 within noise; a batch-16 prefill of 896 tokens: 1.68 s in 7 blocks, 2.03 s in 2.
CAUSAL_SPLIT_MIN_LENGTH = 128
CAUSAL_BLOCK_ROWS = 128


# ----------------------------------------------------------------------------- mask builders


def causal_mask(q_len: int, kv_len: Optional[int] = None, *, offset: int = 0) -> Array:
    """[1, 1, T, S] mask letting query i see keys j <= i + offset."""
    kv_len = q_len if kv_len is None else kv_len
    q_pos = jnp.arange(q_len)[:, None] + offset
    return (jnp.arange(kv_len)[None, :] <= q_pos)[None, None]


def padding_mask(kv_valid_BxS: Array, q_valid_BxT: Optional[Array] = None) -> Array:
    """[B, 1, T or 1, S] mask from per-token validity (True/1 = real token)."""
    mask = kv_valid_BxS.astype(bool)[:, None, None, :]
    if q_valid_BxT is not None:
        mask = mask & q_valid_BxT.astype(bool)[:, None, :, None]
    return mask


def segment_mask(q_segment_ids_BxT: Array, kv_segment_ids_BxS: Optional[Array] = None) -> Array:
    """[B, 1, T, S] mask letting a token see only tokens of its own packed document."""
    kv = q_segment_ids_BxT if kv_segment_ids_BxS is None else kv_segment_ids_BxS
    return (q_segment_ids_BxT[:, :, None] == kv[:, None, :])[:, None]


def sliding_window_mask(
    q_len: int,
    kv_len: Optional[int] = None,
    *,
    window: Window,
    causal: bool = True,
    offset: int = 0,
) -> Array:
    """[1, 1, T, S] mask letting query i see keys within `window` positions (looking back only if causal)."""
    kv_len = q_len if kv_len is None else kv_len
    dist = jnp.arange(q_len)[:, None] + offset - jnp.arange(kv_len)[None, :]
    allowed = dist < window
    allowed &= (dist >= 0) if causal else (dist > -window)
    return allowed[None, None]


def is_static_window(window: Optional[Window]) -> bool:
    """Whether a window is known at trace time (None or an int), as the fused kernels need."""
    return window is None or isinstance(window, (int, np.integer))


def combine_masks(*masks: Optional[Array]) -> Optional[Array]:
    """Logical AND of the given masks (None entries are skipped)."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    return functools.reduce(jnp.logical_and, present)


def relative_position_buckets(
    relative_position: Array, *, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128
) -> Array:
    """T5 buckets for relative_position = key_pos - query_pos: exact near zero, log-spaced far away."""
    bucket = jnp.zeros_like(relative_position)
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        bucket += (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # log-spaced buckets for distances from max_exact up to max_distance
    n_safe = jnp.maximum(n, 1).astype(jnp.float32)
    large = max_exact + (
        jnp.log(n_safe / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(is_small, n, large)


# ----------------------------------------------------------------------------- attention


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    bias: Optional[Array] = None,
    mask: Optional[Array] = None,
    is_causal: bool = False,
    segment_ids: Optional[Array] = None,
    kv_segment_ids: Optional[Array] = None,
    sliding_window: Optional[Window] = None,
    scale: Optional[float] = None,
    logit_softcap: Optional[float] = None,
    implementation: str = "plain",
    q_chunk_size: int = 512,
    kv_chunk_size: int = 512,
) -> Array:
    """Scaled dot-product attention over [B, T, N, H] queries and [B, S, K, H] keys/values.

    `is_causal`, `segment_ids` (packed documents) and `sliding_window` are structural masks that the
    chunked variant builds block by block, so its memory stays linear in the sequence length; `mask`
    and `bias` are combined as given. `sliding_window` may be a traced scalar (a per-layer window
    under scan); only plain and chunked take one. `logit_softcap` turns the scaled logits into
    cap * tanh(logits / cap) before masking (Gemma 2). The softmax runs in float32 whatever the
    input dtype. `implementation="auto"` picks the fastest variant that can take the inputs (see
    `select_implementation`); "splash" (TPU) and "cudnn" (NVIDIA GPU) raise when they can't.
    """
    _check_shapes(query, key, value)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; "
            f"valid: {', '.join(IMPLEMENTATIONS)}"
        )
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if isinstance(sliding_window, np.integer):  # a layer's entry of a static per-layer table
        sliding_window = int(sliding_window)
    structure = dict(
        is_causal=is_causal,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        sliding_window=sliding_window,
    )
    if implementation == "auto":
        implementation, _ = select_implementation(
            query, key, bias=bias, mask=mask, logit_softcap=logit_softcap, **structure
        )
    if implementation == "cudnn":
        reason = kernels.cudnn_unsupported_options(
            logit_softcap=logit_softcap, static_window=is_static_window(sliding_window)
        )
        if reason is not None:
            raise ValueError(f"implementation='cudnn' can't run: {reason}; 'auto' falls back")
        return kernels.cudnn_attention(
            query, key, value, bias=bias, mask=mask, scale=scale, **structure
        )
    if implementation == "splash":
        reason = kernels.splash_unsupported(
            query, key, bias=bias, mask=mask, static_window=is_static_window(sliding_window)
        )
        if reason is not None:
            raise ValueError(f"implementation='splash' can't run: {reason}; 'auto' falls back")
        return kernels.splash_attention(
            query, key, value, scale=scale, logit_softcap=logit_softcap, **structure
        )
    if segment_ids is not None and kv_segment_ids is None:
        structure["kv_segment_ids"] = segment_ids
    if implementation == "chunked":
        return _chunked_attention(
            query,
            key,
            value,
            bias,
            mask,
            scale,
            q_chunk_size,
            kv_chunk_size,
            logit_softcap=logit_softcap,
            **structure,
        )
    return _plain_attention(
        query, key, value, bias, mask, scale, logit_softcap=logit_softcap, **structure
    )


def select_implementation(
    query: Array,
    key: Array,
    *,
    bias: Optional[Array] = None,
    mask: Optional[Array] = None,
    is_causal: bool = False,
    segment_ids: Optional[Array] = None,
    kv_segment_ids: Optional[Array] = None,
    sliding_window: Optional[Window] = None,
    logit_softcap: Optional[float] = None,
) -> tuple[str, str]:
    """The implementation "auto" runs for these inputs, and why: (name, reason).

    TPU: the Pallas splash kernel; NVIDIA GPU: cuDNN flash attention; otherwise, or when the kernel
    can't express the inputs (an additive bias, an arbitrary mask, odd lengths or dtypes, a traced
    sliding window, a logit soft-cap on cuDNN), "chunked"
    from CHUNKED_MIN_LOGITS logits per (example, head) on and "plain" below. The platform is that of
    the `jax.set_mesh` mesh if one is set (so AOT compiles for TPU pick splash), else JAX's default.
    """
    del segment_ids, kv_segment_ids  # every implementation takes them
    platform = kernels.current_platform()
    fallback = None
    static_window = is_static_window(sliding_window)
    if platform == "tpu":
        fallback = kernels.splash_unsupported(
            query, key, bias=bias, mask=mask, static_window=static_window
        )
        if fallback is None:
            return "splash", "TPU: Pallas splash attention"
    elif platform == "gpu":
        fallback = kernels.cudnn_unsupported(
            query, bias=bias, sliding_window=sliding_window, is_causal=is_causal
        ) or kernels.cudnn_unsupported_options(
            logit_softcap=logit_softcap, static_window=static_window
        )
        if fallback is None:
            return "cudnn", "NVIDIA GPU: cuDNN flash attention"
    logits = query.shape[1] * key.shape[1]
    name = "chunked" if logits >= CHUNKED_MIN_LOGITS else "plain"
    reason = (
        f"{query.shape[1]} x {key.shape[1]} logits per head "
        f"{'>=' if name == 'chunked' else '<'} {CHUNKED_MIN_LOGITS}"
    )
    return name, reason if fallback is None else f"{fallback}; {reason}"


def _check_shapes(query: Array, key: Array, value: Array) -> None:
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            "attention expects [batch, length, heads, head_dim] arrays; got shapes "
            f"query {query.shape}, key {key.shape}, value {value.shape}"
        )
    if key.shape != value.shape:
        raise ValueError(f"key {key.shape} and value {value.shape} must have the same shape")
    if query.shape[0] != key.shape[0] or query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query {query.shape} and key {key.shape} differ in batch or head_dim")
    if query.shape[2] % key.shape[2]:
        raise ValueError(
            f"query has {query.shape[2]} heads, not a multiple of the {key.shape[2]} "
            "key/value heads (GQA needs each K/V head to serve the same number of "
            "query heads)"
        )


def _structural_mask(
    q_idx: Array, kv_idx: Array, *, is_causal, segment_ids, kv_segment_ids, sliding_window
) -> Optional[Array]:
    """Mask [B or 1, 1, t, s] for query positions q_idx [t] and key positions kv_idx [s]."""
    mask = None
    if is_causal:
        mask = (kv_idx[None, :] <= q_idx[:, None])[None, None]
    if sliding_window is not None:
        dist = q_idx[:, None] - kv_idx[None, :]
        lower = dist >= 0 if is_causal else dist > -sliding_window
        mask = combine_masks(mask, ((dist < sliding_window) & lower)[None, None])
    if segment_ids is not None:
        mask = combine_masks(mask, segment_mask(segment_ids, kv_segment_ids))
    return mask


def _grouped(query: Array, num_kv_heads: int) -> Array:
    """[B, T, N, H] -> [B, T, K, G, H] so each K/V head serves G query heads without copying K/V."""
    b, t, n, h = query.shape
    return query.reshape(b, t, num_kv_heads, n // num_kv_heads, h)


def _grouped_bias_or_mask(x: Optional[Array], num_kv_heads: int) -> Optional[Array]:
    """[B?, N?, T, S] -> [B?, K?, G?, T, S] matching the grouped logits layout."""
    if x is None:
        return None
    x = jnp.asarray(x)
    while x.ndim < 4:
        x = x[None]
    b, n, t, s = x.shape
    if n == 1:
        return x[:, :, None]
    return x.reshape(b, num_kv_heads, n // num_kv_heads, t, s)


def _logits(
    q_BxTxKxGxH: Array, k_BxSxKxH: Array, scale: float, logit_softcap: Optional[float]
) -> Array:
    logits = jnp.einsum(
        "btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32
    )
    return softcap(logits * scale, logit_softcap)


def _plain_attention(query, key, value, bias, mask, scale, *, logit_softcap, **structure) -> Array:
    b, t, n, h = query.shape
    s, k = key.shape[1], key.shape[2]
    full_mask = combine_masks(
        _grouped_bias_or_mask(mask, k),
        _grouped_bias_or_mask(_structural_mask(jnp.arange(t), jnp.arange(s), **structure), k),
    )
    q_BxKxGxTxH = _grouped(query, k).transpose(0, 2, 3, 1, 4)
    k_BxKxSxH, v_BxKxSxH = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
    bias = _grouped_bias_or_mask(bias, k)
    # Causal self-attention in blocks of query rows, each against the keys up to its last row:
    # the logits above the diagonal's blocks (and their softmax and gradient, memory-bound
    # passes on CPUs) are never computed. Exact: the skipped logits are all masked.
    blocks = _causal_query_blocks(t, s, structure["is_causal"])
    matmul_dtype = None
    if blocks > 1 and jnp.dtype(query.dtype).itemsize < 4:  # bf16 / f16 compute
        # The blocks' partial gradients of k and v (and the pieces of q's) then meet in float32
        # and are rounded once: summed in bfloat16, XLA's CPU backend rounded after every block
        # in one slow fusion of pads and converts (bf16, 12 x 192 x 512: 364 of 3,100 ms).
        matmul_dtype = query.dtype
        q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH = (
            x.astype(jnp.float32) for x in (q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH)
        )
    outs = []
    for i in range(blocks):
        rows = slice(i * t // blocks, (i + 1) * t // blocks)
        keys = slice(0, rows.stop if blocks > 1 else s)
        outs.append(
            plain_lib.attend(
                q_BxKxGxTxH[:, :, :, rows],
                k_BxKxSxH[:, :, keys],
                v_BxKxSxH[:, :, keys],
                _rows_and_keys(bias, rows, keys.stop),
                _rows_and_keys(full_mask, rows, keys.stop),
                scale,
                logit_softcap,
                _MASK_VALUE,
                matmul_dtype,
            )
        )
    out_BxKxGxTxH = jnp.concatenate(outs, axis=3) if blocks > 1 else outs[0]
    return out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(query.dtype)


def _causal_query_blocks(t: int, s: int, is_causal: bool) -> int:
    """How many blocks of query rows plain causal self-attention of length t runs apart."""
    if not is_causal or t != s or t < CAUSAL_SPLIT_MIN_LENGTH:
        return 1
    return max(2, t // CAUSAL_BLOCK_ROWS)


def _rows_and_keys(x: Optional[Array], rows: slice, keys: int) -> Optional[Array]:
    """A [..., T, S] bias or mask (size-1 axes broadcast) cut to query rows and the first keys."""
    x = _slice_tq(x, rows.start, rows.stop - rows.start, -2)
    return _slice_tq(x, 0, keys, -1)


def _slice_tq(x: Optional[Array], start, size, axis) -> Optional[Array]:
    """Slice a broadcastable mask/bias along one axis unless that axis is broadcast (size 1)."""
    if x is None or x.shape[axis] == 1:
        return x
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _kv_blocks(x: Optional[Array], axis: int, size: int) -> Optional[Array]:
    """Split a key-length axis into scan blocks: [..., S, ...] -> [S // size, ..., size, ...]."""
    if x is None:
        return None
    x = x.reshape(x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _chunked_attention(
    query,
    key,
    value,
    bias,
    mask,
    scale,
    q_chunk,
    kv_chunk,
    *,
    logit_softcap,
    is_causal,
    segment_ids,
    kv_segment_ids,
    sliding_window,
) -> Array:
    """Online-softmax attention over [q_chunk, kv_chunk] blocks; memory linear in length.

    Key blocks that causality or the sliding window hide entirely from a query block are skipped
    (about half the work when causal). K/V, bias and mask blocks are the scan's inputs rather than
    slices of closed-over arrays, so the backward pass accumulates block-sized gradients per step.
    """
    b, t, n, h = query.shape
    s, k = key.shape[1], key.shape[2]
    q_chunk, kv_chunk = min(q_chunk, t), min(kv_chunk, s)
    t_pad, s_pad = -t % q_chunk, -s % kv_chunk
    # Padded keys are masked out through kv_valid; padded queries are sliced off at the end.
    kv_valid = jnp.arange(s + s_pad) < s
    query = jnp.pad(query, ((0, 0), (0, t_pad), (0, 0), (0, 0)))
    key = jnp.pad(key, ((0, 0), (0, s_pad), (0, 0), (0, 0)))
    value = jnp.pad(value, ((0, 0), (0, s_pad), (0, 0), (0, 0)))

    def pad_tq(x, axis_t, axis_s):
        if x is None:
            return None
        x = jnp.asarray(x)
        while x.ndim < 4:
            x = x[None]
        widths = [(0, 0)] * 4
        if x.shape[axis_t] != 1:
            widths[axis_t] = (0, t_pad)
        if x.shape[axis_s] != 1:
            widths[axis_s] = (0, s_pad)
        return jnp.pad(x, widths)

    bias, mask = pad_tq(bias, 2, 3), pad_tq(mask, 2, 3)
    if segment_ids is not None:
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, t_pad)))
        kv_segment_ids = jnp.pad(kv_segment_ids, ((0, 0), (0, s_pad)))

    q_grouped = _grouped(query, k)
    g = n // k
    num_q, num_kv = (t + t_pad) // q_chunk, (s + s_pad) // kv_chunk
    kv_xs = (
        jnp.arange(num_kv) * kv_chunk,
        _kv_blocks(key, 1, kv_chunk),
        _kv_blocks(value, 1, kv_chunk),
        _kv_blocks(kv_valid, 0, kv_chunk),
        _kv_blocks(kv_segment_ids, 1, kv_chunk),
    )
    skip_blocks = is_causal or sliding_window is not None

    def visible(q_start, kv_start):
        """Whether any key of the block at kv_start survives causality and the window."""
        q_end, kv_end = q_start + q_chunk - 1, kv_start + kv_chunk - 1
        ok = True
        if is_causal:
            ok = kv_start <= q_end
        if sliding_window is not None:
            ok &= kv_end > q_start - sliding_window
            if not is_causal:
                ok &= kv_start < q_end + sliding_window
        return ok

    @jax.checkpoint  # the backward pass recomputes one query block at a time: linear memory
    def attend_q_block(q_start):
        q_blk = jax.lax.dynamic_slice_in_dim(q_grouped, q_start, q_chunk, axis=1)
        q_idx = q_start + jnp.arange(q_chunk)
        q_seg = (
            None
            if segment_ids is None
            else jax.lax.dynamic_slice_in_dim(segment_ids, q_start, q_chunk, axis=1)
        )
        bias_q = _slice_tq(bias, q_start, q_chunk, 2)
        mask_q = _slice_tq(mask, q_start, q_chunk, 2)
        # A bias or mask broadcast over keys (size 1) is used whole in every block instead.
        xs = kv_xs + tuple(
            None if x is None or x.shape[3] == 1 else _kv_blocks(x, 3, kv_chunk)
            for x in (bias_q, mask_q)
        )

        # Rematerialised too, so a step saves only its carry for the backward pass rather than
        # [tq, sk] probabilities; a skipped block (whose cond must return the same residuals
        # as a computed one) then writes nothing big either.
        @functools.partial(jax.checkpoint, prevent_cse=False)
        def attend_kv_block(carry, x):
            m_prev, l_prev, acc_prev = carry
            kv_start, k_blk, v_blk, valid_blk, kv_seg, bias_blk, mask_blk = x
            kv_idx = kv_start + jnp.arange(kv_chunk)
            logits = _logits(q_blk, k_blk, scale, logit_softcap)  # [B, K, G, tq, sk]
            bias_blk = bias_q if bias_blk is None else bias_blk
            if bias_blk is not None:
                logits = logits + _grouped_bias_or_mask(bias_blk, k).astype(jnp.float32)
            blk_mask = combine_masks(
                valid_blk[None, None, None, :],
                mask_q if mask_blk is None else mask_blk,
                _structural_mask(
                    q_idx,
                    kv_idx,
                    is_causal=is_causal,
                    segment_ids=q_seg,
                    kv_segment_ids=kv_seg,
                    sliding_window=sliding_window,
                ),
            )
            logits = jnp.where(_grouped_bias_or_mask(blk_mask, k), logits, _MASK_VALUE)
            m_new = jnp.maximum(m_prev, logits.max(axis=-1))
            correction = jnp.exp(m_prev - m_new)
            p = jnp.exp(logits - m_new[..., None])
            l_new = l_prev * correction + p.sum(axis=-1)
            pv = jnp.einsum(
                "bkgts,bskh->bkgth",
                p.astype(value.dtype),
                v_blk,
                preferred_element_type=jnp.float32,
            )
            acc_new = acc_prev * correction[..., None] + pv
            return m_new, l_new, acc_new

        def kv_step(carry, x):
            if not skip_blocks:
                return attend_kv_block(carry, x), None
            # A real conditional (the predicate depends only on loop indices, so it stays one under
            # vmap and autodiff): fully masked blocks cost no matmul, forward or backward.
            return jax.lax.cond(
                visible(q_start, x[0]), attend_kv_block, lambda c, _: c, carry, x
            ), None

        init = (
            jnp.full((b, k, g, q_chunk), -jnp.inf, jnp.float32),
            jnp.zeros((b, k, g, q_chunk), jnp.float32),
            jnp.zeros((b, k, g, q_chunk, h), jnp.float32),
        )
        (_, denom, acc), _ = jax.lax.scan(kv_step, init, xs)
        # A row that sees no key gets 0 if every block was skipped, else uniform weights.
        return acc / jnp.where(denom == 0, 1.0, denom)[..., None]  # [B, K, G, tq, H]

    blocks = jax.lax.map(attend_q_block, jnp.arange(num_q) * q_chunk)  # [nq, B, K, G, tq, H]
    out = jnp.transpose(blocks, (1, 0, 4, 2, 3, 5)).reshape(b, t + t_pad, n, h)
    return out[:, :t].astype(query.dtype)
