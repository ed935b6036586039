"""LoRA and QLoRA adapters on a built model's projections, stacked layers and per-head kernels included.

`apply_lora(model, cfg)` replaces, in place, every `nnx.Linear` / `nnx.Einsum` whose dotted path
matches one of `cfg.targets` by a `LoraProjection` computing

    y = base(x) + (dropout(x) @ A @ B) * alpha / rank

so model files stay unaware of adapters. B starts at zero: an adapted model starts as an exact
no-op. The base kernel is frozen: held in `cfg.base_dtype` (default bfloat16), or quantized
(`cfg.quantize`: int8 per output channel, or NF4 with double quantization, `jaxformer.quantize_nf4`)
and dequantized to the compute dtype inside the call. The adapters are float32 master weights whose
matmul runs in the layer's compute dtype (`model.dtype`, bfloat16 on a GPU).

Parameter layout (what checkpoints, merging and PEFT export read). For a wrapped module at
PATH (e.g. `blocks.self_attn.query`, `decoder_blocks.cross_attn.out`, `blocks.mlp.down`):

- `PATH.lora_a`: `nnx.LoRAParam`, shape [*stacked, *in, rank], logical axes
  (*stacked axes, *the base kernel's contracted axes, "lora_rank");
- `PATH.lora_b`: `nnx.LoRAParam`, shape [*stacked, rank, *out], logical axes
  (*stacked axes, "lora_rank", *the base kernel's output axes), zeros at creation;
- the base, frozen: `PATH.kernel` (`nnx.Param`, the base kernel's own shape, axes and path, in
  base_dtype) when not quantized, else int8 `PATH.kernel_q` + float32 `PATH.kernel_scale`
  (`QuantizedWeight` / `QuantizationScale` of jaxformer.inference.quantize, the scale keeping
  size-1 contracted axes), or NF4 `PATH.nf4_codes`, `PATH.nf4_absmax_q`, `PATH.nf4_absmax_scale`,
  `PATH.nf4_absmax_offset` (flattened per layer, see quantize_nf4); `PATH.bias` unchanged.

"stacked" is the `layers` axis of a scanned Block ([layers, ...]); "in"/"out" follow the base
kernel: an Einsum `BTD,DNH->BTNH` (query/key/value, kernel [embed, heads, head_dim]) gives
A [layers, embed, rank] and B [layers, rank, heads, head_dim]; `BTNH,NHD->BTD` (out, kernel
[heads, head_dim, embed]) gives A [layers, heads, head_dim, rank] and B [layers, rank, embed]; a
Linear kernel [in, out] gives A [in, rank], B [rank, out] (PEFT's lora_A.weight is A.T flattened
to [rank, in], lora_B.weight is B flattened to [out, rank], scale alpha / rank, the same). The
folded weight is kernel + scale * einsum(A, B) over the rank axis (`merged_kernel`).

Why not flax's `nnx.LoRA`/`nnx.LoRALinear`: they hold 2-D A [in, rank] / B [rank, out] for one
unstacked Linear; the per-head Einsums and the [layers, ...] stacks need other shapes, so only
their Variable type (`nnx.LoRAParam`) is taken. Why not qwix: its LoRA provider intercepts the
ops of a module's first call and creates the adapters then, which inside our scanned layer body
would make unstacked per-layer variables that the scan discards.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import math
from typing import Union

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

from jaxformer import quantize_nf4
from jaxformer.dense import Dense, Projection
from jaxformer.inference.quantize import QuantizationScale, QuantizedWeight, quantize_int8

Array = jax.Array
ALL_LINEAR = "all-linear"
"""The target naming every projection inside the stacked layers (not heads or poolers)."""
QUANTIZE = ("none", "int8", "nf4")
NF4_FIELDS = ("codes", "absmax_q", "absmax_scale", "absmax_offset")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on chosen projections; the rest of the model stays frozen."""

    targets: tuple[str, ...] = ()
    """Projection paths to adapt: dotted suffixes (`self_attn.query` matches blocks.self_attn.query
    and decoder_blocks.self_attn.query), globs (`*_blocks.mlp.*`) or 'all-linear'. Empty: no LoRA."""
    rank: int = 8
    alpha: float = 16.0
    """The update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""
    base_dtype: str = "bfloat16"
    """dtype of the frozen base parameters (when not quantized)."""
    quantize: str = "none"
    """Frozen base kernels of adapted projections: none, int8 (per output channel) or nf4 (QLoRA)."""
    from_peft: str = ""
    """A Hugging Face PEFT LoRA directory whose weights start the adapters (fresh runs; targets,
    rank and alpha must describe it: jaxformer.convert.peft.lora_config_from_peft)."""
    train_also: tuple[str, ...] = ()
    """Parameter path prefixes trained in full beside the adapters (e.g. a new task head:
    ['classifier']); like PEFT's modules_to_save."""

    @property
    def enabled(self) -> bool:
        return bool(self.targets)

    def check(self) -> None:
        """A clear error for a bad option (named finetune.lora.*)."""
        if self.rank < 1:
            raise ValueError(f"finetune.lora.rank must be >= 1, got {self.rank}")
        if self.from_peft and not self.targets:
            raise ValueError(
                "finetune.lora.from_peft needs finetune.lora.targets (those of the adapter: "
                "jaxformer.convert.peft.lora_config_from_peft)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"finetune.lora.dropout must be in [0, 1), got {self.dropout}")
        if self.quantize not in QUANTIZE:
            raise ValueError(
                f"finetune.lora.quantize={self.quantize!r}; valid: {', '.join(QUANTIZE)}"
            )
        try:
            jnp.dtype(self.base_dtype)
        except TypeError:
            raise ValueError(
                f"finetune.lora.base_dtype={self.base_dtype!r} is not a dtype"
            ) from None


def _meta(var: nnx.Variable, names: tuple) -> dict:
    """var's metadata with other logical axis names."""
    meta = dict(var.get_metadata())
    meta["out_sharding"] = tuple(names)
    return meta


class LoraProjection(nnx.Module):
    """An nnx.Linear or nnx.Einsum (kernel stacked or not) with a frozen base and a LoRA update."""

    def __init__(
        self,
        base: Union[nnx.Linear, nnx.Einsum],
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        base_dtype="bfloat16",
        quantize: str = "none",
        rngs: nnx.Rngs,
    ):
        kernel = base.kernel
        if isinstance(base, nnx.Linear):
            self.einsum_str = None
            x_letters, kernel_letters, out_letters = "...I", "IO", "...O"
        else:
            self.einsum_str = base.einsum_str.replace(" ", "")
            operands, out_letters = self.einsum_str.split("->")
            x_letters, kernel_letters = operands.split(",")
        w = kernel[...]
        stacked = w.ndim - len(kernel_letters)
        names = kernel.get_metadata().get("out_sharding") or (None,) * w.ndim
        lead_shape, lead_names = w.shape[:stacked], tuple(names[:stacked])
        contracted = "".join(c for c in kernel_letters if c not in out_letters)
        produced = "".join(c for c in kernel_letters if c in out_letters)
        pos = {c: stacked + i for i, c in enumerate(kernel_letters)}
        in_shape = tuple(w.shape[pos[c]] for c in contracted)
        out_shape = tuple(w.shape[pos[c]] for c in produced)
        # Adapter einsums: x -> [..., rank] -> the base's output layout ('r' is never a base letter:
        # ours are upper case).
        kept = (
            x_letters.replace(contracted, "")
            if x_letters.startswith("...")
            else "".join(c for c in x_letters if c not in contracted)
        )
        self.a_str = f"{x_letters},{contracted}r->{kept}r"
        self.b_str = f"{kept}r,r{produced}->{out_letters}"
        self.kernel_shape = tuple(w.shape[stacked:])
        self.n_in = len(contracted)
        self.scale = alpha / rank
        self.dtype = base.dtype
        self.quantize = quantize
        fan_in = math.prod(in_shape)
        bound = 1.0 / math.sqrt(fan_in)  # PEFT's kaiming_uniform(a=sqrt(5)) bound
        a = jax.random.uniform(
            rngs.params(), (*lead_shape, *in_shape, rank), jnp.float32, -bound, bound
        )
        self.lora_a = nnx.LoRAParam(
            a, **_meta(kernel, (*lead_names, *(names[pos[c]] for c in contracted), "lora_rank"))
        )
        self.lora_b = nnx.LoRAParam(
            jnp.zeros((*lead_shape, rank, *out_shape), jnp.float32),
            **_meta(kernel, (*lead_names, "lora_rank", *(names[pos[c]] for c in produced))),
        )
        self.bias = base.bias
        if quantize == "none":
            self.kernel = nnx.Param(w.astype(base_dtype), **kernel.get_metadata())
        elif quantize == "int8":
            reduced = tuple(pos[c] for c in contracted)
            q, scale = quantize_int8(w, reduce_axis=reduced)
            kept_names = tuple(None if i in reduced else n for i, n in enumerate(names))
            self.kernel_q = QuantizedWeight(q, **kernel.get_metadata())
            self.kernel_scale = QuantizationScale(
                jnp.expand_dims(scale, reduced), **_meta(kernel, kept_names)
            )
        elif quantize == "nf4":
            q = quantize_nf4.quantize(w, stacked)
            for field in NF4_FIELDS:
                extra = (None,) if field != "absmax_offset" else ()
                value = getattr(q, field)
                var = QuantizedWeight if value.dtype in (jnp.uint8, jnp.int8) else QuantizationScale
                setattr(self, f"nf4_{field}", var(value, **_meta(kernel, lead_names + extra)))
        else:
            raise ValueError(f"finetune.lora.quantize={quantize!r}; valid: {', '.join(QUANTIZE)}")
        drop = None
        if dropout:
            if stacked:  # one RNG stream per layer, as the stacked Block's own dropouts have

                @nnx.split_rngs(splits=math.prod(lead_shape))
                @nnx.vmap(in_axes=(0,), out_axes=0)
                def make(layer_rngs):
                    return nnx.Dropout(dropout, rngs=layer_rngs)

                drop = make(nnx.Rngs(dropout=rngs.params()))
            else:
                drop = nnx.Dropout(dropout, rngs=nnx.Rngs(dropout=rngs.params()))
        self.dropout = nnx.data(drop)

    def base_kernel(self, dtype=None) -> Array:
        """The frozen kernel (dequantized when quantized), in `dtype` (default: as stored / f32)."""
        if self.quantize == "none":
            w = self.kernel[...]
            return w if dtype is None else w.astype(dtype)
        dtype = dtype or jnp.float32
        if self.quantize == "int8":
            return self.kernel_q[...].astype(dtype) * self.kernel_scale[...].astype(dtype)
        q = quantize_nf4.NF4Tensor(*(getattr(self, f"nf4_{f}")[...] for f in NF4_FIELDS))
        return quantize_nf4.dequantize(q, self.kernel_shape, dtype)

    def delta(self) -> Array:
        """The low-rank update of the kernel, scale * A @ B, float32, in the kernel's layout."""
        letters = "ABCDEFGHJKLMNOPQ"  # no 'r'
        stacked = self.lora_a[...].ndim - 1 - self.n_in
        n_out = len(self.kernel_shape) - self.n_in
        s, ins = letters[:stacked], letters[stacked : stacked + self.n_in]
        outs = letters[stacked + self.n_in : stacked + self.n_in + n_out]
        a, b = self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
        order = self._kernel_letters(ins, outs)
        return self.scale * jnp.einsum(f"{s}{ins}r,{s}r{outs}->{s}{order}", a, b)

    def _kernel_letters(self, ins: str, outs: str) -> str:
        """The base kernel's axis order written with the letters `ins` (contracted) and `outs`."""
        if self.einsum_str is None:
            return ins + outs
        operands, out_letters = self.einsum_str.split("->")
        kernel_letters = operands.split(",")[1]
        it_in, it_out, order = iter(ins), iter(outs), ""
        for c in kernel_letters:
            order += next(it_out) if c in out_letters else next(it_in)
        return order

    def merged_kernel(self) -> Array:
        """kernel + scale * A @ B in float32 (the base dequantized): the adapter folded in."""
        return self.base_kernel(jnp.float32).astype(jnp.float32) + self.delta()

    def __call__(self, x: Array) -> Array:
        bias = self.bias[...] if self.bias is not None else None
        x_c, w, bias = promote_dtype((x, self.base_kernel(self.dtype), bias), dtype=self.dtype)
        if self.einsum_str is None:  # as nnx.Linear computes it, so B = 0 is an exact no-op
            y = jax.lax.dot_general(x_c, w, (((x_c.ndim - 1,), (0,)), ((), ())))
            if bias is not None:
                y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        else:
            y = jnp.einsum(self.einsum_str, x_c, w)
            if bias is not None:  # biases cover the trailing output axes
                y = y + bias
        h = self.dropout(x) if self.dropout is not None else x
        h, a, b = promote_dtype((h, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        update = jnp.einsum(self.b_str, jnp.einsum(self.a_str, h, a), b)
        return y + update * jnp.asarray(self.scale, update.dtype)


def _stacked(module: Union[nnx.Linear, nnx.Einsum]) -> bool:
    names = module.kernel.get_metadata().get("out_sharding") or ()
    return bool(names) and names[0] == "layers"


def _matches(path: str, pattern: str, module) -> bool:
    if pattern == ALL_LINEAR:
        return _stacked(module)
    return path == pattern or path.endswith("." + pattern) or fnmatch.fnmatchcase(path, pattern)


def projections(model: nnx.Module) -> dict[str, tuple]:
    """{dotted path: (parent, attribute, module)} of every nnx.Linear / nnx.Einsum in the model."""
    found = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            for name, child in vars(node).items():
                if isinstance(child, (nnx.Linear, nnx.Einsum)):
                    found[".".join(map(str, (*path, name)))] = (node, name, child)
    return found


def adapted(model: nnx.Module) -> dict[str, LoraProjection]:
    """{dotted path: module} of the model's LoRA projections."""
    return {
        ".".join(map(str, path)): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, LoraProjection)
    }


def apply_lora(model: nnx.Module, cfg: LoraConfig, *, seed: int = 0) -> list[str]:
    """Wraps the matching projections in place (see the module docstring); returns their paths.

    Every other floating parameter outside `cfg.train_also` is cast to cfg.base_dtype (it stays
    frozen). Raises ValueError naming a target that matches no projection.
    """
    cfg.check()
    found = projections(model)
    chosen = sorted(p for p in found if any(_matches(p, t, found[p][2]) for t in cfg.targets))
    for target in cfg.targets:
        if not any(_matches(p, target, found[p][2]) for p in found):
            raise ValueError(
                f"finetune.lora.targets entry {target!r} matches no projection; the model has: "
                + ", ".join(sorted(found))
            )
    key = jax.random.key(seed)
    for i, path in enumerate(chosen):
        parent, name, child = found[path]
        rngs = nnx.Rngs(params=jax.random.fold_in(key, i))
        wrapped = LoraProjection(
            child,
            rank=cfg.rank,
            alpha=cfg.alpha,
            dropout=cfg.dropout,
            base_dtype=cfg.base_dtype,
            quantize=cfg.quantize,
            rngs=rngs,
        )
        setattr(parent, name, wrapped)
    frozen = nnx.All(nnx.Param, nnx.Not(trainable_filter(cfg)))
    dtype = jnp.dtype(cfg.base_dtype)
    for _, var in nnx.to_flat_state(nnx.state(model, frozen)):
        if jnp.issubdtype(var[...].dtype, jnp.floating):
            var.set_value(var[...].astype(dtype))
    return chosen


def under(dotted: str, prefix: str) -> bool:
    """Whether the dotted parameter path is `prefix` or lies below it."""
    return dotted == prefix or dotted.startswith(prefix + ".")


def _under(path: tuple, prefixes: tuple[str, ...]) -> bool:
    dotted = ".".join(map(str, path))
    return any(under(dotted, p) for p in prefixes)


def trainable_filter(cfg: LoraConfig) -> nnx.filterlib.Filter:
    """The adapters, plus the parameters under cfg.train_also."""
    if not cfg.train_also:
        return nnx.LoRAParam
    prefixes = tuple(cfg.train_also)
    return nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, lambda path, _: _under(path, prefixes)))


