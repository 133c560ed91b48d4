"""The Hopper (Mosaic GPU) grouped matmul kernels under JAX's GPU interpreter, and lowered.

The interpreter simulates shared memory, TMA copies, barriers and warpgroup MMAs on CPU, so the
visits, k pipelines, row masks and the power-of-two ladder of row stores run as on the GPU. One
difference (JAX 0.10.2): it cannot read a transposed shared-memory view, so there the transposed
operand (the weights in d_lhs, the activations in tgmm) is copied transposed first.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

from tests.kernels.test_gmm import assert_cotangent_precision_kept, mixed_precision_operands
from unimoe.kernels import gmm as kgmm

TILING = kgmm.Tiling(64, 64, 64)
# M, K, N: two k steps, three n tiles and five row tiles, none of them whole.
M, K, N = 300, 100, 150
CASES = {
    # An empty group, groups straddling row tiles, rows 290-299 past every group.
    "straddle_empty_tail": ([70, 0, 150, 70], None, 4),
    # Expert-parallel shard: local groups 1-3 of 5 (one empty); rows of groups 0 and 4 are zero.
    "group_offset": ([37, 90, 0, 100, 73], 1, 3),
}


def operands(case: str):
    sizes, offset, num_local = CASES[case]
    keys = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(keys[0], (M, K), jnp.bfloat16)
    w = jax.random.normal(keys[1], (num_local, K, N), jnp.bfloat16)
    dy = jax.random.normal(keys[2], (M, N), jnp.bfloat16)
    return x, w, jnp.asarray(sizes, jnp.int32), dy, offset


@functools.partial(jax.jit, static_argnames=("offset", "mosaic"))
def out_and_grads(x, w, sizes, dy, *, offset, mosaic):
    if mosaic:
        params = InterpretGPUParams(detect_races=True)
        fn = functools.partial(
            kgmm.gmm, tiling=TILING, platform="gpu", gpu_lowering="mosaic", interpret=params
        )
    else:
        fn = kgmm.gmm_reference
    out, vjp = jax.vjp(lambda x, w: fn(x, w, sizes, group_offset=offset), x, w)
    return (out, *vjp(dy))


@pytest.mark.parametrize("case", sorted(CASES))
def test_mosaic_gpu_gmm_matches_ragged_dot_forward_and_grads(case):
    x, w, sizes, dy, offset = operands(case)
    got = out_and_grads(x, w, sizes, dy, offset=offset, mosaic=True)
    assert not interpret_pallas_call.get_races().races_found
    want = out_and_grads(x, w, sizes, dy, offset=offset, mosaic=False)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype == jnp.bfloat16
        # Both accumulate the same bf16 products in float32; only the bf16 rounding differs.
        np.testing.assert_allclose(np.float32(g), np.float32(r), rtol=2e-2, atol=6e-2)
    # Rows outside the local groups are exactly zero (the ladder stored the sentinel visits).
    sizes_np, first_group, num_local = (
        np.asarray(CASES[case][0]),
        CASES[case][1] or 0,
        CASES[case][2],
    )
    first = sizes_np[:first_group].sum()
    last = first + sizes_np[first_group : first_group + num_local].sum()
    outside = np.r_[0:first, last:M]
    assert np.all(np.float32(got[0])[outside] == 0)
    assert np.all(np.float32(got[1])[outside] == 0)
    assert np.abs(np.float32(got[0])[first:last]).sum(axis=1).min() > 0


def test_mosaic_gpu_is_chosen_for_16_bit_operands_on_hopper_only():
    # This machine has no GPU: lowering for one picks Triton, and float32 always does.
    assert kgmm.default_gpu_lowering(jnp.bfloat16, "gpu") == "triton"
    assert kgmm.default_gpu_lowering(jnp.float32, "gpu") == "triton"
    x, w, sizes = jnp.zeros((8, 64)), jnp.zeros((2, 64, 64)), jnp.array([4, 4])
    with pytest.raises(ValueError, match="16-bit operands"):
        kgmm.gmm(x, w, sizes, platform="gpu", gpu_lowering="mosaic", interpret=True)
    with pytest.raises(ValueError, match="multiples of 64"):
        kgmm.gmm(
            x.astype(jnp.bfloat16),
            w,
            sizes,
            tiling=kgmm.Tiling(64, 32, 64),
            platform="gpu",
            gpu_lowering="mosaic",
            interpret=True,
        )
    with pytest.raises(ValueError, match="gpu_lowering"):
        kgmm.gmm(x, w, sizes, platform="gpu", gpu_lowering="cutlass", interpret=True)


@jax.jit
def mosaic_grads(x, w, sizes, dy):
    def fn(x, w):
        return kgmm.gmm(
            x,
            w,
            sizes,
            preferred_element_type=jnp.float32,
            tiling=TILING,
            platform="gpu",
            gpu_lowering="mosaic",
            interpret=True,
        )

    return jax.vjp(fn, x, w)[1](dy)


def test_mosaic_gpu_float32_cotangent_keeps_its_precision():
    """Warpgroup MMAs take 16-bit operands only: the float32 cotangent runs as two bf16 parts
    through the bf16 kernels (whose transposed variants the bf16 tests above cover)."""
    x, w, sizes, dy = mixed_precision_operands(transpose_rhs=False)
    assert_cotangent_precision_kept(mosaic_grads, x, w, sizes, dy, transpose_rhs=False)
