"""Grouped matmul (gmm) and its weight-gradient form (tgmm) as Pallas kernels, with XLA references.

Axis letters as in `unimoe.moe.gmm`: rows M sorted by group (expert), G groups, K in, N out.
`gmm(lhs[M, K], rhs[G, K, N], group_sizes[G])[r] = lhs[r] @ rhs[g]` for row r of group g; rows
past sum(group_sizes) are zero. `tgmm(lhs[M, K], grad[M, N], group_sizes)[g] = lhs_g.T @ grad_g`.
`gmm` is a `jax.custom_vjp` whose backward pass is a gmm (d_lhs, with the weights transposed in
the kernel, not in memory) and a tgmm (d_rhs), so it trains. Both accumulate in float32, and the
backward keeps the cotangent's dtype (a float32 cotangent of a bf16 gmm is not rounded to bf16).

`group_offset` (expert parallelism): rhs holds only G_local = rhs.shape[0] groups, the global
groups [group_offset, group_offset + G_local) of `group_sizes`; rows of other groups are zero.

Lowering, chosen by platform: TPU -> Mosaic (`gmm_tpu`); GPU -> Mosaic GPU (`gmm_mgpu`) for
16-bit operands on Hopper, Triton (`gmm_gpu`) otherwise (`gpu_lowering` overrides); CPU ->
interpret mode only (the TPU kernels under the HLO interpreter, or under the TPU simulator when
`interpret` is a `pltpu.InterpretParams`; Mosaic GPU kernels under JAX's GPU interpreter).
`interpret=None` means interpret on CPU only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from unimoe.kernels import gmm_gpu, gmm_mgpu, gmm_tpu
from unimoe.kernels.metadata import (
    Blocks,
    gmm_dims,
    local_bounds,
    local_group_sizes,
    make_visits,
)

GPU_PLATFORMS = ("gpu", "cuda", "rocm")
GPU_LOWERINGS = ("triton", "mosaic")
# Mosaic GPU blocks: warpgroup MMAs take rows in multiples of 64, and a 128-byte swizzled
# shared-memory row holds 64 bf16 values.
MOSAIC_BLOCK_MULTIPLE = 64
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Block sizes (rows, contraction, columns) of the kernels; see `default_tiling`."""

    block_m: int = 128
    block_k: int = 128
    block_n: int = 128

    def fit(
        self, num_rows: int, k_dim: int, n_dim: int, platform: str, gpu_lowering: str
    ) -> Tiling:
        """Blocks no larger than needed: TPU blocks are clipped to the dimension (a block must
        divide into (8, 128) tiles or span the whole dimension); Triton blocks stay powers of two
        of at least 16 (`tl.dot`'s minimum), their tails masked. Mosaic GPU blocks are kept as
        given, multiples of 64, and the operands are padded to them."""
        if platform in GPU_PLATFORMS and gpu_lowering == "mosaic":
            if any(b % MOSAIC_BLOCK_MULTIPLE for b in dataclasses.astuple(self)):
                raise ValueError(f"Mosaic GPU blocks must be multiples of 64, got {self}")
            return self
        gpu = platform in GPU_PLATFORMS
        for name, value in dataclasses.asdict(self).items():
            if value < 1 or (gpu and value & (value - 1)):
                rule = "a power of two (Triton)" if gpu else ">= 1"
                raise ValueError(f"Tiling.{name} must be {rule}, got {value}")
        dims = (num_rows, k_dim, n_dim)
        blocks = dataclasses.astuple(self)
        if gpu:
            fitted = (max(16, min(b, pl.next_power_of_2(d))) for b, d in zip(blocks, dims))
        else:
            fitted = (min(b, d) for b, d in zip(blocks, dims))
        return Tiling(*fitted)


