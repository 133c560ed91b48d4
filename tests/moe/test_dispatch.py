"""Dropless and capacity dispatch against hand-computed values and slow oracles (outputs, grads)."""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimoe.moe import dispatch
from unimoe.moe.dispatch import (
    capacity,
    capacity_dispatch,
    dropless_dispatch,
    dropless_tiled_dispatch,
    stable_expert_order,
)
from unimoe.moe.experts import ExpertBank
from unimoe.moe.gmm import tile_layout
from unimoe.nn.lora import LoRAConfig


def dense_reference(
    x_nd: jax.Array,
    weights_nk: jax.Array,
    experts_nk: jax.Array,
    expert_fn: Callable[[jax.Array], jax.Array],
    num_experts: int,
) -> jax.Array:
    """Slow oracle: every expert on every token, then pick each token's K outputs.

    Sentinel slots (ids outside [0, E)) pick zero.
    """
    dispatch.check_routing(x_nd, weights_nk, experts_nk)
    x_end = jnp.broadcast_to(x_nd[None], (num_experts, *x_nd.shape))
    y_end = expert_fn(x_end)
    routed_nk = (experts_nk >= 0) & (experts_nk < num_experts)
    y_nkd = y_end[jnp.where(routed_nk, experts_nk, 0), jnp.arange(x_nd.shape[0])[:, None]]
    y_nkd = jnp.where(routed_nk[..., None], y_nkd, 0)
    return dispatch.combine(y_nkd, weights_nk, x_nd.dtype)


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
        elif grouped_impl == "tiled_dispatch":
            y_nd = dropless_tiled_dispatch(x_nd, weights_nk, experts_nk, bank.gathered, 3, tile=4)
        else:
            # Tiles of 4 rows: no group size here is a multiple of it.
            grouped = functools.partial(bank.grouped, backend=grouped_impl, tile=4)
            y_nd = dropless_dispatch(x_nd, weights_nk, experts_nk, grouped, 3)
        return jnp.sum(y_nd * probe_nd)

    return nnx.value_and_grad(loss, argnums=(0, 1, 2))(bank, x_nd, weights_nk)


@pytest.mark.parametrize("grouped_impl", ("ragged_dot", "tiles", "tiled_dispatch"))
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
        # Id 3 is the sentinel (E = 3): those slots compute nothing.
        (3, (0, 1, 2, 3), 0),
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


def test_dropless_sentinel_slots_contribute_zero_but_keep_their_weight():
    x_nd = jnp.array([[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]])
    # E = 3: id 3 is the sentinel; token 1 routes nowhere.
    experts_nk = jnp.array([[2, 3], [3, 3], [0, 1]])
    weights_nk = jnp.array([[0.75, 0.25], [0.5, 0.5], [0.1, 0.9]])
    y_nd = dropless_dispatch(x_nd, weights_nk, experts_nk, scale_by_expert_id, 3)
    # 0.75 * 3 = 2.25 (the sentinel's 0.25 is not renormalised away); 0; 0.1*1 + 0.9*2 = 1.9.
    np.testing.assert_allclose(y_nd, [[2.25, 4.5], [0.0, 0.0], [0.95, 7.6]], rtol=1e-6)


def scale_gathered_by_expert_id(x_sd, source_tc, weight_tc, tile_expert_t):
    """Gathered twin of `scale_by_expert_id`: rows of expert e's tiles are multiplied by e + 1,
    weighted and added to their source row; padding rows (out-of-range source) are dropped, and
    so, here, are the sentinel tiles (expert E), as `ExpertBank.gathered` skips them."""
    num_experts = 3
    scale_tc = jnp.where(tile_expert_t < num_experts, tile_expert_t + 1, 0)[:, None] * weight_tc
    rows_pd = jnp.take(x_sd, source_tc.reshape(-1), axis=0, mode="fill", fill_value=0)
    rows_pd = rows_pd * scale_tc.reshape(-1, 1)
    return jnp.zeros_like(x_sd, jnp.float32).at[source_tc.reshape(-1)].add(rows_pd, mode="drop")


def test_dropless_tiled_sentinel_slots_contribute_zero_but_keep_their_weight():
    x_nd = jnp.array([[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]])
    experts_nk = jnp.array([[2, 3], [3, 3], [0, 1]])
    weights_nk = jnp.array([[0.75, 0.25], [0.5, 0.5], [0.1, 0.9]])
    y_nd = dropless_tiled_dispatch(x_nd, weights_nk, experts_nk, scale_gathered_by_expert_id, 3, 2)
    # As the sorted dispatch: sentinel slots land in no tile (the sentinel's 0.25 is not
    # renormalised away), and token 1 gets nothing.
    np.testing.assert_allclose(y_nd, [[2.25, 4.5], [0.0, 0.0], [0.95, 7.6]], rtol=1e-6)


