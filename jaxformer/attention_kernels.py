"""Vendor attention kernels behind `jaxformer.attention.dot_product_attention`: cuDNN and Pallas splash.

Each kernel has a `*_unsupported` check that returns why the given inputs cannot run on it (None when
they can), so the "auto" implementation can fall back and an explicit request can fail with a reason.
Layouts follow `jax.nn.dot_product_attention`: query [B, T, N, H], key/value [B, S, K, H].
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Array = jax.Array

# Mesh axes the splash kernel is mapped over under a mesh: batch over these (those that divide it)...
SPLASH_BATCH_AXES = ("data", "fsdp")
# ...and query/key/value heads over this one (when it divides them).
SPLASH_HEAD_AXIS = "tensor"
# Run splash in the Pallas interpreter (any backend, slow): lets CPU tests check its numerics.
SPLASH_INTERPRET = False
# Candidate splash tile sizes, largest first; the kernel needs multiples of 128 that divide the length.
_SPLASH_BLOCKS = (512, 256, 128)


def current_platform() -> str:
    """Platform the surrounding computation targets: the `jax.set_mesh` mesh's devices, else the default.

    The mesh wins so that ahead-of-time compiles for a TPU topology on a CPU host pick the TPU kernels.
    """
    mesh = jax.sharding.get_abstract_mesh()
    device = getattr(mesh, "abstract_device", None)
    if not mesh.empty and device is not None:
        return device.platform
    return jax.default_backend()


# ----------------------------------------------------------------------------- cuDNN (NVIDIA GPU)


def cudnn_unsupported(query: Array, *, bias, sliding_window, is_causal) -> Optional[str]:
    """Why cuDNN flash attention can't take these inputs (None if it can), as `auto` sees it."""
    if current_platform() != "gpu":
        return f"cuDNN needs an NVIDIA GPU, not {current_platform()!r}"
    if query.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention takes bf16/fp16, not {query.dtype}"
    head_dim = query.shape[-1]
    if head_dim % 8 or head_dim > 128:
        return f"cuDNN needs head_dim a multiple of 8 and <= 128, not {head_dim}"
    if bias is not None:
        return "an additive bias is materialised at [B, N, T, S] by cuDNN"
    if sliding_window is not None and not is_causal:
        return "cuDNN has no two-sided (non-causal) sliding window"
    return None


def cudnn_unsupported_options(
    *, logit_softcap: Optional[float], static_window: bool
) -> Optional[str]:
    """Why cuDNN can't run these attention options whatever the inputs (None if it can)."""
    if logit_softcap is not None:
        return "cuDNN attention has no logit soft-cap"
    if not static_window:
        return "cuDNN needs a sliding window known at trace time, not a traced (per-layer) one"
    return None


def cudnn_attention(
    query, key, value, *, bias, mask, is_causal, segment_ids, kv_segment_ids, sliding_window, scale
) -> Array:
    """cuDNN flash attention via `jax.nn.dot_product_attention`; masks travel as a [B?, 1, T, S] bias."""
    if current_platform() != "gpu":
        raise ValueError(
            f"implementation='cudnn' needs an NVIDIA GPU, but JAX runs on "
            f"{current_platform()!r}; use 'plain', 'chunked' or 'auto'"
        )
    b, t, _, _ = query.shape
    s = key.shape[1]
    if segment_ids is not None:
        kv = segment_ids if kv_segment_ids is None else kv_segment_ids
        segments = (segment_ids[:, :, None] == kv[:, None, :])[:, None]
        mask = segments if mask is None else jnp.logical_and(mask, segments)
    if mask is not None:  # cuDNN wants full query and key lengths on the mask/bias
        mask = jnp.asarray(mask)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        mask = jnp.broadcast_to(mask, mask.shape[:2] + (t, s))
    if bias is not None:
        bias = jnp.asarray(bias)
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        bias = jnp.broadcast_to(bias, bias.shape[:2] + (t, s)).astype(query.dtype)
    window = None
    if sliding_window is not None:
        window = (sliding_window - 1, 0 if is_causal else sliding_window - 1)
    return jax.nn.dot_product_attention(
        query,
        key,
        value,
        bias=bias,
        mask=mask,
        scale=scale,
        is_causal=is_causal,
        local_window_size=window,
        implementation="cudnn",
    )


# ----------------------------------------------------------------------------- Pallas splash (TPU)


def _block(length: int) -> Optional[int]:
    return next((b for b in _SPLASH_BLOCKS if length % b == 0), None)