def default_tiling(platform: str | None = None) -> Tiling:
    """Safe defaults, not tuned on hardware (none was available; see docs/design.md "Kernels").

    TPU: 128 x 128 x 128, megablox's default: it fills an MXU pass on every generation and keeps
    a straddled tile's waste (at most block_m - 1 masked rows per group boundary) small.
    GPU (both lowerings): 128 x 64 x 128, i.e. 128 x 128 output tiles with 64-deep k steps,
    whose three pipeline stages of bf16 operands (96 KiB) fit the shared memory of Ampere and
    Hopper; 64 bf16 values are one 128-byte swizzled row for Mosaic GPU.
    """
    platform = platform or jax.default_backend()
    return Tiling(128, 64, 128) if platform in GPU_PLATFORMS else Tiling(128, 128, 128)


def default_gpu_lowering(dtype: Any, platform: str) -> str:
    """'mosaic' for 16-bit operands on a local Hopper GPU (compute capability 9.x, the one
    with warpgroup MMAs), else 'triton': float32 stays on Triton, where a Hopper MMA would
    round it to tf32, and lowering for a GPU from a machine without one picks Triton."""
    if platform not in GPU_PLATFORMS or jnp.dtype(dtype).itemsize != 2:
        return "triton"
    devices = jax.devices() if jax.default_backend() in GPU_PLATFORMS else []
    hopper = bool(devices) and str(getattr(devices[0], "compute_capability", "")).startswith("9")
    return "mosaic" if hopper else "triton"


@dataclasses.dataclass(frozen=True)
class _Call:
    """Static arguments of one kernel call (hashable: a `custom_vjp` nondiff argument)."""

    tiling: Tiling
    platform: str
    interpret: Any
    transpose_rhs: bool
    out_dtype: Any
    gpu_lowering: str

    @property
    def mosaic_gpu(self) -> bool:
        """Whether the call lowers to the Mosaic GPU (Hopper) kernels."""
        return self.platform in GPU_PLATFORMS and self.gpu_lowering == "mosaic"


def _resolve(
    platform: str | None, interpret: Any, gpu_lowering: str | None, dtype: Any
) -> tuple[str, Any, str]:
    """Platform, interpret mode and GPU lowering of a call; interpret=True for a Mosaic GPU
    kernel means JAX's GPU interpreter."""
    platform = platform or jax.default_backend()
    if interpret is None:
        interpret = platform == "cpu"
    if platform == "cpu" and not interpret:
        raise ValueError("Pallas kernels run on CPU only in interpret mode (interpret=True)")
    gpu_lowering = gpu_lowering or default_gpu_lowering(dtype, platform)
    if gpu_lowering not in GPU_LOWERINGS:
        raise ValueError(f"gpu_lowering must be one of {GPU_LOWERINGS}, got {gpu_lowering!r}")
    if gpu_lowering == "mosaic" and jnp.dtype(dtype).itemsize != 2:
        raise ValueError(f"Mosaic GPU kernels take 16-bit operands (bf16 / f16), got {dtype}")
    if gpu_lowering == "mosaic" and interpret is True:
        # JAX 0.10.2 exports the GPU interpreter's parameters only from this private module.
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        interpret = InterpretGPUParams()
    return platform, interpret, gpu_lowering


def _manual_axis_type(*operands: jax.Array):
    """The operands' manual axis type with the union of their varying axes (empty outside
    `jax.shard_map`)."""
    types = [jax.typeof(x).manual_axis_type for x in operands]
    varying = frozenset().union(*(t.varying for t in types))
    return types[0].update(varying=varying)


def _vary_alike(*operands: jax.Array) -> list[jax.Array]:
    """Marks every operand varying over the union of their manual axes: a pallas_call takes one
    vma for all operands. Done outside the custom VJP, whose cotangents must then match the
    inputs' types: autodiff transposes this cast into the psum that an invariant input needs."""
    mat = _manual_axis_type(*operands)
    out = []
    for x in operands:
        missing = tuple(sorted(mat.varying - jax.typeof(x).manual_axis_type.varying))
        out.append(jax.lax.pcast(x, missing, to="varying") if missing else x)
    return out