def test_dispatch_rejects_mismatched_routing_shapes():
    x_nd, weights_nk, experts_nk = jnp.zeros((4, 5)), jnp.zeros((4, 2)), jnp.zeros((3, 2), int)
    with pytest.raises(ValueError, match="weights"):
        dropless_dispatch(x_nd, weights_nk, experts_nk, scale_by_expert_id, 3)


@pytest.mark.parametrize("num_experts", [5, 2**30])  # packed int32 keys; argsort (overflow)
def test_stable_expert_order_matches_a_stable_argsort_with_sentinels_last(num_experts):
    ids_m = np.array([3, 0, 5, 3, 1, 0, 3, 5, 2, 0, 4, 1], np.int32)  # 5 = sentinel for E=5
    order_m, rank_m = stable_expert_order(jnp.asarray(ids_m), num_experts)
    expected_order_m = np.array([1, 5, 9, 4, 11, 8, 0, 3, 6, 10, 2, 7])
    np.testing.assert_array_equal(order_m, expected_order_m)
    np.testing.assert_array_equal(order_m, np.argsort(ids_m, kind="stable"))
    np.testing.assert_array_equal(np.asarray(rank_m)[expected_order_m], np.arange(12))


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
    tiled = bank.grouped(x_md, group_sizes_e, backend="tiles", tile=4)
    ragged = bank.grouped(x_md, group_sizes_e, backend="ragged_dot")
    np.testing.assert_allclose(tiled, ragged, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(tiled[3:], 0.0)


def scale_batched(x_ecd: jax.Array) -> jax.Array:
    """Batched twin of `scale_by_expert_id`: expert e multiplies its rows by e + 1."""
    return x_ecd * (jnp.arange(x_ecd.shape[0]) + 1.0)[:, None, None]


def test_capacity_is_static_and_capped():
    assert capacity(7, 2, 3, 1.0, 0) == 5  # ceil(14 / 3)
    assert capacity(7, 2, 3, 1.0, 6) == 6  # min_capacity wins
    assert capacity(7, 2, 3, 4.0, 0) == 7  # never more than N
    with pytest.raises(ValueError, match="capacity_factor"):
        capacity(7, 2, 3, 0.0, 0)


@pytest.mark.parametrize(
    "policy, scores, y_row1, y_row3",
    [
        # Expert 0's queue in token order is t1, t2, t3 (t0 is padding): t1 keeps the one slot.
        ("position", None, [1.0, 1.0], [0.0, 0.0]),
        # By score t3 (0.9) beats t1 (0.6) and t2 (0.4).
        ("score", [[0.9, 0.1], [0.6, 0.0], [0.7, 0.4], [0.9, 0.0]], [0.0, 0.0], [2.0, 0.0]),
    ],
)
def test_capacity_drops_by_position_or_score_and_padding_takes_no_slot(
    policy, scores, y_row1, y_row3
):
    x_nd = jnp.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 0.0]])
    # E = 2, id 2 the sentinel; C = ceil(4 * 2 / 2 * 0.25) = 1 slot per expert.
    experts_nk = jnp.array([[0, 1], [0, 2], [1, 0], [0, 2]])
    weights_nk = jnp.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    mask_n = jnp.array([False, True, True, True])
    y_nd, dropped = capacity_dispatch(
        x_nd,
        weights_nk,
        experts_nk,
        scale_batched,
        2,
        capacity_factor=0.25,
        min_capacity=0,
        drop_policy=policy,
        token_mask_n=mask_n,
        scores_nk=None if scores is None else jnp.array(scores),
    )
    # 4 valid routed assignments (t1:e0, t2:e1, t2:e0, t3:e0); expert 0 keeps one of three.
    np.testing.assert_allclose(dropped, 0.5)
    # t0 is padding; t2 keeps e1 (0.5 * 2 * x) and loses e0.
    np.testing.assert_allclose(
        y_nd, [[0.0, 0.0], y_row1, [3.0, 3.0], y_row3], rtol=1e-6, err_msg=policy
    )


def capacity_oracle(experts_nk, mask_n, scores_nk, num_experts, cap, policy):
    """NumPy: walk the assignments in priority order, counting per expert; -> kept_nk."""
    num_tokens, top_k = experts_nk.shape
    flat = [(n, k) for n in range(num_tokens) for k in range(top_k)]
    if policy == "score":
        flat.sort(key=lambda nk: -scores_nk[nk])  # stable: ties keep token order
    counts = np.zeros(num_experts, int)
    kept_nk = np.zeros((num_tokens, top_k), bool)
    for n, k in flat:
        e = experts_nk[n, k]
        if mask_n[n] and e < num_experts and counts[e] < cap:
            counts[e] += 1
            kept_nk[n, k] = True
    return kept_nk


