"""Grouped-matmul backends: tile layout, tile choice, and the custom VJPs of the tiled loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimoe.moe.gmm import (
    default_tile,
    gather_rows,
    gathered_swiglu,
    tile_layout,
    tiled_matmul,
)


def test_default_tile_is_a_quarter_of_a_balanced_group_within_bounds():
    assert default_tile(8192, 8) == 128  # Mixtral shape: 1024 rows per expert, capped
    assert default_tile(32768, 64) == 128  # fine-grained: 512 rows per expert
    assert default_tile(2048, 16) == 32  # 128 rows per expert
    assert default_tile(13, 3) == 8  # tiny: the floor
    assert default_tile(8192, 8, max_tile=64) == 64  # the fused SwiGLU's cap (`tile_for`)
    assert default_tile(2048, 16, max_tile=64) == 32


def test_tile_layout_marks_the_tiles_past_the_last_group():
    # Groups of 3, 0 and 5 rows plus 2 sentinel rows, tiles of 4: expert 0 in tile 0, expert 2
    # in tiles 1-2; the sentinel rows land in tile 3, owned by the sentinel expert 3.
    dest_m, valid_m, tile_expert_t, num_tiles = tile_layout(jnp.array([3, 0, 5]), 10, 4)
    assert num_tiles == 5  # ceil((10 + 3 * 3) / 4)
    np.testing.assert_array_equal(dest_m, [0, 1, 2, 4, 5, 6, 7, 8, 12, 13])
    np.testing.assert_array_equal(valid_m, [True] * 8 + [False] * 2)
    np.testing.assert_array_equal(tile_expert_t, [0, 2, 2, 3, 3])


def test_tiled_matmul_values_and_gradients_match_a_per_tile_loop():
    rng = np.random.default_rng(0)
    # 4 tiles of 3 rows, in 5 -> out 7, E = 3; tile 3 belongs to the sentinel expert 3.
    x_tci = rng.normal(size=(4, 3, 5)).astype(np.float32)
    w_eij = rng.normal(size=(3, 5, 7)).astype(np.float32)
    dy_tcj = rng.normal(size=(4, 3, 7)).astype(np.float32)
    tile_expert_t = np.array([0, 2, 2, 3])

    y_tcj, vjp = jax.vjp(lambda x, w: tiled_matmul(x, w, jnp.asarray(tile_expert_t)), x_tci, w_eij)
    dx_tci, dw_eij = vjp(jnp.asarray(dy_tcj))

    ref_y = np.zeros((4, 3, 7), np.float32)
    ref_dx = np.zeros_like(x_tci)
    ref_dw = np.zeros_like(w_eij)
    for t, e in enumerate(tile_expert_t[:3]):
        ref_y[t] = x_tci[t] @ w_eij[e]
        ref_dx[t] = dy_tcj[t] @ w_eij[e].T
        ref_dw[e] += x_tci[t].T @ dy_tcj[t]
    np.testing.assert_allclose(y_tcj, ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx_tci, ref_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw_eij, ref_dw, rtol=1e-5, atol=1e-5)
    assert not np.any(dw_eij[1])  # expert 1 owns no tile


@pytest.mark.parametrize("tile", [1, 4, 16])
def test_tiled_matmul_through_the_layout_equals_ragged_dot(tile):
    rng = np.random.default_rng(1)
    group_sizes_e = jnp.array([4, 0, 6, 1])  # 11 rows in groups, 2 sentinel rows after them
    x_mi = jnp.asarray(rng.normal(size=(13, 5)), jnp.float32)
    w_eij = jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32)
    dest_m, valid_m, tile_expert_t, num_tiles = tile_layout(group_sizes_e, 13, tile)
    x_pi = jnp.zeros((num_tiles * tile, 5)).at[dest_m].set(jnp.where(valid_m[:, None], x_mi, 0))
    y_pj = tiled_matmul(x_pi.reshape(num_tiles, tile, 5), w_eij, tile_expert_t)
    y_mj = y_pj.reshape(-1, 3)[dest_m]
    ref_mj = jax.lax.ragged_dot(x_mi, w_eij, group_sizes_e)
    np.testing.assert_allclose(y_mj, ref_mj, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y_mj[11:], 0.0)


def test_gather_rows_backward_is_the_vjp_of_the_plain_gather():
    rng = np.random.default_rng(2)
    x_sd = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
    dy_rd = jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)
    # Rows 0 and 3 read source 1, row 1 reads source 0, rows 2 and 4 read nothing (index 3).
    index_r = jnp.array([1, 0, 3, 1, 3])
    readers_sk = jnp.array([[1, 5], [0, 3], [5, 5]])  # 5 = out of range: no reader
    y_rd, vjp = jax.vjp(lambda x: gather_rows(x, index_r, readers_sk), x_sd)
    np.testing.assert_array_equal(y_rd, [x_sd[1], x_sd[0], [0, 0], x_sd[1], [0, 0]])
    (dx_sd,) = vjp(dy_rd)
    np.testing.assert_allclose(dx_sd, [dy_rd[1], dy_rd[0] + dy_rd[3], [0, 0]], rtol=1e-6)


def swiglu_np(x, w_gate, w_up, w_down):
    gate = x @ w_gate
    return (gate / (1 + np.exp(-gate)) * (x @ w_up)) @ w_down


# Expert 0 has 2 tiles, expert 2 has 5. Chunks of 1 tile: tile by tile; of 2: expert 0 one
# chunk, expert 2 a chunk and a last chunk of 3 (one tile would be left over); of 3: expert 0
# two single tiles, expert 2 a chunk and two single tiles; of 4: expert 2 one chunk of 5.
@pytest.mark.parametrize("chunk_rows", [3, 6, 9, 12])
def test_gathered_swiglu_values_and_gradients_match_autodiff_of_a_per_row_loop(chunk_rows):
    rng = np.random.default_rng(2)
    # 8 tiles of 3 rows over S = 5 source rows, D = 4, F = 6, E = 3: expert 1 owns no tile,
    # tile 7 is a sentinel (expert E); source 5 marks a padding row. Sources 0, 1, 3 and 4
    # appear in both experts' tiles (a token routed to two experts).
    source_tc = np.array(
        [[0, 1, 3], [4, 5, 5], [1, 2, 3], [0, 2, 4], [3, 4, 1], [2, 0, 4], [3, 5, 5], [1, 2, 0]]
    )
    tile_expert_t = np.array([0, 0, 2, 2, 2, 2, 2, 3])
    x_sd = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    w_gate, w_up = (jnp.asarray(rng.normal(size=(3, 4, 6)), jnp.float32) for _ in range(2))
    w_down = jnp.asarray(rng.normal(size=(3, 6, 4)), jnp.float32)
    weight_tc = jnp.asarray(rng.uniform(size=(8, 3)), jnp.float32)
    dy_sd = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)

    def loop(x_sd, w_gate, w_up, w_down, weight_tc):
        y_sd = jnp.zeros((5, 4))
        for t, e in enumerate(tile_expert_t[:7]):
            for c, s in enumerate(source_tc[t]):
                if s < 5:
                    out_d = jax.nn.silu(x_sd[s] @ w_gate[e]) * (x_sd[s] @ w_up[e]) @ w_down[e]
                    y_sd = y_sd.at[s].add(weight_tc[t, c] * out_d)
        return y_sd

    def fused(x_sd, w_gate, w_up, w_down, weight_tc):
        args = (jnp.asarray(source_tc), weight_tc, jnp.asarray(tile_expert_t), chunk_rows)
        return gathered_swiglu(x_sd, w_gate, w_up, w_down, *args)

    args = (x_sd, w_gate, w_up, w_down, weight_tc)
    y_sd, vjp = jax.vjp(fused, *args)
    ref_y, ref_vjp = jax.vjp(loop, *args)
    np.testing.assert_allclose(y_sd, ref_y, rtol=1e-5, atol=1e-5)
    # Without a VJP the loops keep no activations; the values are the same.
    np.testing.assert_allclose(fused(*args), ref_y, rtol=1e-5, atol=1e-5)
    # Source 0: expert 0 (tile 0) and expert 2 (tiles 3 and 5); tile 7 (sentinel) adds nothing.
    want_0 = sum(
        float(weight_tc[t, c]) * swiglu_np(x_sd[0], w_gate[e], w_up[e], w_down[e])
        for t, c, e in ((0, 0, 0), (3, 0, 2), (5, 1, 2))
    )
    np.testing.assert_allclose(y_sd[0], want_0, rtol=1e-4)
    grads = vjp(dy_sd)
    for got, want in zip(grads, ref_vjp(dy_sd)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    d_w_gate, d_weight_tc = np.asarray(grads[1]), np.asarray(grads[4])
    assert not np.any(d_w_gate[1]) and np.all(np.any(d_w_gate[[0, 2]], axis=(1, 2)))
    # Padding rows and the sentinel tile get no weight gradient; the computed rows do.
    computed_tc = (source_tc < 5) & (tile_expert_t < 3)[:, None]
    assert not np.any(d_weight_tc[~computed_tc]) and np.all(d_weight_tc[computed_tc] != 0)


def test_gathered_swiglu_bfloat16_rows_float32_weights():
    rng = np.random.default_rng(3)
    x_sd = jnp.asarray(rng.normal(size=(8, 8)), jnp.bfloat16)
    w_gate, w_up = (jnp.asarray(rng.normal(size=(2, 8, 16)), jnp.float32) for _ in range(2))
    w_down = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
    source_tc = jnp.arange(8).reshape(2, 4)
    tile_expert_t = jnp.array([0, 1])

    def apply(x, *w):
        return gathered_swiglu(x, *w, source_tc, jnp.ones((2, 4)), tile_expert_t)

    grads = jax.grad(lambda x, *w: apply(x, *w).sum(), argnums=(0, 1, 2, 3))(
        x_sd, w_gate, w_up, w_down
    )
    # Cotangents keep their primal's dtype (bf16 rows, f32 weights accumulated in f32).
    assert [g.dtype for g in grads] == [jnp.bfloat16] + [jnp.float32] * 3
    y = apply(x_sd, w_gate, w_up, w_down)
    assert y.dtype == jnp.float32  # summed in float32
    x32 = np.asarray(x_sd, np.float32)
    want = swiglu_np(x32[4:], *(np.asarray(w[1]) for w in (w_gate, w_up, w_down)))
    np.testing.assert_allclose(np.asarray(y[4:]), want, rtol=0.05, atol=0.25)


def test_gathered_swiglu_rejects_mismatched_tile_arrays():
    w = jnp.zeros((2, 4, 3))
    with pytest.raises(ValueError, match="source"):
        gathered_swiglu(
            jnp.zeros((5, 4)),
            w,
            w,
            jnp.zeros((2, 3, 4)),
            jnp.zeros((2, 3), int),
            jnp.zeros((2, 2)),
            jnp.array([0, 1]),
        )