def _blocks(call: _Call, dims: tuple[int, int, int], *operands: jax.Array) -> Blocks:
    """Block sizes fitted to [M, K, N] `dims`, output dtype and type (with the operands' manual
    axes), interpret mode."""
    tiling = call.tiling.fit(*dims, call.platform, call.gpu_lowering)
    mat = _manual_axis_type(*operands)
    return Blocks(
        block_m=tiling.block_m,
        block_k=tiling.block_k,
        block_n=tiling.block_n,
        out_dtype=call.out_dtype,
        out_type=functools.partial(jax.ShapeDtypeStruct, manual_axis_type=mat),
        interpret=call.interpret,
    )


def _pad_to(x: jax.Array, blocks: dict[int, int]) -> jax.Array:
    """x zero-padded at the end of each axis in `blocks` to a multiple of that block."""
    pads = [(0, -x.shape[a] % blocks[a] if a in blocks else 0) for a in range(x.ndim)]
    return jnp.pad(x, pads) if any(hi for _, hi in pads) else x


def _mosaic_gmm(call: _Call, blocks: Blocks, lhs, rhs, group_sizes, group_offset) -> jax.Array:
    """gmm_mgpu.gmm on operands padded to whole blocks, the result cut back to [M, N]."""
    bm, bk, bn = blocks.block_m, blocks.block_k, blocks.block_n
    num_rows, _, n_dim, num_local = gmm_dims(lhs, rhs, call.transpose_rhs)
    lhs = _pad_to(lhs, {0: bm, 1: bk})
    rhs = _pad_to(rhs, {1: bn, 2: bk} if call.transpose_rhs else {1: bk, 2: bn})
    visits = make_visits(group_sizes, lhs.shape[0], bm, group_offset, num_local)
    out = gmm_mgpu.gmm(lhs, rhs, visits, blocks, transpose_rhs=call.transpose_rhs)
    return out[:num_rows, :n_dim]


def _gmm_call(call: _Call, lhs, rhs, group_sizes, group_offset) -> jax.Array:
    num_rows, k_dim, n_dim, num_local = gmm_dims(lhs, rhs, call.transpose_rhs)
    blocks = _blocks(call, (num_rows, k_dim, n_dim), lhs, rhs, group_sizes, group_offset)
    if call.mosaic_gpu:
        return _mosaic_gmm(call, blocks, lhs, rhs, group_sizes, group_offset)
    visits = make_visits(group_sizes, num_rows, blocks.block_m, group_offset, num_local)
    kernels = gmm_gpu if call.platform in GPU_PLATFORMS else gmm_tpu
    return kernels.gmm(lhs, rhs, visits, blocks, transpose_rhs=call.transpose_rhs)