@nnx.jit(static_argnames=("policy", "cap_factor"))
def capacity_loss_and_grads(
    bank, x_nd, weights_nk, experts_nk, mask_n, scores_nk, probe_nd, policy, cap_factor
):
    def loss(bank, x_nd, weights_nk):
        y_nd, dropped = capacity_dispatch(
            x_nd,
            weights_nk,
            experts_nk,
            bank.batched,
            3,
            capacity_factor=cap_factor,
            min_capacity=2,
            drop_policy=policy,
            token_mask_n=mask_n,
            scores_nk=scores_nk,
        )
        return jnp.sum(y_nd * probe_nd), dropped

    return nnx.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(bank, x_nd, weights_nk)


@nnx.jit
def masked_oracle_loss_and_grads(bank, x_nd, weights_nk, experts_nk, kept_nk, probe_nd):
    """The dense oracle on the kept assignments only (dropped ones become sentinels)."""

    def loss(bank, x_nd, weights_nk):
        experts = jnp.where(kept_nk, experts_nk, 3)
        return jnp.sum(dense_reference(x_nd, weights_nk, experts, bank.batched, 3) * probe_nd)

    return nnx.value_and_grad(loss, argnums=(0, 1, 2))(bank, x_nd, weights_nk)


@pytest.mark.parametrize(
    "policy, top_k, choices, cap_factor",
    [
        # N = 11, k = 2 of E = 3: C = ceil(22 / 3 * 0.7) = 6, some experts overflow.
        ("position", 2, (0, 1, 2), 0.7),
        ("score", 2, (0, 1, 2), 0.7),
        # Sentinel slots (id 3) mixed in; C = max(ceil(33 / 3 * 0.3), 2) = 4.
        ("score", 3, (0, 1, 2, 3), 0.3),
        # Every token on expert 1: C = ceil(11 / 3 * 1.0) = 4 of its 9 valid tokens survive.
        ("position", 1, (1,), 1.0),
    ],
)
def test_capacity_matches_loop_oracle_values_and_gradients(policy, top_k, choices, cap_factor):
    weights_nk, experts_nk = random_routing(4, 11, top_k, choices)
    rng = np.random.default_rng(5)
    x_nd = jnp.asarray(rng.normal(size=(11, 5)), jnp.float32)
    probe_nd = jnp.asarray(rng.normal(size=(11, 5)), jnp.float32)
    mask_n = np.ones(11, bool)
    mask_n[[0, 6]] = False  # padding first: it must not take the slots of later tokens
    scores_nk = jnp.asarray(rng.uniform(size=experts_nk.shape), jnp.float32)
    cap = capacity(11, top_k, 3, cap_factor, 2)
    kept_nk = capacity_oracle(np.asarray(experts_nk), mask_n, np.asarray(scores_nk), 3, cap, policy)
    bank = make_bank(0)
    (value, dropped), grads = capacity_loss_and_grads(
        bank,
        x_nd,
        weights_nk,
        experts_nk,
        jnp.asarray(mask_n),
        scores_nk,
        probe_nd,
        policy=policy,
        cap_factor=cap_factor,
    )
    ref_value, ref_grads = masked_oracle_loss_and_grads(
        bank, x_nd, weights_nk, experts_nk, jnp.asarray(kept_nk), probe_nd
    )
    valid_nk = mask_n[:, None] & (np.asarray(experts_nk) < 3)
    np.testing.assert_allclose(dropped, 1.0 - kept_nk.sum() / valid_nk.sum(), rtol=1e-6)
    assert 0 < kept_nk.sum() < valid_nk.sum()  # the case really drops something
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_capacity_rejects_bad_policy_and_missing_scores():
    x_nd, weights_nk, experts_nk = jnp.zeros((4, 5)), jnp.zeros((4, 2)), jnp.zeros((4, 2), int)
    kwargs = dict(capacity_factor=1.0, min_capacity=0, token_mask_n=jnp.ones(4, bool))
    with pytest.raises(ValueError, match="drop_policy"):
        capacity_dispatch(
            x_nd, weights_nk, experts_nk, scale_batched, 3, drop_policy="random", **kwargs
        )
    with pytest.raises(ValueError, match="scores_nk"):
        capacity_dispatch(
            x_nd, weights_nk, experts_nk, scale_batched, 3, drop_policy="score", **kwargs
        )