def load_base(model: nnx.Module, pretrained: dict[tuple, Array]) -> list[str]:
    """Writes pretrained float kernels ({path: array}) into the quantized bases of the model's LoRA
    projections (quantizing them, in the stored arrays' shardings); returns the paths it filled."""
    done = []
    for dotted, module in adapted(model).items():
        if module.quantize == "none":
            continue
        path = tuple(int(p) if p.isdigit() else p for p in dotted.split(".")) + ("kernel",)
        w = pretrained.get(path)
        stacked = module.lora_a[...].ndim - 1 - module.n_in
        if w is None or tuple(w.shape[stacked:]) != module.kernel_shape:
            continue
        if module.quantize == "int8":
            reduced = tuple(stacked + i for i in _contracted_positions(module))
            q, scale = quantize_int8(w, reduce_axis=reduced)
            values = {"kernel_q": q, "kernel_scale": jnp.expand_dims(scale, reduced)}
        else:
            q = quantize_nf4.quantize(w, stacked)
            values = {f"nf4_{f}": getattr(q, f) for f in NF4_FIELDS}
        for name, value in values.items():
            var = getattr(module, name)
            var.set_value(jax.device_put(value.astype(var[...].dtype), var[...].sharding))
        done.append(dotted + ".kernel")
    return done