def _tgmm_call(call: _Call, lhs, grad, group_sizes, group_offset, num_local) -> jax.Array:
    num_rows, k_dim = lhs.shape
    n_dim = grad.shape[1]
    blocks = _blocks(call, (num_rows, k_dim, n_dim), lhs, grad, group_sizes, group_offset)
    if call.mosaic_gpu:
        bm, bk, bn = blocks.block_m, blocks.block_k, blocks.block_n
        bounds = local_bounds(group_sizes, num_rows, group_offset, num_local)
        lhs, grad = _pad_to(lhs, {0: bm, 1: bk}), _pad_to(grad, {0: bm, 1: bn})
        return gmm_mgpu.tgmm(lhs, grad, bounds, num_local, blocks)[:, :k_dim, :n_dim]
    if call.platform in GPU_PLATFORMS:
        bounds = local_bounds(group_sizes, num_rows, group_offset, num_local)
        return gmm_gpu.tgmm(lhs, grad, bounds, num_local, blocks)
    visits = make_visits(group_sizes, num_rows, blocks.block_m, group_offset, num_local)
    return gmm_tpu.tgmm(lhs, grad, visits, num_local, blocks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm(call: _Call, lhs, rhs, group_sizes, group_offset):
    return _gmm_call(call, lhs, rhs, group_sizes, group_offset)


def _gmm_fwd(call, lhs, rhs, group_sizes, group_offset):
    return _gmm(call, lhs, rhs, group_sizes, group_offset), (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(call, res, d_out):
    lhs, rhs, group_sizes, group_offset = res
    grads = functools.partial(_grads, call, lhs, rhs, group_sizes, group_offset)
    # d_out keeps its dtype (float32 for a bf16 gmm with preferred_element_type=float32):
    # rounding it to bf16 first drops 16 of its mantissa bits before any product is taken
    # (docs/design.md, "Kernels": ~10% of d_lhs failed megablox's tolerance that way).
    if call.mosaic_gpu and d_out.dtype != lhs.dtype:
        # Warpgroup MMAs take 16-bit operands only (float32 would be TF32 and is refused), so the
        # cotangent is split into two 16-bit parts, hi + lo, each an exact product with the
        # 16-bit weights: twice the MMAs at the 16-bit rate, ~16 of the cotangent's mantissa bits.
        hi = d_out.astype(lhs.dtype)
        lo = (d_out - hi.astype(d_out.dtype)).astype(lhs.dtype)
        (d_lhs_hi, d_rhs_hi), (d_lhs_lo, d_rhs_lo) = grads(hi, F32), grads(lo, F32)
        d_lhs = (d_lhs_hi + d_lhs_lo).astype(lhs.dtype)
        d_rhs = (d_rhs_hi + d_rhs_lo).astype(rhs.dtype)
    else:
        # The TPU and Triton kernels multiply blocks of two dtypes in float32
        # (`metadata.matmul_operands`).
        d_lhs, d_rhs = grads(d_out, lhs.dtype)
    return d_lhs, d_rhs, None, None


def _grads(call, lhs, rhs, group_sizes, group_offset, d_out, out_dtype):
    """(d_lhs, d_rhs) of the forward `call` in `out_dtype`: a gmm with the weights transposed in
    the kernel, and a tgmm. The residuals share lhs's dtype (the public `gmm` casts rhs)."""
    grad_call = dataclasses.replace(call, out_dtype=out_dtype)
    d_lhs = _gmm_call(
        dataclasses.replace(grad_call, transpose_rhs=not call.transpose_rhs),
        d_out,
        rhs,
        group_sizes,
        group_offset,
    )
    num_local = rhs.shape[0]
    if call.transpose_rhs:  # rhs[g] is [N, K]: d_rhs[g] = d_out_g.T @ lhs_g.
        d_rhs = _tgmm_call(grad_call, d_out, lhs, group_sizes, group_offset, num_local)
    else:
        d_rhs = _tgmm_call(grad_call, lhs, d_out, group_sizes, group_offset, num_local)
    return d_lhs, d_rhs


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _check(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, transpose_rhs: bool) -> None:
    k_axis = 2 if transpose_rhs else 1
    if lhs.ndim != 2 or rhs.ndim != 3 or rhs.shape[k_axis] != lhs.shape[1]:
        want = "[G, N, K]" if transpose_rhs else "[G, K, N]"
        raise ValueError(f"gmm expects lhs [M, K] and rhs {want}, got {lhs.shape}, {rhs.shape}")
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be an integer [G] vector, got {group_sizes}")
    if group_sizes.shape[0] < rhs.shape[0]:
        raise ValueError(
            f"group_sizes has {group_sizes.shape[0]} groups, fewer than rhs's {rhs.shape[0]}"
        )


def _offset(group_offset: jax.Array | int | None) -> jax.Array:
    return jnp.asarray(0 if group_offset is None else group_offset, jnp.int32).reshape(())


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    group_offset: jax.Array | int | None = None,
    transpose_rhs: bool = False,
    preferred_element_type: Any = None,
    tiling: Tiling | None = None,
    interpret: Any = None,
    platform: str | None = None,
    gpu_lowering: str | None = None,
) -> jax.Array:
    """out[M, N] = each row times its group's matrix (module docstring); differentiable.

    rhs is [G_local, K, N] ([G_local, N, K] with `transpose_rhs`) and is cast to lhs's dtype;
    the result has `preferred_element_type` (default lhs's dtype), accumulated in float32, and so
    has the cotangent of the VJP, which keeps it (float32 with bf16 operands: module docstring).
    `platform` overrides the backend the kernel is lowered for (default: the default backend);
    `tiling` defaults to `default_tiling(platform)`; `gpu_lowering` ('triton' | 'mosaic')
    defaults to `default_gpu_lowering`.
    """
    _check(lhs, rhs, group_sizes, transpose_rhs)
    platform, interpret, gpu_lowering = _resolve(platform, interpret, gpu_lowering, lhs.dtype)
    call = _Call(
        tiling or default_tiling(platform),
        platform,
        interpret,
        transpose_rhs,
        jnp.dtype(preferred_element_type or lhs.dtype),
        gpu_lowering,
    )
    operands = _vary_alike(
        lhs, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32), _offset(group_offset)
    )
    return _gmm(call, *operands)


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    num_local: int | None = None,
    group_offset: jax.Array | int | None = None,
    preferred_element_type: Any = None,
    tiling: Tiling | None = None,
    interpret: Any = None,
    platform: str | None = None,
    gpu_lowering: str | None = None,
) -> jax.Array:
    """out[G_local, K, N]: out[g] = lhs_g.T @ grad_g over the rows of local group g (zero if empty).

    G_local = `num_local` (default all G groups) starting at `group_offset`.
    """
    if lhs.ndim != 2 or grad.ndim != 2 or lhs.shape[0] != grad.shape[0]:
        raise ValueError(f"tgmm expects lhs [M, K] and grad [M, N], got {lhs.shape}, {grad.shape}")
    platform, interpret, gpu_lowering = _resolve(platform, interpret, gpu_lowering, lhs.dtype)
    dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    tiling = tiling or default_tiling(platform)
    call = _Call(tiling, platform, interpret, False, dtype, gpu_lowering)
    num_local = group_sizes.shape[0] if num_local is None else num_local
    operands = _vary_alike(
        lhs, grad.astype(lhs.dtype), group_sizes.astype(jnp.int32), _offset(group_offset)
    )
    return _tgmm_call(call, *operands, num_local)


