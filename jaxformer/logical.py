"""Logical axis names → mesh axes: the one rule table for parameters and activations.

Parameters and activations carry logical names (`batch`, `length`, `embed`, `heads`, `mlp`,
`vocab`, `layers`, ...). An ordered rule table maps each name to zero, one or several mesh axes.
Model code calls `constrain(x, names)` at block boundaries; outside `axis_rules(...)` (no mesh, or a
user's own code) it does nothing, so a model needs no mesh. Pure JAX: no Flax, no config.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Optional

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rule = Sequence[Optional[str]]
"""(logical name, mesh axis, mesh axis, ...): no mesh axis (or None) means replicated."""

_ACTIVE: contextvars.ContextVar[Optional[tuple[tuple, Optional[Mesh]]]] = contextvars.ContextVar(
    "jaxformer_axis_rules", default=None
)


def rule_table(rules: Sequence[Rule]) -> dict[str, tuple[str, ...]]:
    """{logical name: mesh axes}; the first rule naming a logical axis wins."""
    table: dict[str, tuple[str, ...]] = {}
    for rule in rules:
        if not rule or not isinstance(rule[0], str):
            raise ValueError(f"sharding rule {tuple(rule)} must start with a logical axis name")
        table.setdefault(rule[0], tuple(a for a in rule[1:] if a is not None))
    return table


def logical_to_spec(
    names: Sequence[Optional[str]],
    rules: Sequence[Rule],
    mesh: Optional[Mesh] = None,
    shape: Optional[Sequence[int]] = None,
) -> PartitionSpec:
    """PartitionSpec for one array's logical axis names; an unknown name is an error.

    A mesh axis already used by an earlier dimension is skipped, as are mesh axes of size 1 and,
    given `shape`, axes whose product does not divide the dimension (odd vocabularies still work).
    """
    table = rule_table(rules)
    spec, used = [], set()
    for i, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(
                f"logical axis {name!r} has no sharding rule; add it to mesh.rules "
                f"(known: {', '.join(table)})"
            )
        axes = [
            a
            for a in table[name]
            if a not in used and (mesh is None or a not in mesh.shape or mesh.shape[a] > 1)
        ]
        if mesh is not None:
            missing = [a for a in axes if a not in mesh.shape]
            if missing:
                raise ValueError(
                    f"sharding rule for {name!r} names mesh axes {missing} that the "
                    f"mesh {tuple(mesh.axis_names)} lacks"
                )
        if shape is not None and mesh is not None:
            while axes and shape[i] % _size(mesh, axes):
                axes.pop()  # drop the innermost axis until the dimension divides
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def _size(mesh: Mesh, axes: Sequence[str]) -> int:
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    return size


@contextlib.contextmanager
def axis_rules(rules: Sequence[Rule], mesh: Optional[Mesh] = None) -> Iterator[None]:
    """Within this context, `constrain` shards activations by `rules` on `mesh` (default: the
    mesh set by `jax.set_mesh`). Enter it inside the traced function so it holds while tracing.

    A given mesh also becomes the abstract mesh of the trace (allowed inside jit, unlike
    `jax.set_mesh`), so kernels that shard_map over it (splash attention) see it.
    """
    token = _ACTIVE.set((tuple(tuple(r) for r in rules), mesh))
    try:
        if mesh is not None and isinstance(mesh, Mesh):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                yield
        else:
            yield
    finally:
        _ACTIVE.reset(token)


def current_mesh() -> Optional[Mesh]:
    """The mesh activations are constrained on, or None when there is none."""
    active = _ACTIVE.get()
    if active is None:
        return None
    if active[1] is not None:
        return active[1]
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
    """`x` pinned to the layout its logical names give; unchanged outside `axis_rules`."""
    active = _ACTIVE.get()
    mesh = current_mesh()
    if active is None or mesh is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"logical names {tuple(names)} do not match an array of shape {x.shape}")
    spec = logical_to_spec(names, active[0], mesh, x.shape)
    sharding = NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec
    return jax.lax.with_sharding_constraint(x, sharding)
