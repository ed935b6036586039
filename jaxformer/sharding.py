"""Device mesh from config, logical-axis rules as data, sharding of state and batches, multi-host start-up.

Parameters carry logical axis names (see `jaxformer.layers`); one ordered rule table maps each name
to a mesh axis (`data`, `fsdp`, `tensor`) or to None (replicated). Switching data parallel → FSDP →
tensor parallel is a change of `MeshConfig`, never of model code.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Order matters: the first rule naming a logical axis wins, and a mesh axis already used by an
# earlier dimension of the same array is skipped (falls back to replication for that dimension).
DEFAULT_RULES: tuple[tuple[str, Optional[str]], ...] = (
    ("batch", "data"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("position", None),
    ("types", None),
    ("relpos", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape over (data, fsdp, tensor), the logical-axis rules and multi-host settings."""

    shape: tuple[int, int, int] = (-1, 1, 1)
    """Devices along (data, fsdp, tensor); one -1 takes all remaining devices."""
    rules: tuple[tuple[str, Optional[str]], ...] = DEFAULT_RULES
    """Ordered (logical axis, mesh axis or None) pairs."""
    distributed: str = "auto"
    """'auto' (initialise jax.distributed when the environment says multi-host), 'always' or
    'never' (not on/off: YAML reads those as booleans)."""
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1

    def __post_init__(self) -> None:
        if len(self.shape) != 3:
            raise ValueError(f"mesh.shape must have 3 entries (data, fsdp, tensor), got {self.shape}")
        if list(self.shape).count(-1) > 1 or any(s == 0 or s < -1 for s in self.shape):
            raise ValueError(f"mesh.shape={self.shape}: sizes must be positive, at most one -1")
        if self.distributed not in ("auto", "always", "never"):
            raise ValueError(f"mesh.distributed={self.distributed!r} is not one of auto, always, "
                             "never")
        for rule in self.rules:
            if len(rule) != 2 or (rule[1] is not None and rule[1] not in MESH_AXES):
                raise ValueError(f"mesh rule {rule} must be [logical_name, one of "
                                 f"{', '.join(MESH_AXES)} or null]")


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills the -1 entry so the product equals num_devices; a clear error if impossible."""
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh.shape={tuple(shape)} cannot fill {num_devices} devices: "
                             f"{num_devices} is not divisible by {known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh.shape={tuple(shape)} needs {math.prod(shape)} devices but "
                         f"{num_devices} are available; use -1 for one axis to fill the rest")
    return tuple(shape)


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh with Auto axis types over all (or the given) devices."""
    devices = jax.devices() if devices is None else list(devices)
    shape = resolve_shape(cfg.shape, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def logical_to_spec(names: Sequence[Optional[str]], rules: Sequence[tuple[str, Optional[str]]],
                    mesh: Optional[Mesh] = None) -> PartitionSpec:
    """PartitionSpec for one array's logical axis names; an unknown name is an error."""
    table: dict[str, Optional[str]] = {}
    for logical, mesh_axis in rules:
        table.setdefault(logical, mesh_axis)
    spec, used = [], set()
    for name in names:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; add it to mesh.rules "
                             f"(known: {', '.join(table)})")
        axis = table[name]
        # A mesh axis of size 1 shards nothing; leaving it out keeps specs readable.
        if axis is None or axis in used or (mesh is not None and mesh.shape[axis] == 1):
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return PartitionSpec(*spec)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh, rules: Sequence[tuple[str, Optional[str]]]) -> Any:
    """NamedShardings for every leaf of an nnx state (abstract or concrete), from its logical names.

    Leaves without names (RNG keys, step counters, scalars) are replicated. A dimension whose size
    the mesh axis does not divide is replicated instead, so odd vocabularies still work.
    """
    def one(var):
        value = var.get_value() if hasattr(var, "get_value") else var[...]
        names = var.get_metadata().get("out_sharding") if _is_variable(var) else None
        if not names or not hasattr(value, "shape") or len(names) != len(value.shape):
            return var.replace(NamedSharding(mesh, PartitionSpec()))
        spec = logical_to_spec(names, rules, mesh)
        spec = PartitionSpec(*[
            ax if ax is None or dim % mesh.shape[ax] == 0 else None
            for ax, dim in zip(spec, value.shape)])
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a batch array: rows over data×fsdp, everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this process's rows (`jax.make_array_from_process_local_data`)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
            for k, v in local_batch.items()}


def create_sharded(factory: Callable[[], Any], mesh: Mesh,
                   rules: Sequence[tuple[str, Optional[str]]]) -> Any:
    """Builds the nnx object(s) that `factory` returns with every array born sharded.

    The factory is traced abstractly first, then run under jit with out_shardings, so no host ever
    holds the full unsharded state.
    """
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(factory)
        graphdef, abstract_state = nnx.split(abstract)
        shardings = state_shardings(abstract_state, mesh, rules)

        def init():
            return nnx.split(factory())[1]

        init = jax.jit(init, out_shardings=shardings)
        with jax.set_mesh(mesh):
            state = init()
    return nnx.merge(graphdef, state)


def maybe_initialize_distributed(cfg: MeshConfig) -> None:
    """Starts jax.distributed on multi-host platforms (detected, or from the config)."""
    if cfg.distributed == "never":
        return
    explicit = bool(cfg.coordinator_address) or cfg.distributed == "always"
    detected = any(v in os.environ for v in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
                                              "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS"))
    if not (explicit or detected):
        return
    kwargs = {}
    if cfg.coordinator_address:
        kwargs = dict(coordinator_address=cfg.coordinator_address,
                      num_processes=cfg.num_processes, process_id=cfg.process_id)
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as err:  # already initialised by the launcher
        logging.info("jax.distributed.initialize skipped: %s", err)
