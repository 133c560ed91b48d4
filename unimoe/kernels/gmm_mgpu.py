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

from unimoe.kernels.metadata import Visits, num_visits

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


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    visits: Visits,
    *,
    block_m: int,
    block_k: int,
    block_n: int,
    out_dtype: jnp.dtype,
    transpose_rhs: bool,
    interpret,
    out_type,
) -> jax.Array:
    """Same contract as `gmm_tpu.gmm`, with M, K and N multiples of their blocks."""
    num_rows, k_dim = lhs.shape
    num_local = rhs.shape[0]
    n_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
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
                    rhs_block = (block_n, block_k) if transpose_rhs else (block_k, block_n)
                    plgpu.emit_pipeline(
                        lambda _, lhs_smem, rhs_smem: _mma(
                            acc_ref,
                            lhs_smem,
                            rhs_smem,
                            transpose="b" if transpose_rhs else "",
                            interpret=interpret,
                        ),
                        grid=(k_dim // block_k,),
                        in_specs=[
                            plgpu.BlockSpec(
                                (block_m, block_k), lambda k: (tile, k), delay_release=1
                            ),
                            plgpu.BlockSpec(
                                rhs_block,
                                (lambda k: (n_i, k)) if transpose_rhs else (lambda k: (k, n_i)),
                                delay_release=1,
                            ),
                        ],
                        max_concurrent_steps=MAX_CONCURRENT_STEPS,
                    )(lhs_gmem, rhs_g)

                return acc_ref[...]

            acc = pl.run_scoped(accumulate, plgpu.ACC((block_m, block_n)))

            @functools.partial(pl.run_scoped, tile_smem=plgpu.SMEM((block_m, block_n), out_dtype))
            def _store(tile_smem):
                tile_smem[...] = acc.astype(out_dtype)
                plgpu.commit_smem()
                _store_rows(
                    tile_smem,
                    out_gmem,
                    tile * block_m,
                    first - tile * block_m,
                    count,
                    pl.ds(n_i * block_n, block_n),
                )

    kernel = _kernel(body, out_type((num_rows, n_dim), out_dtype), interpret)
    return kernel(*visits.as_tuple(), lhs, rhs)


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    bounds: tuple[jax.Array, jax.Array],
    num_local: int,
    *,
    block_m: int,
    block_k: int,
    block_n: int,
    out_dtype: jnp.dtype,
    interpret,
    out_type,
) -> jax.Array:
    """Same contract as `gmm_gpu.tgmm`, with M, K and N multiples of their blocks."""
    k_dim, n_dim = lhs.shape[1], grad.shape[1]
    tiles_k, tiles_n = k_dim // block_k, n_dim // block_n
    starts, ends = bounds

    def body(start_gmem, end_gmem, lhs_gmem, grad_gmem, out_gmem):
        @plgpu.nd_loop((num_local, tiles_k * tiles_n), collective_axes="sm")
        def _step(loop: plgpu.NDLoopInfo):
            g, kn = loop.index
            k_i, n_i = jax.lax.div(kn, tiles_n), jax.lax.rem(kn, tiles_n)
            start, end = start_gmem[g], end_gmem[g]
            first_block = jax.lax.div(start, block_m)
            num_blocks = jax.lax.div(end + block_m - 1, block_m) - first_block

            def accumulate(acc_ref):
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

                    _mma(acc_ref, lhs_smem, grad_smem, transpose="a", interpret=interpret)

                @pl.when(end > start)
                def _row_loop():
                    plgpu.emit_pipeline(
                        multiply,
                        grid=(num_blocks,),
                        in_specs=[
                            plgpu.BlockSpec(
                                (block_m, block_k),
                                lambda m: (first_block + m, k_i),
                                delay_release=1,
                            ),
                            plgpu.BlockSpec(
                                (block_m, block_n),
                                lambda m: (first_block + m, n_i),
                                delay_release=1,
                            ),
                        ],
                        max_concurrent_steps=MAX_CONCURRENT_STEPS,
                    )(lhs_gmem, grad_gmem)

                return acc_ref[...]

            acc = pl.run_scoped(accumulate, plgpu.ACC((block_k, block_n)))

            @functools.partial(pl.run_scoped, tile_smem=plgpu.SMEM((block_k, block_n), out_dtype))
            def _store(tile_smem):
                tile_smem[...] = acc.astype(out_dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(
                    tile_smem,
                    out_gmem.at[g, pl.ds(k_i * block_k, block_k), pl.ds(n_i * block_n, block_n)],
                )
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = _kernel(body, out_type((num_local, k_dim, n_dim), out_dtype), interpret)
    return kernel(starts, ends, lhs, grad)
