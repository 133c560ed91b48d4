"""Grouped matmul kernels for Hopper GPUs through Pallas' Mosaic GPU lowering (bf16 / f16).

Each kernel is persistent: one program per SM walks its share of the output tiles
(`plgpu.nd_loop`), streams the operand blocks global -> shared memory with TMA
(`plgpu.emit_pipeline`, `max_concurrent_steps` in flight) and multiplies them with
warpgroup MMAs into a float32 register accumulator.
- gmm: one step per (visit of `metadata.make_visits`, n tile). A visit that owns no rows of a
  local group skips the k loop, so its rows are stored as zeros. The finished tile goes through
  shared memory, and TMA stores only the visit's rows of it. TMA boxes have static shapes, so the
  dynamic row count is written as a ladder of power-of-two boxes: at most log2(block_m) + 1
  stores, one per set bit of the count. Two visits of a straddled tile write disjoint rows.
- tgmm: one step per (local group, k tile, n tile). The group's rows are streamed in blocks of
  block_m from the block holding its first row. In the first and last block, the rows of the
  neighbouring groups are zeroed in shared memory before the MMA. An empty group stores zeros.
The caller pads M, K and N to multiples of their blocks (TMA boxes and MMA shapes are static).
Float32 inputs stay on the Triton kernels, because a Hopper MMA would round them to tf32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from unimoe.kernels.metadata import Blocks, Visits, gmm_dims, num_visits

# Shared memory per stage at the default 128 x 64 x 128 bf16 blocks is 32 KiB; three stages plus
# a float32 output tile (64 KiB) stay well inside Hopper's 227 KiB.
MAX_CONCURRENT_STEPS = 3
# Persistent grid: one program per SM of the local GPU. Lowering for 'cuda' on a machine without
# one (tests, ahead-of-time lowering) assumes an H100 SXM's 132.
H100_SXM_SMS = 132


def _num_programs() -> int:
    if jax.default_backend() == "gpu":
        return int(getattr(jax.devices()[0], "core_count", H100_SXM_SMS))
    return H100_SXM_SMS


def _compiler_params():
    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def _kernel(body, out_type, interpret):
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=(_num_programs(),),
        grid_names=("sm",),
        compiler_params=_compiler_params(),
        interpret=interpret,
    )


def _mma(acc_ref, a_smem, b_smem, *, transpose: str, interpret) -> None:
    """acc += a @ b with operand `transpose` ('a', 'b' or '') read transposed. Hardware reads it
    as a transposed view of the same shared memory. JAX 0.10.2's GPU interpreter cannot read
    such a view, so under it the operand is first copied transposed into scratch memory."""
    if not (interpret and transpose):
        a = plgpu.transpose_ref(a_smem, (1, 0)) if transpose == "a" else a_smem
        b = plgpu.transpose_ref(b_smem, (1, 0)) if transpose == "b" else b_smem
        plgpu.wgmma(acc_ref, a, b)
        return
    ref = a_smem if transpose == "a" else b_smem

    def with_copy(scratch):
        scratch[...] = ref[...].T
        plgpu.wgmma(acc_ref, *((scratch, b_smem) if transpose == "a" else (a_smem, scratch)))

    pl.run_scoped(with_copy, plgpu.SMEM(ref.shape[::-1], ref.dtype))


def _store_rows(tile_smem, out_gmem, tile_row, first_row, num_rows, cols) -> None:
    """TMA-stores `num_rows` rows of `tile_smem` from row `first_row` to the same rows of the
    output tile starting at global row `tile_row`: one box of 2^b rows per set bit b of
    num_rows (num_rows <= tile rows)."""
    done = jnp.int32(0)
    for bit in reversed(range(int(math.log2(tile_smem.shape[0])) + 1)):
        rows = 1 << bit

        @pl.when(num_rows & rows != 0)
        def _store(done=done, rows=rows):
            row = first_row + done
            plgpu.copy_smem_to_gmem(
                tile_smem.at[pl.ds(row, rows)], out_gmem.at[pl.ds(tile_row + row, rows), cols]
            )

        done = done + (num_rows & rows)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _through_smem(acc: jax.Array, out_dtype, store) -> None:
    """Writes the float32 accumulator `acc` into shared memory as `out_dtype`; `store(tile_smem)`
    then copies it out (TMA)."""

    @functools.partial(pl.run_scoped, tile_smem=plgpu.SMEM(acc.shape, out_dtype))
    def _store(tile_smem):
        tile_smem[...] = acc.astype(out_dtype)
        plgpu.commit_smem()
        store(tile_smem)


def _gmm_k_loop(acc_ref, lhs_gmem, rhs_g, tile, n_i, blocks: Blocks, k_dim, transpose_rhs):
    """acc += lhs[tile rows] @ rhs_g[:, n tile] (rhs_g.T with `transpose_rhs`), k blocks
    streamed."""
    block_m, block_k, block_n = blocks.block_m, blocks.block_k, blocks.block_n
    plgpu.emit_pipeline(
        lambda _, lhs_smem, rhs_smem: _mma(
            acc_ref,
            lhs_smem,
            rhs_smem,
            transpose="b" if transpose_rhs else "",
            interpret=blocks.interpret,
        ),
        grid=(k_dim // block_k,),
        in_specs=[
            plgpu.BlockSpec((block_m, block_k), lambda k: (tile, k), delay_release=1),
            plgpu.BlockSpec(
                (block_n, block_k) if transpose_rhs else (block_k, block_n),
                (lambda k: (n_i, k)) if transpose_rhs else (lambda k: (k, n_i)),
                delay_release=1,
            ),
        ],
        max_concurrent_steps=MAX_CONCURRENT_STEPS,
    )(lhs_gmem, rhs_g)


def gmm(
    lhs: jax.Array, rhs: jax.Array, visits: Visits, blocks: Blocks, *, transpose_rhs: bool
) -> jax.Array:
    """Same contract as `gmm_tpu.gmm`, with M, K and N multiples of their blocks."""
    num_rows, k_dim, n_dim, num_local = gmm_dims(lhs, rhs, transpose_rhs)
    block_m, block_n = blocks.block_m, blocks.block_n
    tiles_n = n_dim // block_n
    steps = num_visits(num_rows, block_m, num_local) * tiles_n

    def body(group_gmem, tile_gmem, start_gmem, end_gmem, lhs_gmem, rhs_gmem, out_gmem):
        @plgpu.nd_loop((steps,), collective_axes="sm")
        def _step(loop: plgpu.NDLoopInfo):
            v, n_i = jax.lax.div(loop.index[0], tiles_n), jax.lax.rem(loop.index[0], tiles_n)
            group, tile = group_gmem[v], tile_gmem[v]
            first = jnp.maximum(start_gmem[v], tile * block_m)
            count = jnp.minimum(end_gmem[v], (tile + 1) * block_m) - first
            computes = (group >= 0) & (group < num_local) & (count > 0)
            rhs_g = rhs_gmem.at[jnp.clip(group, 0, num_local - 1)]

            def accumulate(acc_ref):
                @pl.when(computes)
                def _k_loop():
                    _gmm_k_loop(acc_ref, lhs_gmem, rhs_g, tile, n_i, blocks, k_dim, transpose_rhs)

                return acc_ref[...]

            acc = pl.run_scoped(accumulate, plgpu.ACC((block_m, block_n)))

            def store(tile_smem):
                first_row = first - tile * block_m
                cols = pl.ds(n_i * block_n, block_n)
                _store_rows(tile_smem, out_gmem, tile * block_m, first_row, count, cols)

            _through_smem(acc, blocks.out_dtype, store)

    return _kernel(body, blocks.out((num_rows, n_dim)), blocks.interpret)(
        *visits.as_tuple(), lhs, rhs
    )


def _group_blocks(start, end, block_m):
    """(first row, one past the last row, first row block, number of row blocks) of a group."""
    first_block = jax.lax.div(start, block_m)
    return start, end, first_block, jax.lax.div(end + block_m - 1, block_m) - first_block


def _tgmm_row_loop(acc_ref, lhs_gmem, grad_gmem, rows, k_i, n_i, blocks: Blocks) -> None:
    """acc += lhs[rows, k tile].T @ grad[rows, n tile] over the group's `rows`
    (`_group_blocks`), streamed in row blocks from the one holding its first row."""
    block_m, block_k, block_n = blocks.block_m, blocks.block_k, blocks.block_n
    start, end, first_block, num_blocks = rows

    def multiply(step, lhs_smem, grad_smem):
        row = (first_block + step[0]) * block_m + jax.lax.broadcasted_iota(
            jnp.int32, (block_m, block_k), 0
        )

        # Only the group's first and last blocks hold rows of other groups.
        @pl.when((step[0] == 0) | (step[0] == num_blocks - 1))
        def _mask_other_groups():
            in_group = (row >= start) & (row < end)
            lhs_smem[...] = jnp.where(in_group, lhs_smem[...], 0).astype(lhs_smem.dtype)
            plgpu.commit_smem()

        _mma(acc_ref, lhs_smem, grad_smem, transpose="a", interpret=blocks.interpret)

    plgpu.emit_pipeline(
        multiply,
        grid=(num_blocks,),
        in_specs=[
            plgpu.BlockSpec(
                (block_m, block_k), lambda m: (first_block + m, k_i), delay_release=1
            ),
            plgpu.BlockSpec(
                (block_m, block_n), lambda m: (first_block + m, n_i), delay_release=1
            ),
        ],
        max_concurrent_steps=MAX_CONCURRENT_STEPS,
    )(lhs_gmem, grad_gmem)


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    bounds: tuple[jax.Array, jax.Array],
    num_local: int,
    blocks: Blocks,
) -> jax.Array:
    """Same contract as `gmm_gpu.tgmm`, with M, K and N multiples of their blocks."""
    block_k, block_n = blocks.block_k, blocks.block_n
    k_dim, n_dim = lhs.shape[1], grad.shape[1]
    tiles_k, tiles_n = k_dim // block_k, n_dim // block_n

    def body(start_gmem, end_gmem, lhs_gmem, grad_gmem, out_gmem):
        @plgpu.nd_loop((num_local, tiles_k * tiles_n), collective_axes="sm")
        def _step(loop: plgpu.NDLoopInfo):
            g, kn = loop.index
            k_i, n_i = jax.lax.div(kn, tiles_n), jax.lax.rem(kn, tiles_n)
            rows = _group_blocks(start_gmem[g], end_gmem[g], blocks.block_m)
            start, end = rows[:2]

            def accumulate(acc_ref):
                @pl.when(end > start)
                def _row_loop():
                    _tgmm_row_loop(acc_ref, lhs_gmem, grad_gmem, rows, k_i, n_i, blocks)

                return acc_ref[...]

            acc = pl.run_scoped(accumulate, plgpu.ACC((block_k, block_n)))

            def store(tile_smem):
                tile = (g, pl.ds(k_i * block_k, block_k), pl.ds(n_i * block_n, block_n))
                plgpu.copy_smem_to_gmem(tile_smem, out_gmem.at[tile])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            _through_smem(acc, blocks.out_dtype, store)

    kernel = _kernel(body, blocks.out((num_local, k_dim, n_dim)), blocks.interpret)
    return kernel(*bounds, lhs, grad)