def _contracted_positions(module: LoraProjection) -> list[int]:
    """Positions (in one layer's kernel) of the axes the projection contracts."""
    if module.einsum_str is None:
        return [0]
    operands, out_letters = module.einsum_str.split("->")
    kernel_letters = operands.split(",")[1]
    return [i for i, c in enumerate(kernel_letters) if c not in out_letters]


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A copy of the model with every LoRA projection folded back into a plain Dense /
    Projection (nnx.Linear / nnx.Einsum; kernel = base + scale * A @ B, float32, at the base's
    path); same call API."""
    model = nnx.merge(*nnx.split(model))
    for _, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        for name, child in list(vars(node).items()):
            if isinstance(child, LoraProjection):
                setattr(node, name, _plain(child))
    return model


def _plain(module: LoraProjection) -> Union[Dense, Projection]:
    """The merged projection as the module type the model builds (jaxformer.dense's)."""
    kernel = module.merged_kernel()
    meta = _base_meta(module)
    shape = module.kernel_shape
    rngs = nnx.Rngs(0)
    bias_shape = None if module.bias is None else module.bias[...].shape
    if module.einsum_str is None:
        plain = Dense(
            shape[0], shape[1], use_bias=module.bias is not None, dtype=module.dtype, rngs=rngs
        )
    else:
        plain = Projection(module.einsum_str, shape, bias_shape, dtype=module.dtype, rngs=rngs)
    plain.kernel = nnx.Param(kernel, **meta)
    plain.bias = module.bias
    return plain


def _base_meta(module: LoraProjection) -> dict:
    """The base kernel's metadata (logical axes included), from whatever stores it."""
    var = (
        module.kernel
        if module.quantize == "none"
        else (module.kernel_q if module.quantize == "int8" else None)
    )
    if var is not None:
        return dict(var.get_metadata())
    # NF4 arrays are flattened: rebuild the kernel's axes from the adapters'.
    a_names = module.lora_a.get_metadata()["out_sharding"]
    b_names = module.lora_b.get_metadata()["out_sharding"]
    stacked = len(a_names) - 1 - module.n_in
    ins, outs = list(a_names[stacked:-1]), list(b_names[stacked + 1 :])
    order = module._kernel_letters("I" * len(ins), "O" * len(outs))
    names = tuple(a_names[:stacked]) + tuple(ins.pop(0) if c == "I" else outs.pop(0) for c in order)
    return _meta(module.lora_a, names)


def content_hash(params: dict[tuple, Array]) -> str:
    """sha256 over the paths, dtypes, shapes and bytes of {path: array} (the base a LoRA run
    adapts); arrays split over several hosts are hashed by their metadata alone."""
    digest = hashlib.sha256()
    for path in sorted(params, key=lambda p: tuple(map(str, p))):
        value = params[path]
        digest.update(f"{'.'.join(map(str, path))}:{value.dtype}:{value.shape};".encode())
        if getattr(value, "is_fully_addressable", True):
            digest.update(jax.device_get(value).tobytes())
    return digest.hexdigest()