def _padded_groups(
    rhs: jax.Array, group_sizes: jax.Array, group_offset: jax.Array | int | None, num_rows: int
) -> tuple[jax.Array, jax.Array]:
    """rhs with a zero group before and after the local ones, and sizes [pre, local..., post]."""
    offset = _offset(group_offset)
    num_local = rhs.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    pre = jnp.sum(jnp.where(jnp.arange(sizes.shape[0]) < offset, sizes, 0))
    local = local_group_sizes(sizes, offset, num_local)
    post = num_rows - pre - jnp.sum(local)
    zero = jnp.zeros_like(rhs[:1])
    padded_sizes = jnp.concatenate([pre[None], local, jnp.maximum(post, 0)[None]])
    return jnp.concatenate([zero, rhs, zero]), padded_sizes


def gmm_reference(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    group_offset: jax.Array | int | None = None,
    transpose_rhs: bool = False,
    preferred_element_type: Any = None,
    tiling: Tiling | None = None,
    interpret: Any = None,
    platform: str | None = None,
    gpu_lowering: str | None = None,
) -> jax.Array:
    """`gmm` in XLA with `jax.lax.ragged_dot` (same signature; the kernel arguments unused).

    ragged_dot has no working group_offset (jax issue #34168), so the rows outside the local
    groups form two extra groups with zero weights.
    """
    _check(lhs, rhs, group_sizes, transpose_rhs)
    rhs = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    rhs, sizes = _padded_groups(rhs, group_sizes, group_offset, lhs.shape[0])
    out = jax.lax.ragged_dot(lhs, rhs.astype(lhs.dtype), sizes, preferred_element_type=jnp.float32)
    return out.astype(preferred_element_type or lhs.dtype)
