"""Logical axis names -> mesh axes: the rules, the PartitionSpec they give an array, and the
context in which layers pin their activations (`constrain`), as flax's logical partitioning does.

Here, under both `models` and `moe`, so the layers that constrain activations and the
expert-parallel layer (which splits tokens over the 'batch' rule's axes) read one set of rules;
which parameter has which logical names is `unimoe.parallel.rules`'s table.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

Logical = tuple[str | None, ...]
Rules = Mapping[str, tuple[str, ...]]

# Logical name -> mesh axes. FSDP shards weights over `fsdp` on their model-width dimension;
# tensor parallelism splits heads, FFN width and vocabulary; experts go over `expert`. The batch
# is split over every axis that holds a data-parallel replica of the non-expert weights: `expert`
# too (DeepSpeed-MoE's expert parallelism runs data-parallel attention on the expert ranks).
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    'batch': ('data', 'fsdp', 'expert'),
    'embed': ('fsdp',),
    'mlp': ('tensor',),
    'heads': ('tensor',),
    'vocab': ('tensor',),
    'expert': ('expert',),
    # Activations: the model width stays whole (FSDP gathers weights, not activations).
    'act_embed': (),
    'act_vocab': ('tensor',),
    'seq': (),
    'conv': (),
}

def partition_spec(
    names: Logical, shape: Sequence[int], mesh_shape: Mapping[str, int], rules: Rules
) -> PartitionSpec:
    """The PartitionSpec of an array with logical `names`: each dimension takes the mesh axes its
    name maps to that are unused so far in this array and whose product divides it."""
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape, strict=True):
        axes = []
        if name is not None:
            if name not in rules:
                raise ValueError(
                    f"logical axis {name!r} has no sharding rule; rules: {sorted(rules)}"
                )
            product = 1
            for axis in rules[name]:
                if axis not in mesh_shape:
                    raise ValueError(f"sharding rule {name!r} -> {axis!r}: no such mesh axis")
                if axis in used or mesh_shape[axis] == 1 or size % (product * mesh_shape[axis]):
                    continue
                axes.append(axis)
                product *= mesh_shape[axis]
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


_ACTIVE: contextvars.ContextVar[tuple[jax.sharding.Mesh, Rules] | None] = contextvars.ContextVar(
    'unimoe_sharding_rules', default=None
)


@contextlib.contextmanager
def use_rules(mesh: jax.sharding.Mesh, rules: Rules) -> Iterator[None]:
    """Within this context (while tracing), `constrain` pins activations to `mesh` by `rules`,
    and `jax.set_mesh(mesh)` is active (the expert-parallel layer reads the mesh from there)."""
    token = _ACTIVE.set((mesh, rules))
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Logical) -> jax.Array:
    """`jax.lax.with_sharding_constraint` of `x` to its logical `names`; identity outside
    `use_rules`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = partition_spec(names, x.shape, dict(mesh.shape), rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def active_rules() -> Rules:
    """The rules of the enclosing `use_rules` context; `DEFAULT_RULES` outside one (a bare
    `jax.set_mesh`)."""
    active = _ACTIVE.get()
    return DEFAULT_RULES if active is None else active[1]


def token_axes(mesh_axis_names: Sequence[str], rules: Rules | None = None) -> tuple[str, ...]:
    """The mesh axes a flattened [batch * length] token dimension is split over: the 'batch'
    rule's axes, then the 'seq' rule's, those the mesh has (batch-major flattening keeps that
    order). `rules` default to the `active_rules()`."""
    rules = active_rules() if rules is None else rules
    axes = dict.fromkeys(a for a in (*rules['batch'], *rules['seq']) if a in mesh_axis_names)
    return tuple(axes)


def batch_spec(shape: Sequence[int], mesh_shape: Mapping[str, int], rules: Rules) -> PartitionSpec:
    """Batch arrays: the leading dimension over the 'batch' rule's axes, the rest whole."""
    return partition_spec(('batch',) + (None,) * (len(shape) - 1), shape, mesh_shape, rules)
