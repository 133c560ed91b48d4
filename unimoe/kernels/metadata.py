"""What every grouped-matmul lowering takes besides its operands (`Blocks`), and which (group, row
tile) pairs a kernel visits, computed in XLA before the call.

Rows [0, M) are split into segments: the rows before the local groups (sentinel id -1), one segment
per local group g in [0, G_local) (expert-parallel shards own G_local of the G groups, starting at
`group_offset`), and the rows after them (sentinel id G_local). Each segment visits every row tile
it overlaps, an empty segment one tile, so a tile straddling two groups is visited once per group
and every output row belongs to exactly one visit. Visits are in row order, so all visits of one
tile are consecutive (what lets a TPU kernel keep that output tile resident in VMEM across them).

The visit count is data dependent but bounded: the segments are contiguous and in order, so their
visits number at most tiles_m + num_segments - 1. The grid has exactly that many steps; the steps
past the real visits repeat the last real visit, a visit of the trailing sentinel segment, which
recomputes zeros (gmm) or nothing (tgmm), so the repeats are harmless.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Blocks:
    """The static arguments of one lowering's call: block sizes, the output dtype, `out_type`
    (`jax.ShapeDtypeStruct` carrying the operands' manual axes) and the interpret mode."""

    block_m: int
    block_k: int
    block_n: int
    out_dtype: Any
    out_type: Callable[..., jax.ShapeDtypeStruct]
    interpret: Any

    def out(self, shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
        """The kernel's output of `shape`."""
        return self.out_type(shape, self.out_dtype)


def matmul_operands(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array, Any]:
    """(a, b, precision) for a kernel's float32-accumulated dot of two blocks. Blocks of one dtype
    go as they are (bf16 x bf16 runs on the 16-bit MXU / tensor cores). Blocks of two dtypes (a
    float32 cotangent against bf16 weights, in the backward pass) are both cast to their promoted
    dtype, float32, at HIGHEST precision: Triton's default for float32 is TF32, which would round
    the cotangent to 10 mantissa bits, and on TPU it makes Mosaic's fp32 contraction explicit."""
    if a.dtype == b.dtype:
        return a, b, None
    dtype = jnp.promote_types(a.dtype, b.dtype)
    return a.astype(dtype), b.astype(dtype), jax.lax.Precision.HIGHEST


def gmm_dims(lhs: jax.Array, rhs: jax.Array, transpose_rhs: bool) -> tuple[int, int, int, int]:
    """(M, K, N, G_local) of lhs [M, K] times rhs [G_local, K, N] ([G_local, N, K] transposed)."""
    num_rows, k_dim = lhs.shape
    n_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    return num_rows, k_dim, n_dim, rhs.shape[0]


@dataclasses.dataclass(frozen=True)
class Visits:
    """int32[V] per grid step: segment id (-1 / G_local = sentinel), row tile, segment rows."""

    group_v: jax.Array
    tile_v: jax.Array
    row_start_v: jax.Array
    row_end_v: jax.Array

    def as_tuple(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        return self.group_v, self.tile_v, self.row_start_v, self.row_end_v


def num_visits(num_rows: int, block_m: int, num_local: int) -> int:
    """Static grid size: tiles_m + num_segments - 1, with num_segments = num_local + 2."""
    return -(-num_rows // block_m) + num_local + 1


def local_group_sizes(
    group_sizes: jax.Array, group_offset: jax.Array | int, num_local: int
) -> jax.Array:
    """The sizes of groups [group_offset, group_offset + num_local)."""
    offset = jnp.asarray(group_offset, jnp.int32).reshape(())
    return jax.lax.dynamic_slice(group_sizes.astype(jnp.int32), (offset,), (num_local,))


def local_bounds(
    group_sizes: jax.Array, num_rows: int, group_offset: jax.Array | int, num_local: int
) -> tuple[jax.Array, jax.Array]:
    """int32[G_local] first and one-past-last row of each local group, clipped to [0, M)."""
    sizes = group_sizes.astype(jnp.int32)
    offset = jnp.asarray(group_offset, jnp.int32).reshape(())
    local_start = jnp.sum(jnp.where(jnp.arange(sizes.shape[0]) < offset, sizes, 0))
    ends = jnp.clip(
        local_start + jnp.cumsum(local_group_sizes(sizes, offset, num_local)), 0, num_rows
    )
    starts = jnp.concatenate([jnp.clip(local_start, 0, num_rows)[None], ends[:-1]])
    return starts.astype(jnp.int32), ends.astype(jnp.int32)


def make_visits(
    group_sizes: jax.Array,
    num_rows: int,
    block_m: int,
    group_offset: jax.Array | int,
    num_local: int,
) -> Visits:
    """The visits of `num_visits(num_rows, block_m, num_local)` grid steps (module docstring).

    Row ranges are clipped to [0, num_rows), so group sizes summing past M cannot address rows
    outside the operand.
    """
    local_start_g, local_end_g = local_bounds(group_sizes, num_rows, group_offset, num_local)
    seg_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), local_start_g, local_end_g[-1:]])
    seg_end = jnp.concatenate([local_start_g[:1], local_end_g, jnp.array([num_rows], jnp.int32)])
    seg_id = jnp.arange(-1, num_local + 1, dtype=jnp.int32)

    tiles_m = -(-num_rows // block_m)
    nonempty = seg_end > seg_start
    first_tile = jnp.minimum(seg_start // block_m, tiles_m - 1)
    last_tile = jnp.where(nonempty, (seg_end - 1) // block_m, first_tile)
    count = last_tile - first_tile + 1
    visit_end = jnp.cumsum(count)

    # Steps past the real visits repeat the last one (of the trailing sentinel segment).
    step = jnp.minimum(jnp.arange(num_visits(num_rows, block_m, num_local)), visit_end[-1] - 1)
    seg = jnp.searchsorted(visit_end, step, side="right")
    tile = first_tile[seg] + step - (visit_end[seg] - count[seg])
    return Visits(
        seg_id[seg].astype(jnp.int32),
        tile.astype(jnp.int32),
        seg_start[seg].astype(jnp.int32),
        seg_end[seg].astype(jnp.int32),
    )