def splash_unsupported(
    query: Array, key: Array, *, bias, mask, static_window: bool = True
) -> Optional[str]:
    """Why the splash kernel can't take these inputs (None if it can)."""
    if current_platform() != "tpu":
        return f"the splash kernel needs a TPU, not {current_platform()!r}"
    if not static_window:
        return (
            "splash builds its mask from a sliding window known at trace time, not a traced "
            "(per-layer) one"
        )
    if bias is not None:
        return "splash attention takes no additive bias"
    if mask is not None:
        return (
            "splash attention takes only structural masks (is_causal, sliding_window, "
            "segment_ids), not an arbitrary mask array"
        )
    t, s = query.shape[1], key.shape[1]
    if _block(t) is None or _block(s) is None:
        return f"splash needs lengths that are multiples of 128, not q_len={t}, kv_len={s}"
    return None


def splash_attention(
    query,
    key,
    value,
    *,
    is_causal,
    segment_ids,
    kv_segment_ids,
    sliding_window,
    scale,
    logit_softcap=None,
) -> Array:
    """Splash attention (check `splash_unsupported` first), one kernel call per example and shard.

    Rows that see no key at all (possible only with separate kv_segment_ids) are undefined here.
    """
    b, t, n, _ = query.shape
    s, k = key.shape[1], key.shape[2]
    # splash never scales the logits itself; [B, T, N, H] -> [B, N, T, H] as the kernel wants.
    q_BxNxTxH = (query * jnp.asarray(scale, query.dtype)).transpose(0, 2, 1, 3)
    k_BxKxSxH, v_BxKxSxH = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    run = functools.partial(
        _splash_local,
        is_causal=is_causal,
        sliding_window=sliding_window,
        logit_softcap=logit_softcap,
        q_len=t,
        kv_len=s,
    )
    args = (q_BxNxTxH, k_BxKxSxH, v_BxKxSxH)
    if segment_ids is not None:
        args += (segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32))
    mesh = jax.sharding.get_abstract_mesh()
    # Axes an enclosing shard_map made manual are already split; map over the others only.
    sizes = (
        {}
        if mesh.empty
        else {
            name: size
            for name, size, kind in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types)
            if kind != jax.sharding.AxisType.Manual
        }
    )
    if sizes:
        q_spec, kv_spec, seg_spec = _splash_specs(sizes, b, n, k)
        run = jax.shard_map(
            run,
            mesh=mesh,
            in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec)[: len(args)],
            out_specs=q_spec,
            axis_names=set(sizes),
            check_vma=False,
        )
    return run(*args).transpose(0, 2, 1, 3)


def _splash_specs(sizes: dict[str, int], b: int, n: int, k: int) -> tuple[P, P, P]:
    """Partition specs for q [B, N, T, H], k/v [B, K, S, H] and segment ids [B, T]."""
    batch, shards = [], 1
    for axis in SPLASH_BATCH_AXES:
        if axis in sizes and b % (shards * sizes[axis]) == 0:
            batch.append(axis)
            shards *= sizes[axis]
    batch_spec = tuple(batch) or None
    q_heads = kv_heads = None
    tp = sizes.get(SPLASH_HEAD_AXIS, 1)
    if tp > 1 and n % tp == 0:
        if k % tp == 0:  # each shard keeps whole GQA groups
            q_heads = kv_heads = SPLASH_HEAD_AXIS
        elif k == 1:  # MQA: every shard reads the one K/V head
            q_heads = SPLASH_HEAD_AXIS
    return (
        P(batch_spec, q_heads, None, None),
        P(batch_spec, kv_heads, None, None),
        P(batch_spec, None),
    )


def _splash_local(
    q_BxNxTxH,
    k_BxKxSxH,
    v_BxKxSxH,
    q_seg_BxT=None,
    kv_seg_BxS=None,
    *,
    is_causal,
    sliding_window,
    logit_softcap,
    q_len,
    kv_len,
):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # Pallas TPU: load lazily

    shape = (q_len, kv_len)
    if sliding_window is not None:
        right = 0 if is_causal else sliding_window - 1
        head_mask = sa.LocalMask(shape, window_size=(sliding_window - 1, right), offset=0)
    elif is_causal:
        head_mask = sa.CausalMask(shape)
    else:
        head_mask = sa.FullMask(shape)
    bq, bkv = _block(q_len), _block(kv_len)
    blocks = sa.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    # Built per shard, so the mask covers exactly the heads this shard holds.
    kernel = sa.make_splash_mha(
        sa.MultiHeadMask([head_mask] * q_BxNxTxH.shape[1]),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        attn_logits_soft_cap=logit_softcap,  # applied to the (pre-scaled) logits, before masking
        interpret=SPLASH_INTERPRET,
    )
    if q_seg_BxT is None:
        return jax.vmap(lambda q, k, v: kernel(q, k, v))(q_BxNxTxH, k_BxKxSxH, v_BxKxSxH)
    return jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=sa.SegmentIds(qs, ks)))(
        q_BxNxTxH, k_BxKxSxH, v_BxKxSxH, q_seg_BxT, kv_seg_BxS
    )
