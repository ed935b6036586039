"""Device mesh from config, logical-axis rules as data, sharding of state and batches, multi-host start-up.

Parameters and activations carry logical axis names (see `jaxformer.logical`); one ordered rule
table maps each name to mesh axes (`data`, `fsdp`, `tensor`) or to none (replicated). Switching data
parallel → FSDP → tensor parallel is a change of `MeshConfig`, never of model code.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxformer.logical import Rule, axis_rules, constrain, logical_to_spec

__all__ = [
    "MESH_AXES",
    "DEFAULT_RULES",
    "MeshConfig",
    "make_mesh",
    "resolve_shape",
    "logical_to_spec",
    "axis_rules",
    "constrain",
    "state_shardings",
    "batch_axes",
    "batch_shards",
    "batch_sharding",
    "shard_batch",
    "create_sharded",
    "maybe_initialize_distributed",
]

MESH_AXES = ("data", "fsdp", "tensor")

# Order matters: the first rule naming a logical axis wins, and a mesh axis already used by an
# earlier dimension of the same array is skipped (falls back to replication for that dimension).
# Activations use the same names: [batch, length, embed] takes (data, fsdp) for the batch, so its
# embed dimension stays whole while the parameters' embed dimension is split over fsdp.
DEFAULT_RULES: tuple[tuple[Optional[str], ...], ...] = (
    ("batch", "data", "fsdp"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("length", None),
    ("position", None),
    ("types", None),
    ("relpos", None),
    ("classes", None),
    ("lora_rank", None),  # LoRA adapters: the rank axis stays whole (jaxformer.lora)
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape over (data, fsdp, tensor), the logical-axis rules and multi-host settings."""

    shape: tuple[int, int, int] = (-1, 1, 1)
    """Devices along (data, fsdp, tensor); one -1 takes all remaining devices."""
    rules: tuple[tuple[Optional[str], ...], ...] = DEFAULT_RULES
    """Ordered [logical axis, mesh axes...] rules; none (or null) means replicated."""
    distributed: str = "auto"
    """'auto' (initialise jax.distributed when the environment says multi-host), 'always' or
    'never' (not on/off: YAML reads those as booleans)."""
    slices: int = 1
    """TPU slices (multi-slice pods): the data axis spans them over the slow inter-slice network
    (data parallel across slices); fsdp and tensor stay inside a slice."""
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1
    heartbeat_timeout: int = 100
    """Seconds without a heartbeat after which the other processes of a multi-process run
    declare a process dead and stop (JAX: 'another task died'); rerun all to resume."""

    def __post_init__(self) -> None:
        if self.slices < 1:
            raise ValueError(f"mesh.slices must be >= 1, got {self.slices}")
        if self.heartbeat_timeout < 1:
            raise ValueError(f"mesh.heartbeat_timeout must be >= 1, got {self.heartbeat_timeout}")
        if len(self.shape) != 3:
            raise ValueError(
                f"mesh.shape must have 3 entries (data, fsdp, tensor), got {self.shape}"
            )
        if list(self.shape).count(-1) > 1 or any(s == 0 or s < -1 for s in self.shape):
            raise ValueError(f"mesh.shape={self.shape}: sizes must be positive, at most one -1")
        if self.distributed not in ("auto", "always", "never"):
            raise ValueError(
                f"mesh.distributed={self.distributed!r} is not one of auto, always, never"
            )
        for rule in self.rules:
            if (
                not rule
                or not isinstance(rule[0], str)
                or any(a is not None and a not in MESH_AXES for a in rule[1:])
            ):
                raise ValueError(
                    f"mesh rule {list(rule)} must be [logical_name, mesh axes...] "
                    f"with mesh axes among {', '.join(MESH_AXES)} (or null)"
                )


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills the -1 entry so the product equals num_devices; a clear error if impossible."""
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh.shape={tuple(shape)} cannot fill {num_devices} devices: "
                f"{num_devices} is not divisible by {known}"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh.shape={tuple(shape)} needs {math.prod(shape)} devices but "
            f"{num_devices} are available; use -1 for one axis to fill the rest"
        )
    return tuple(shape)


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh with Auto axis types over all (or the given) devices; across `cfg.slices` TPU
    slices it is a hybrid mesh whose data axis is split between (DCN) and within slices (ICI)."""
    devices = jax.devices() if devices is None else list(devices)
    try:
        shape = resolve_shape(cfg.shape, len(devices))
    except ValueError as err:
        needed = math.prod(s for s in cfg.shape if s != -1)
        if devices and devices[0].platform == "cpu" and needed > len(devices):
            raise ValueError(
                f"{err}. On CPU, simulate {needed} devices by starting with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={needed} (set "
                "before jax is imported)"
            ) from None
        raise
    axis_types = (jax.sharding.AxisType.Auto,) * 3
    if cfg.slices == 1:
        try:
            return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
        except NotImplementedError as err:  # e.g. a 32-device axis on a 4x4x4 torus
            raise ValueError(
                f"mesh.shape={tuple(cfg.shape)} -> {shape} cannot be laid out on these devices' "
                f"physical topology ({err}); make each axis a product of the torus's dimensions "
                "(python -m jaxformer.bench plan lists splits that work)"
            ) from None
    data, fsdp, tensor = shape
    if data % cfg.slices:
        raise ValueError(
            f"with mesh.slices={cfg.slices} the data axis must be a multiple of "
            f"{cfg.slices} (data parallel across slices), got mesh.shape="
            f"{tuple(cfg.shape)} -> {shape}; try mesh.shape=[{cfg.slices},-1,1]"
        )
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_hybrid_device_mesh(
        (data // cfg.slices, fsdp, tensor), (cfg.slices, 1, 1), devices
    )
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh, rules: Sequence[Rule]) -> Any:
    """NamedShardings for every leaf of an nnx state (abstract or concrete), from its logical names.

    Leaves without names (RNG keys, step counters, scalars) are replicated. A dimension whose size
    the mesh axis does not divide is replicated instead, so odd vocabularies still work.
    """

    def one(var):
        value = var.get_value() if hasattr(var, "get_value") else var[...]
        names = var.get_metadata().get("out_sharding") if _is_variable(var) else None
        if not names or not hasattr(value, "shape") or len(names) != len(value.shape):
            return var.replace(NamedSharding(mesh, PartitionSpec()))
        return var.replace(NamedSharding(mesh, logical_to_spec(names, rules, mesh, value.shape)))

    return jax.tree.map(one, state, is_leaf=_is_variable)


