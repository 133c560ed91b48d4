"""Pallas grouped matmul kernels in interpret mode against the XLA references, forward and VJP.

Both kernel families run on CPU: the TPU (Mosaic) kernels under the HLO interpreter and the TPU
simulator, the GPU (Triton) kernels under the HLO interpreter. Blocks of 16 with M=40, K=24,
N=20 make every dimension a non-multiple of its block.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.test_util import check_grads

from unimoe.kernels import gmm as kgmm


def tgmm_reference(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`tgmm` in XLA: a group one-hot [G, M] contracted with both operands."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    group_m = jnp.searchsorted(ends, jnp.arange(lhs.shape[0]), side="right")
    onehot_gm = jax.nn.one_hot(group_m, group_sizes.shape[0], dtype=jnp.float32, axis=0)
    out = jnp.einsum(
        "gm,mk,mn->gkn",
        onehot_gm,
        lhs.astype(jnp.float32),
        grad.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return out.astype(lhs.dtype)


TILING = kgmm.Tiling(16, 16, 16)
M, K, N = 40, 24, 20
# name -> (group sizes, group_offset, local groups); sizes may sum to less than M.
CASES = {
    # An empty group, a group straddling three row tiles, rows 38-39 past every group.
    "straddle_empty_tail": ([10, 0, 25, 3], None, 4),
    "one_group_all_rows": ([0, M, 0, 0], None, 4),
    # Expert-parallel shard: local groups 1-3 of 5 (one empty); rows of groups 0 and 4 are zero.
    "group_offset": ([7, 9, 0, 2, 12], 1, 3),
}


def operands(case: str, dtype=jnp.float32):
    sizes, offset, num_local = CASES[case]
    keys = jax.random.split(jax.random.key(len(case)), 3)
    x = jax.random.normal(keys[0], (M, K), dtype)
    w = jax.random.normal(keys[1], (num_local, K, N), dtype)
    dy = jax.random.normal(keys[2], (M, N), dtype)
    return x, w, jnp.asarray(sizes, jnp.int32), dy, offset


@functools.partial(jax.jit, static_argnames=("reference", "platform", "offset"))
def out_and_grads(x, w, sizes, dy, *, offset, reference, platform="tpu"):
    if reference:
        fn = functools.partial(kgmm.gmm_reference, group_offset=offset)
    else:
        fn = functools.partial(
            kgmm.gmm, group_offset=offset, tiling=TILING, interpret=True, platform=platform
        )
    out, vjp = jax.vjp(lambda x, w: fn(x, w, sizes), x, w)
    return (out, *vjp(dy))


def assert_close(got, want, tol):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(np.float32(g), np.float32(w), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "case,platform",
    [
        ("straddle_empty_tail", "tpu"),
        ("one_group_all_rows", "tpu"),
        ("group_offset", "tpu"),
        ("group_offset", "gpu"),
    ],
)
def test_gmm_matches_ragged_dot_forward_and_grads(case, platform):
    x, w, sizes, dy, offset = operands(case)
    got = out_and_grads(x, w, sizes, dy, offset=offset, reference=False, platform=platform)
    want = out_and_grads(x, w, sizes, dy, offset=offset, reference=True)
    assert_close(got, want, 1e-4)
    # Rows outside the (local) groups are exactly zero, and so is their gradient.
    sizes_np, offset_np = np.asarray(CASES[case][0]), CASES[case][1] or 0
    first = sizes_np[:offset_np].sum()
    last = first + sizes_np[offset_np : offset_np + CASES[case][2]].sum()
    outside = np.r_[0:first, last:M]
    assert np.all(np.asarray(got[0])[outside] == 0)
    assert np.all(np.asarray(got[1])[outside] == 0)
    assert np.abs(np.asarray(got[0])[first:last]).min() > 0 or last == first


def test_gmm_bfloat16_accumulates_in_float32():
    x, w, sizes, dy, offset = operands("straddle_empty_tail", jnp.bfloat16)
    got = out_and_grads(x, w, sizes, dy, offset=offset, reference=False)
    want = out_and_grads(x, w, sizes, dy, offset=offset, reference=True)
    # Same bf16 inputs, float32 accumulation in both: only the final bf16 rounding may differ.
    assert_close(got, want, 2e-2)
    exact = jnp.float32(x) @ jnp.float32(w[0])
    np.testing.assert_allclose(np.float32(got[0][:10]), exact[:10], rtol=1e-2, atol=2e-2)


def test_check_grads_numerically():
    x, w, sizes, _, _ = operands("straddle_empty_tail")
    fn = jax.jit(
        lambda x, w: kgmm.gmm(x[:12, :8], w[:, :8, :4], jnp.array([5, 0, 6, 1]), interpret=True)
    )
    check_grads(fn, (x, w), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_gmm_under_shard_map_with_check_vma():
    """Experts sharded over 2 devices (group_offset per shard): the psum of the shards' outputs
    is the full grouped matmul, forward and grads, with `check_vma=True`.

    Runs in the TPU simulator: JAX 0.10.2's HLO interpreter (interpret=True) evaluates the
    pre-traced block index maps (and the GPU kernel's scalar loads) with invariant grid indices
    against varying operands, which its own vma check then rejects in `dynamic_slice`.
    """
    x, _, sizes, dy, _ = operands("straddle_empty_tail")
    w = jax.random.normal(jax.random.key(7), (4, K, N))
    mesh = jax.make_mesh((2,), ("expert",), axis_types=(jax.sharding.AxisType.Explicit,))
    simulator = pltpu.InterpretParams()

    def sharded(x, w, sizes):
        def shard(x, w_local, sizes):
            offset = jax.lax.axis_index("expert") * w_local.shape[0]
            out = kgmm.gmm(
                x, w_local, sizes, group_offset=offset, tiling=TILING, interpret=simulator
            )
            return jax.lax.psum(out, "expert")

        return jax.shard_map(
            shard,
            mesh=mesh,
            in_specs=(jax.P(), jax.P("expert"), jax.P()),
            out_specs=jax.P(),
            check_vma=True,
        )(x, w, sizes)

    @jax.jit
    def run(x, w):
        out, vjp = jax.vjp(lambda x, w: sharded(x, w, sizes), x, w)
        return (out, *vjp(dy))

    with jax.set_mesh(mesh):
        w_sharded = jax.reshard(w, jax.P("expert"))
        got = run(x, w_sharded)
    want = out_and_grads(x, w, sizes, dy, offset=None, reference=True)
    assert_close(got, want, 1e-4)


def test_tpu_kernels_have_no_races_in_the_tpu_simulator():
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call

    params = pltpu.InterpretParams(
        detect_races=True, uninitialized_memory="nan", num_cores_or_threads=2
    )
    x = jax.random.normal(jax.random.key(0), (32, 16))
    w = jax.random.normal(jax.random.key(1), (3, 16, 16))
    dy = jax.random.normal(jax.random.key(2), (32, 16))
    sizes = jnp.array([10, 0, 19], jnp.int32)
    out = kgmm.gmm(x, w, sizes, tiling=TILING, interpret=params)
    grad_w = kgmm.tgmm(x, dy, sizes, tiling=TILING, interpret=params)
    assert not interpret_pallas_call.races.races_found
    # Uninitialised memory is NaN here: every row of the outputs must have been written.
    np.testing.assert_allclose(out, kgmm.gmm_reference(x, w, sizes), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grad_w, tgmm_reference(x, dy, sizes), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "platform,gpu_lowering,marker",
    [
        ("tpu", None, "@tpu_custom_call("),
        ("cuda", "triton", "@__gpu$xla.gpu.triton("),
        ("cuda", "mosaic", "@mosaic_gpu_v2("),
    ],
)
def test_kernels_lower_for_accelerators(platform, gpu_lowering, marker):
    """Without the hardware: Pallas lowers both kernels (Mosaic TPU / Triton / Mosaic GPU, the
    last with its layout inference) for the platform."""
    x = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4, 256, 256), jnp.bfloat16)
    sizes = jax.ShapeDtypeStruct((4,), jnp.int32)

    def loss(x, w, sizes):
        out = kgmm.gmm(x, w, sizes, platform=platform, interpret=False, gpu_lowering=gpu_lowering)
        return jnp.sum(out.astype(jnp.float32))

    text = (
        jax.jit(jax.value_and_grad(loss, (0, 1)))
        .trace(x, w, sizes)
        .lower(lowering_platforms=(platform,))
        .as_text()
    )
    # Forward gmm, d_lhs gmm (transposed weights) and tgmm.
    assert text.count(marker) == 3, text.count(marker)


def test_bad_operands_are_rejected_clearly():
    x, w, sizes = jnp.zeros((8, 4)), jnp.zeros((2, 5, 3)), jnp.array([4, 4])
    with pytest.raises(ValueError, match=r"lhs \[M, K\] and rhs \[G, K, N\]"):
        kgmm.gmm(x, w, sizes, interpret=True)
    with pytest.raises(ValueError, match="integer"):
        kgmm.gmm(x, jnp.zeros((2, 4, 3)), jnp.array([4.0, 4.0]), interpret=True)
    with pytest.raises(ValueError, match="only in interpret mode"):
        kgmm.gmm(x, jnp.zeros((2, 4, 3)), sizes, interpret=False)
    with pytest.raises(ValueError, match="power of two"):
        kgmm.gmm(x, jnp.zeros((2, 4, 3)), sizes, tiling=kgmm.Tiling(24, 16, 16), platform="gpu")


# Megablox's tolerances when an operand or the output is bf16 (jax `tests/pallas/tpu_gmm_test.py`,
# `tolerances`). Its test draws bf16-exact cotangents, so it cannot see a cast-first backward.
MEGABLOX_ATOL, MEGABLOX_RTOL = 1e-3, 1e-2
# Odd group sizes with an empty group, summing to the 128 rows.
MIXED_SIZES = (37, 0, 51, 29, 11)


def mixed_precision_operands(transpose_rhs: bool):
    """bf16 x [128, 128] and weights, and a float32 cotangent [128, 256] drawn from a normal, so
    (almost) none of it is bf16-exact: what a bf16 gmm with a float32 output gets back."""
    num_rows, k_dim, n_dim = 128, 128, 256
    keys = jax.random.split(jax.random.key(11), 3)
    x = jax.random.normal(keys[0], (num_rows, k_dim), jnp.bfloat16)
    w_shape = (n_dim, k_dim) if transpose_rhs else (k_dim, n_dim)
    w = jax.random.normal(keys[1], (len(MIXED_SIZES), *w_shape), jnp.bfloat16)
    dy = jax.random.normal(keys[2], (num_rows, n_dim), jnp.float32)
    return x, w, jnp.asarray(MIXED_SIZES, jnp.int32), dy


def float32_grads(x, w, sizes, dy, transpose_rhs: bool):
    """(d_x, d_w) in float32 from the same bf16 values upcast: `jax.vjp` of `ragged_dot`."""

    def fn(x, w):
        w = jnp.swapaxes(w, 1, 2) if transpose_rhs else w
        return jax.lax.ragged_dot(x, w, sizes, precision=jax.lax.Precision.HIGHEST)

    return jax.vjp(fn, x.astype(jnp.float32), w.astype(jnp.float32))[1](dy)


def tolerance_ratio(got: jax.Array, want: jax.Array) -> float:
    """max |got - want| / (atol + rtol |want|) at megablox's tolerances: <= 1 passes its test."""
    got, want = np.float32(got), np.float32(want)
    return float(np.max(np.abs(got - want) / (MEGABLOX_ATOL + MEGABLOX_RTOL * np.abs(want))))


def assert_cotangent_precision_kept(grads_fn, x, w, sizes, dy, transpose_rhs) -> None:
    """The kernel's (d_x, d_w) for the float32 cotangent pass megablox's tolerance against the
    float32 reference, and their error is at least 5x smaller than the same kernel's for the
    cotangent rounded to bf16 first, which is what the backward pass did before (its d_x and d_w
    were bit-identical to these on this data)."""
    want = float32_grads(x, w, sizes, dy, transpose_rhs)
    got = grads_fn(x, w, sizes, dy)
    cast_first = grads_fn(x, w, sizes, dy.astype(jnp.bfloat16).astype(jnp.float32))
    for name, g, c, r in zip(("d_x", "d_w"), got, cast_first, want, strict=True):
        assert g.dtype == jnp.bfloat16, name  # the primal's dtype
        new, old = tolerance_ratio(g, r), tolerance_ratio(c, r)
        assert new <= 1 and old > 1 and 5 * new < old, (name, new, old)


@functools.partial(jax.jit, static_argnames=("platform", "transpose_rhs"))
def kernel_grads(x, w, sizes, dy, *, platform, transpose_rhs):
    def fn(x, w):
        return kgmm.gmm(
            x,
            w,
            sizes,
            transpose_rhs=transpose_rhs,
            preferred_element_type=jnp.float32,
            tiling=kgmm.Tiling(32, 32, 32),
            interpret=True,
            platform=platform,
        )

    return jax.vjp(fn, x, w)[1](dy)


@pytest.mark.parametrize(
    "platform,transpose_rhs", [("tpu", False), ("tpu", True), ("gpu", False), ("gpu", True)]
)
def test_float32_cotangent_of_bf16_gmm_keeps_its_precision(platform, transpose_rhs):
    """bf16 operands, float32 output and cotangent: the backward kernels take the float32
    cotangent and bf16 residuals (TPU kernels and Triton kernels, interpret mode)."""
    x, w, sizes, dy = mixed_precision_operands(transpose_rhs)
    grads_fn = functools.partial(kernel_grads, platform=platform, transpose_rhs=transpose_rhs)
    assert_cotangent_precision_kept(grads_fn, x, w, sizes, dy, transpose_rhs)
