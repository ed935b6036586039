"""Hugging Face weights read one tensor at a time, and a model built from them without a second copy.

A checkpoint of several safetensors shards is opened as a `LazyWeights` mapping whose values are
`LazyTensor`s: each reads its bytes from its shard only when asked, in the stored dtype (bfloat16
stays bfloat16). `build_model` creates the model abstractly, then fills one parameter at a time
(stacking layers into one buffer) and places it on the mesh, so the host holds the model once plus
one parameter in flight, never the checkpoint and the model side by side in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import jax
import numpy as np
from flax import nnx

from jaxformer import models
from jaxformer.models.config import ModelConfig


class LazyTensor:
    """A tensor read on demand (`np.asarray(t)`); `.T` stays lazy."""

    def __init__(self, read: Callable[[], np.ndarray], shape: Sequence[int], dtype: Any):
        self._read, self.shape, self.dtype = read, tuple(shape), np.dtype(dtype)

    def __array__(self, dtype: Any = None, copy: Optional[bool] = None) -> np.ndarray:
        value = self._read()
        return value if dtype is None else value.astype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def T(self) -> LazyTensor:  # noqa: N802 (numpy's name)
        return LazyTensor(lambda: np.asarray(self).T, self.shape[::-1], self.dtype)

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"


def torch_to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor as numpy in the same dtype (bfloat16 through ml_dtypes, without a copy)."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _numpy_dtype(torch_dtype: Any) -> np.dtype:
    import ml_dtypes
    import torch

    if torch_dtype == torch.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(torch.empty((), dtype=torch_dtype).numpy().dtype)


# safetensors' dtype names -> numpy's (bfloat16 through ml_dtypes).
_SAFETENSORS_DTYPES = dict(F64="float64", F32="float32", F16="float16", BF16="bfloat16")
_SAFETENSORS_DTYPES |= dict(I64="int64", I32="int32", I16="int16", I8="int8", U8="uint8")
_SAFETENSORS_DTYPES |= dict(BOOL="bool")


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes

    kind = _SAFETENSORS_DTYPES[name]
    return np.dtype(ml_dtypes.bfloat16) if kind == "bfloat16" else np.dtype(kind)


class LazyWeights(Mapping[str, LazyTensor]):
    """{name: LazyTensor} over safetensors files (one `model.safetensors` or numbered shards)."""

    def __init__(self, files: Sequence[str]):
        self._tensors: dict[str, LazyTensor] = {}
        from safetensors import safe_open

        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    info = f.get_slice(name)
                    self._tensors[name] = LazyTensor(
                        _reader(path, name), info.get_shape(), _np_dtype(info.get_dtype())
                    )

    def __getitem__(self, name: str) -> LazyTensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _reader(path: str, name: str) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return torch_to_numpy(f.get_tensor(name))

    return read


def lazy_state_dict(module: Any) -> dict[str, LazyTensor]:
    """A transformers (torch) model's weights as LazyTensors (converted when read)."""
    return {
        name: LazyTensor(lambda t=t: torch_to_numpy(t), t.shape, _numpy_dtype(t.dtype))
        for name, t in module.state_dict().items()
    }


def lazy_torch_file(path: str) -> dict[str, LazyTensor]:
    """The tensors of a pytorch_model.bin, memory-mapped and converted when read."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {
        name: LazyTensor(lambda t=t: torch_to_numpy(t), t.shape, _numpy_dtype(t.dtype))
        for name, t in state.items()
    }


def stored_float_dtype(weights: Mapping[str, Any]) -> str:
    """'bfloat16' when the checkpoint stores its floats in bfloat16, else 'float32'."""
    import ml_dtypes

    for value in weights.values():
        if np.dtype(value.dtype) == np.dtype(ml_dtypes.bfloat16):
            return "bfloat16"
    return "float32"


# ----------------------------------------------------------------------------- building the model


def _path_name(path: tuple) -> str:
    return ".".join(map(str, path))


def build_model(
    cfg: ModelConfig,
    place: Callable[[tuple, nnx.Variable], Optional[np.ndarray]],
    *,
    seed: int = 0,
    mesh: Optional[jax.sharding.Mesh] = None,
    rules: Optional[Sequence] = None,
) -> nnx.Module:
    """The model of `cfg` with each parameter given by `place(path, abstract_variable)` (a numpy
    array of the variable's shape, or None to keep the random initialisation from `seed`), each
    placed on `mesh` by the logical-axis `rules` as soon as it is read (one device without a mesh).
    """
    from jaxformer import sharding as shard_lib

    def create() -> nnx.Module:
        return models.create(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(create)
    graphdef, state = nnx.split(abstract)
    shardings = (
        shard_lib.state_shardings(state, mesh, rules or shard_lib.DEFAULT_RULES)
        if mesh is not None
        else None
    )
    flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    missing = []
    for path, var in nnx.to_flat_state(state):
        value = place(path, var) if isinstance(var, nnx.Param) else None
        if value is None:
            missing.append(path)
            continue
        sharding = flat_shardings.get(path)
        target = None if sharding is None else sharding.get_value()
        var.set_value(jax.device_put(np.asarray(value, dtype=var.dtype), target))
        del value
    if missing:
        # The leaves the checkpoint lacks (RNG state, a head it has no weights for), initialised
        # inside one jit: XLA drops the initialisation of every other parameter.
        def init_missing():
            with nnx.use_eager_sharding(False):
                flat = dict(nnx.to_flat_state(nnx.state(create())))
            return [flat[p].get_value() for p in missing]

        values = jax.jit(init_missing)()
        variables = dict(nnx.to_flat_state(state))
        for path, value in zip(missing, values):
            var = variables[path]
            sharding = flat_shardings.get(path)
            var.set_value(
                value if sharding is None else jax.device_put(value, sharding.get_value())
            )
    return nnx.merge(graphdef, state)
