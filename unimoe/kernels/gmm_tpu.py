"""Grouped matmul kernels for TPU (Mosaic), after JAX's megablox, and their interpret-mode runs.

The grid walks the visits of `metadata.make_visits` (scalar-prefetched into SMEM, so the block
index maps can read them): gmm over (n tiles, visits, k tiles), the f32 accumulator in VMEM and
the output tile stored through a row mask on the last k step; tgmm over (k tiles, n tiles,
visits), accumulating one group's x^T @ dy across its visits and storing it on the group's last.
On CPU the same kernels run under `interpret` (True or a `pltpu.InterpretParams`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from unimoe.kernels.metadata import Blocks, Visits, gmm_dims, matmul_operands, num_visits

F32 = jnp.float32


def _row_mask(shape, tile, row_start, row_end, block_m):
    rows = tile * block_m + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    return (rows >= row_start) & (rows < row_end)


def _k_tail_mask(x, k_index, block_k, k_dim, axis):
    """Zeroes the columns (axis=1) or rows (axis=0) of a k block past the true K."""
    ks = k_index * block_k + jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
    return jnp.where(ks < k_dim, x, jnp.zeros_like(x))


def _gmm_kernel(
    group_ref,
    tile_ref,
    start_ref,
    end_ref,
    lhs_ref,
    rhs_ref,
    out_ref,
    acc_ref,
    *,
    num_local,
    block_m,
    block_k,
    k_dim,
    transpose_rhs,
):
    v, k_i = pl.program_id(1), pl.program_id(2)
    group = group_ref[v]

    @pl.when(k_i == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    # Sentinel visits (rows outside the local groups) keep the zero accumulator.
    @pl.when((group >= 0) & (group < num_local) & (start_ref[v] < end_ref[v]))
    def _accumulate():
        lhs, rhs = lhs_ref[...], rhs_ref[...]
        if k_dim % block_k:
            lhs = _k_tail_mask(lhs, k_i, block_k, k_dim, 1)
            rhs = _k_tail_mask(rhs, k_i, block_k, k_dim, 1 if transpose_rhs else 0)
        dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
        lhs, rhs, precision = matmul_operands(lhs, rhs)
        acc_ref[...] += jax.lax.dot_general(
            lhs, rhs, dims, precision=precision, preferred_element_type=F32
        )

    @pl.when(k_i == pl.num_programs(2) - 1)
    def _store():
        mask = _row_mask(acc_ref.shape, tile_ref[v], start_ref[v], end_ref[v], block_m)
        # Rows of other segments in this tile are stored by their own (adjacent) visits.
        out_ref[...] = jnp.where(mask, acc_ref[...], out_ref[...].astype(F32)).astype(out_ref.dtype)


def gmm(
    lhs: jax.Array, rhs: jax.Array, visits: Visits, blocks: Blocks, *, transpose_rhs: bool
) -> jax.Array:
    """out[M, N]: row r of segment g is lhs[r] @ rhs[g] (rhs[g].T when transpose_rhs), else 0."""
    num_rows, k_dim, n_dim, num_local = gmm_dims(lhs, rhs, transpose_rhs)
    block_m, block_k, block_n = blocks.block_m, blocks.block_k, blocks.block_n
    grid = (
        pl.cdiv(n_dim, block_n),
        num_visits(num_rows, block_m, num_local),
        pl.cdiv(k_dim, block_k),
    )

    def lhs_index(n_i, v, k_i, group_v, tile_v, start_v, end_v):
        return tile_v[v], k_i

    def rhs_index(n_i, v, k_i, group_v, tile_v, start_v, end_v):
        group = jnp.clip(group_v[v], 0, num_local - 1)
        return (group, n_i, k_i) if transpose_rhs else (group, k_i, n_i)

    def out_index(n_i, v, k_i, group_v, tile_v, start_v, end_v):
        return tile_v[v], n_i

    rhs_block = (None, block_n, block_k) if transpose_rhs else (None, block_k, block_n)
    kernel = functools.partial(
        _gmm_kernel,
        num_local=num_local,
        block_m=block_m,
        block_k=block_k,
        k_dim=k_dim,
        transpose_rhs=transpose_rhs,
    )
    return pl.pallas_call(
        kernel,
        out_shape=blocks.out((num_rows, n_dim)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=grid,
            in_specs=[
                pl.BlockSpec((block_m, block_k), lhs_index),
                pl.BlockSpec(rhs_block, rhs_index),
            ],
            out_specs=pl.BlockSpec((block_m, block_n), out_index),
            scratch_shapes=[pltpu.VMEM((block_m, block_n), F32)],
        ),
        # Consecutive visits of one tile accumulate into the same resident output block.
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=2 * num_rows * k_dim * n_dim,
            bytes_accessed=lhs.nbytes * grid[0] + rhs.nbytes + num_rows * n_dim * 4,
            transcendentals=0,
        ),
        interpret=blocks.interpret,
        name="unimoe_gmm",
    )(*visits.as_tuple(), lhs, rhs)


def _tgmm_kernel(
    group_ref,
    tile_ref,
    start_ref,
    end_ref,
    lhs_ref,
    grad_ref,
    out_ref,
    acc_ref,
    *,
    num_local,
    block_m,
):
    v, last_v = pl.program_id(2), pl.num_programs(2) - 1
    group = group_ref[v]
    first = (v == 0) | (group_ref[jnp.maximum(v - 1, 0)] != group)
    last = (v == last_v) | (group_ref[jnp.minimum(v + 1, last_v)] != group)
    local = (group >= 0) & (group < num_local)

    @pl.when(first)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(local & (start_ref[v] < end_ref[v]))
    def _accumulate():
        tile, start, end = tile_ref[v], start_ref[v], end_ref[v]
        # Both operands are masked: rows of other groups, or past M in an edge tile, may hold
        # anything (NaN included), and 0 * NaN is NaN.
        lhs = lhs_ref[...]
        grad = grad_ref[...]
        lhs = jnp.where(_row_mask(lhs.shape, tile, start, end, block_m), lhs, jnp.zeros_like(lhs))
        grad = jnp.where(
            _row_mask(grad.shape, tile, start, end, block_m), grad, jnp.zeros_like(grad)
        )
        lhs, grad, precision = matmul_operands(lhs, grad)
        acc_ref[...] += jax.lax.dot_general(
            lhs, grad, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=F32
        )

    @pl.when(local & last)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(
    lhs: jax.Array, grad: jax.Array, visits: Visits, num_local: int, blocks: Blocks
) -> jax.Array:
    """out[G_local, K, N]: out[g] = lhs[rows of g].T @ grad[rows of g] (zero for empty groups)."""
    block_m, block_k, block_n = blocks.block_m, blocks.block_k, blocks.block_n
    num_rows, k_dim = lhs.shape
    n_dim = grad.shape[1]
    grid = (
        pl.cdiv(k_dim, block_k),
        pl.cdiv(n_dim, block_n),
        num_visits(num_rows, block_m, num_local),
    )

    def lhs_index(k_i, n_i, v, group_v, tile_v, start_v, end_v):
        return tile_v[v], k_i

    def grad_index(k_i, n_i, v, group_v, tile_v, start_v, end_v):
        return tile_v[v], n_i

    def out_index(k_i, n_i, v, group_v, tile_v, start_v, end_v):
        # Sentinel visits map to the neighbouring group's block, which they never store.
        return jnp.clip(group_v[v], 0, num_local - 1), k_i, n_i

    kernel = functools.partial(_tgmm_kernel, num_local=num_local, block_m=block_m)
    return pl.pallas_call(
        kernel,
        out_shape=blocks.out((num_local, k_dim, n_dim)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=grid,
            in_specs=[
                pl.BlockSpec((block_m, block_k), lhs_index),
                pl.BlockSpec((block_m, block_n), grad_index),
            ],
            out_specs=pl.BlockSpec((None, block_k, block_n), out_index),
            scratch_shapes=[pltpu.VMEM((block_k, block_n), F32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=2 * num_rows * k_dim * n_dim,
            bytes_accessed=lhs.nbytes * grid[1]
            + grad.nbytes * grid[0]
            + num_local * k_dim * n_dim * 4,
            transcendentals=0,
        ),
        interpret=blocks.interpret,
        name="unimoe_tgmm",
    )(*visits.as_tuple(), lhs, grad)
