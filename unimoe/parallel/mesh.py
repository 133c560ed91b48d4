"""Device meshes from config: named axes `data`, `fsdp`, `expert`, `tensor`.

`config.mesh` is a dict {axis: size}; one size may be -1 (the devices left over). Axes a config
leaves out have size 1, so every mesh has all four names and the sharding rules never name a
missing axis. The mesh spans `jax.devices()`: all processes' devices after
`jax.distributed.initialize`, the local ones otherwise.

Axis types are `Auto`: the partitioner propagates shardings from the jit in/out shardings and the
activation constraints (classic GSPMD). Explicit axes would make every op's sharding part of its
type and reject the ops whose operands disagree, which the model code does not spell out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np

# Outermost first: `data` spans hosts (slowest links), `tensor` the closest devices.
MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """{axis: size} over MESH_AXES with -1 resolved; raises naming the config field."""
    sizes = dict(sizes)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"config.mesh names unknown axes {unknown}; known: {list(MESH_AXES)}")
    bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or (v < 1 and v != -1)}
    if bad:
        raise ValueError(f"config.mesh={sizes}: sizes must be integers >= 1 or -1, got {bad}")
    rest = [k for k, v in sizes.items() if v == -1]
    if len(rest) > 1:
        raise ValueError(f"config.mesh={sizes}: at most one axis may be -1, got {rest}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if rest:
        if num_devices % fixed:
            raise ValueError(
                f"config.mesh={sizes}: the fixed axes use {fixed} devices, which does not divide "
                f"the {num_devices} devices JAX sees, so {rest[0]}=-1 has no size"
            )
        sizes[rest[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"config.mesh={sizes} has {math.prod(sizes.values())} devices, but JAX sees "
            f"{num_devices}: make the axis sizes multiply to the device count (or use -1)"
        )
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def make_mesh(
    sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """The mesh of `config.mesh` over `devices` (default: every process's devices)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(
        tuple(shape.values()),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def describe(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> str:
    """'data=2 fsdp=1 expert=4 tensor=1 (8 devices)'."""
    sizes = dict(mesh.shape)
    return (
        ' '.join(f'{k}={v}' for k, v in sizes.items())
        + f' ({int(np.prod(list(sizes.values())))} devices)'
    )
