"""Grouped matmul kernels for GPU through Pallas' Triton lowering (Ampere and later).

Triton programs have no scalar prefetch, so the operands stay whole in global memory and each
program loads its blocks itself with masked loads (rows past M, columns past N, k past K read 0):
- gmm: one program per (n tile, visit of `metadata.make_visits`), a k loop accumulating in
  float32, then a store masked to the visit's rows. Programs run concurrently, so two visits of
  one straddled tile write disjoint rows; the repeated trailing visits write the same zeros.
- tgmm: one program per (k tile, n tile, local group), looping over the group's rows in blocks of
  block_m (an empty group stores zeros).
Pallas' Triton backend is deprecated from JAX 0.11 (Mosaic GPU replaces it on Hopper); it is the
one GPU path that also runs under the HLO interpreter, which is how it is tested here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from unimoe.kernels.metadata import Blocks, Visits, gmm_dims, matmul_operands, num_visits

F32 = jnp.float32
NUM_WARPS = 4
NUM_STAGES = 3


def _compiler_params():
    return pltr.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b accumulated in float32 (`matmul_operands`: blocks of two dtypes in full float32)."""
    a, b, precision = matmul_operands(a, b)
    return jnp.dot(a, b, precision=precision, preferred_element_type=F32)


def _gmm_kernel(
    group_ref,
    tile_ref,
    start_ref,
    end_ref,
    lhs_ref,
    rhs_ref,
    out_ref,
    *,
    num_local,
    block_m,
    block_k,
    block_n,
    transpose_rhs,
):
    num_rows, k_dim = lhs_ref.shape
    n_dim = out_ref.shape[1]
    n_i, v = pl.program_id(0), pl.program_id(1)
    group, tile, start, end = group_ref[v], tile_ref[v], start_ref[v], end_ref[v]
    rows = tile * block_m + jnp.arange(block_m)
    cols = n_i * block_n + jnp.arange(block_n)
    row_ok = (rows >= start) & (rows < end)
    col_ok = cols < n_dim
    g = jnp.clip(group, 0, num_local - 1)
    computes = (group >= 0) & (group < num_local) & (start < end)
    row_block, col_block = pl.ds(tile * block_m, block_m), pl.ds(n_i * block_n, block_n)

    def k_step(k_i, acc):
        k_block = pl.ds(k_i * block_k, block_k)
        k_ok = k_i * block_k + jnp.arange(block_k) < k_dim
        lhs = pltr.load(
            lhs_ref.at[row_block, k_block], mask=row_ok[:, None] & k_ok[None, :], other=0
        )
        if transpose_rhs:
            rhs = pltr.load(
                rhs_ref.at[g, col_block, k_block], mask=col_ok[:, None] & k_ok[None, :], other=0
            ).T
        else:
            rhs = pltr.load(
                rhs_ref.at[g, k_block, col_block], mask=k_ok[:, None] & col_ok[None, :], other=0
            )
        return acc + _dot(lhs, rhs)

    # Sentinel visits (rows outside the local groups) run no k step and store zeros.
    num_k = jnp.where(computes, pl.cdiv(k_dim, block_k), 0)
    acc = jax.lax.fori_loop(0, num_k, k_step, jnp.zeros((block_m, block_n), F32))
    pltr.store(
        out_ref.at[row_block, col_block],
        acc.astype(out_ref.dtype),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def gmm(
    lhs: jax.Array, rhs: jax.Array, visits: Visits, blocks: Blocks, *, transpose_rhs: bool
) -> jax.Array:
    """Same contract as `gmm_tpu.gmm`."""
    num_rows, k_dim, n_dim, num_local = gmm_dims(lhs, rhs, transpose_rhs)
    block_m, block_k, block_n = blocks.block_m, blocks.block_k, blocks.block_n
    kernel = functools.partial(
        _gmm_kernel,
        num_local=num_local,
        block_m=block_m,
        block_k=block_k,
        block_n=block_n,
        transpose_rhs=transpose_rhs,
    )
    return pl.pallas_call(
        kernel,
        out_shape=blocks.out((num_rows, n_dim)),
        grid=(pl.cdiv(n_dim, block_n), num_visits(num_rows, block_m, num_local)),
        compiler_params=_compiler_params(),
        interpret=blocks.interpret,
        name="unimoe_gmm_gpu",
    )(*visits.as_tuple(), lhs, rhs)


def _tgmm_kernel(start_ref, end_ref, lhs_ref, grad_ref, out_ref, *, block_m, block_k, block_n):
    k_dim, n_dim = out_ref.shape[1:]
    k_i, n_i, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = start_ref[g], end_ref[g]
    ks = k_i * block_k + jnp.arange(block_k)
    cols = n_i * block_n + jnp.arange(block_n)
    k_block, col_block = pl.ds(k_i * block_k, block_k), pl.ds(n_i * block_n, block_n)

    def row_step(m_i, acc):
        rows = start + m_i * block_m + jnp.arange(block_m)
        row_ok = rows < end
        row_block = pl.ds(start + m_i * block_m, block_m)
        lhs = pltr.load(
            lhs_ref.at[row_block, k_block], mask=row_ok[:, None] & (ks < k_dim)[None, :], other=0
        )
        grad = pltr.load(
            grad_ref.at[row_block, col_block],
            mask=row_ok[:, None] & (cols < n_dim)[None, :],
            other=0,
        )
        return acc + _dot(lhs.T, grad)

    acc = jax.lax.fori_loop(
        0, pl.cdiv(end - start, block_m), row_step, jnp.zeros((block_k, block_n), F32)
    )
    pltr.store(
        out_ref.at[g, k_block, col_block],
        acc.astype(out_ref.dtype),
        mask=(ks < k_dim)[:, None] & (cols < n_dim)[None, :],
    )


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    bounds: tuple[jax.Array, jax.Array],
    num_local: int,
    blocks: Blocks,
) -> jax.Array:
    """out[G_local, K, N]; `bounds` = (first row, one past the last row) of each local group."""
    block_m, block_k, block_n = blocks.block_m, blocks.block_k, blocks.block_n
    k_dim, n_dim = lhs.shape[1], grad.shape[1]
    kernel = functools.partial(_tgmm_kernel, block_m=block_m, block_k=block_k, block_n=block_n)
    return pl.pallas_call(
        kernel,
        out_shape=blocks.out((num_local, k_dim, n_dim)),
        grid=(pl.cdiv(k_dim, block_k), pl.cdiv(n_dim, block_n), num_local),
        compiler_params=_compiler_params(),
        interpret=blocks.interpret,
        name="unimoe_tgmm_gpu",
    )(*bounds, lhs, grad)