def batch_axes(mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes the `batch` rule splits rows over (those of size > 1)."""
    spec = logical_to_spec(("batch",), rules, mesh)[0]
    return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


def batch_shards(mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES) -> int:
    """How many ways a batch's rows are split (a global batch must be a multiple of it)."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def batch_sharding(
    mesh: Mesh, ndim: int = 2, rules: Sequence[Rule] = DEFAULT_RULES
) -> NamedSharding:
    """Sharding of a batch array: rows by the `batch` rule, everything else replicated."""
    axes = batch_axes(mesh, rules)
    rows = None if not axes else axes if len(axes) > 1 else axes[0]
    return NamedSharding(mesh, PartitionSpec(rows, *([None] * (ndim - 1))))


def shard_batch(
    local_batch: dict[str, np.ndarray], mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES
) -> dict[str, jax.Array]:
    """Global arrays from this process's rows (`jax.make_array_from_process_local_data`)."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, rules), v)
        for k, v in local_batch.items()
    }


def create_sharded(factory: Callable[[], Any], mesh: Mesh, rules: Sequence[Rule]) -> Any:
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
    detected = any(
        v in os.environ
        for v in (
            "TPU_WORKER_HOSTNAMES",
            "SLURM_NTASKS",
            "OMPI_COMM_WORLD_SIZE",
            "JAX_COORDINATOR_ADDRESS",
        )
    )
    if not (explicit or detected):
        return
    kwargs: dict = dict(heartbeat_timeout_seconds=cfg.heartbeat_timeout)
    if cfg.coordinator_address:
        kwargs.update(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
        )
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as err:  # already initialised by the launcher
        logging.info("jax.distributed.initialize skipped: %s", err)
