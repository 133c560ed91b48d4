"""Dropless dispatch against hand-computed values and the dense oracle (outputs and gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimoe.models.lora import LoRAConfig
from unimoe.moe.dispatch import dense_reference, dropless_dispatch
from unimoe.moe.experts import GROUPED_IMPLS, ExpertBank, tile_layout


def scale_by_expert_id(x_md: jax.Array, group_sizes_e: jax.Array) -> jax.Array:
    """A grouped 'expert' e that multiplies its rows by e + 1, so mixing is checkable by hand."""
    expert_m = jnp.repeat(
        jnp.arange(group_sizes_e.shape[0]), group_sizes_e, total_repeat_length=x_md.shape[0]
    )
    return x_md * (expert_m + 1)[:, None].astype(x_md.dtype)


def test_dropless_routes_each_token_to_its_experts_and_mixes_by_weight():
    x_nd = jnp.array([[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]])
    experts_nk = jnp.array([[2, 0], [0, 1], [2, 1]])
    weights_nk = jnp.array([[0.75, 0.25], [0.5, 0.5], [0.1, 0.9]])
    dispatch = jax.jit(dropless_dispatch, static_argnums=(3, 4))
    y_nd = dispatch(x_nd, weights_nk, experts_nk, scale_by_expert_id, 3)
    # Per token, the factor is sum_k w_k * (e_k + 1): 0.75*3 + 0.25*1 = 2.5; 0.5*1 + 0.5*2 = 1.5;
    # 0.1*3 + 0.9*2 = 2.1.
    np.testing.assert_allclose(y_nd, [[2.5, 5.0], [4.5, -1.5], [1.05, 8.4]], rtol=1e-6)


def random_routing(seed: int, num_tokens: int, top_k: int, choices: tuple[int, ...]):
    """Distinct experts per token drawn from `choices`, softmax weights (numpy: no compiles)."""
    rng = np.random.default_rng(seed)
    experts_nk = np.stack([rng.permutation(choices)[:top_k] for _ in range(num_tokens)])
    logits_nk = rng.normal(size=(num_tokens, top_k))
    weights_nk = np.exp(logits_nk) / np.exp(logits_nk).sum(-1, keepdims=True)
    return jnp.asarray(weights_nk, jnp.float32), jnp.asarray(experts_nk, jnp.int32)


def make_bank(lora_rank: int) -> ExpertBank:
    """A bank with every weight drawn from N(0, 0.4), adapters included, so all terms matter.

    Built abstractly: the eager random init would cost a compile per shape and be overwritten.
    """
    lora = LoRAConfig(rank=lora_rank, alpha=4.0)
    bank = nnx.eval_shape(lambda: ExpertBank(3, 5, 11, lora=lora, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    for _, var in nnx.iter_graph(bank):
        if isinstance(var, nnx.Param):
            var.set_value(jnp.asarray(0.4 * rng.normal(size=var.get_value().shape), jnp.float32))
    return bank


@nnx.jit(static_argnames=("use_oracle", "grouped_impl"))
def loss_and_grads(bank, x_nd, weights_nk, experts_nk, probe_nd, use_oracle, grouped_impl=""):
    def loss(bank, x_nd, weights_nk):
        if use_oracle:
            y_nd = dense_reference(x_nd, weights_nk, experts_nk, bank.batched, 3)
        else:
            # Tiles of 4 rows: no group size here is a multiple of it.
            grouped = functools.partial(bank.grouped, impl=grouped_impl, tile=4)
            y_nd = dropless_dispatch(x_nd, weights_nk, experts_nk, grouped, 3)
        return jnp.sum(y_nd * probe_nd)

    return nnx.value_and_grad(loss, argnums=(0, 1, 2))(bank, x_nd, weights_nk)


@pytest.mark.parametrize("grouped_impl", GROUPED_IMPLS)
@pytest.mark.parametrize(
    "top_k, choices, lora_rank",
    [
        # N = 7 tokens, k = 2 of E = 3: nothing divides evenly; with and without LoRA.
        (2, (0, 1, 2), 0),
        (2, (0, 1, 2), 2),
        # Expert 1 receives no token: an empty group.
        (2, (0, 2), 0),
        # Every token on expert 1 only.
        (1, (1,), 0),
    ],
)
def test_dropless_matches_dense_oracle_values_and_gradients(
    top_k, choices, lora_rank, grouped_impl
):
    weights_nk, experts_nk = random_routing(1, 7, top_k, choices)
    rng = np.random.default_rng(2)
    x_nd = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
    probe_nd = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
    bank = make_bank(lora_rank)
    args = (bank, x_nd, weights_nk, experts_nk, probe_nd)
    value, (g_bank, g_x, g_w) = loss_and_grads(*args, use_oracle=False, grouped_impl=grouped_impl)
    ref_value, (ref_g_bank, ref_g_x, ref_g_w) = loss_and_grads(*args, use_oracle=True)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(g_x, ref_g_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_w, ref_g_w, rtol=1e-5, atol=1e-6)
    flat_g = dict(nnx.to_flat_state(g_bank))
    flat_ref = dict(nnx.to_flat_state(ref_g_bank))
    assert flat_g.keys() == flat_ref.keys()
    for path in flat_g:
        np.testing.assert_allclose(
            flat_g[path][...], flat_ref[path][...], rtol=1e-5, atol=1e-6, err_msg=str(path)
        )
    # An expert that got no token gets exactly zero gradient; the others do get one.
    for e in range(3):
        assert np.any(flat_g[("w_gate_edf",)][...][e]) == (e in choices)


def test_dispatch_rejects_mismatched_routing_shapes():
    x_nd, weights_nk, experts_nk = jnp.zeros((4, 5)), jnp.zeros((4, 2)), jnp.zeros((3, 2), int)
    with pytest.raises(ValueError, match="weights"):
        dropless_dispatch(x_nd, weights_nk, experts_nk, scale_by_expert_id, 3)


def test_tile_layout_pads_each_group_to_whole_tiles():
    # Groups of 3, 0 and 5 rows in tiles of 4: expert 0 -> rows 0-2 of tile 0, expert 2 -> tiles
    # 1-2; the static tile count allows tile - 1 padding rows per group.
    dest_m, valid_m, tile_expert_t, num_tiles = tile_layout(jnp.array([3, 0, 5]), 8, 4)
    assert num_tiles == 5  # ceil((8 + 3 * 3) / 4)
    np.testing.assert_array_equal(dest_m, [0, 1, 2, 4, 5, 6, 7, 8])
    np.testing.assert_array_equal(valid_m, [True] * 8)
    np.testing.assert_array_equal(tile_expert_t[:3], [0, 2, 2])


def test_tiled_grouped_matmul_zeroes_rows_past_the_groups():
    bank = make_bank(0)
    x_md = jnp.asarray(np.random.default_rng(3).normal(size=(6, 5)), jnp.float32)
    group_sizes_e = jnp.array([2, 0, 1])
    tiled = bank.grouped(x_md, group_sizes_e, impl="tiles", tile=4)
    ragged = bank.grouped(x_md, group_sizes_e, impl="ragged_dot")
    np.testing.assert_allclose(tiled, ragged, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(tiled[3:], 0.0)
