"""Routers and auxiliary losses on hand-made routings with hand-computed expected values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimoe.moe import routing


def test_topk_softmax_softmaxes_the_chosen_logits():
    logits_ne = jnp.array([[1.0, 3.0, 2.0], [math.log(3.0), 0.0, -5.0]])
    weights_nk, experts_nk = routing.route_topk_softmax(logits_ne, 2)
    # Token 0: softmax([3, 2]) = [e, 1] / (e + 1); token 1: softmax([ln 3, 0]) = [3, 1] / 4.
    np.testing.assert_array_equal(experts_nk, [[1, 2], [0, 1]])
    np.testing.assert_allclose(weights_nk, [[0.7310586, 0.2689414], [0.75, 0.25]], rtol=1e-6)
    assert weights_nk.dtype == jnp.float32 and experts_nk.dtype == jnp.int32


def test_topk_softmax_runs_in_float32_for_bfloat16_logits():
    weights_nk, _ = routing.route_topk_softmax(jnp.array([[0.0, math.log(3.0)]], jnp.bfloat16), 2)
    assert weights_nk.dtype == jnp.float32


def test_softmax_topk_with_and_without_renormalization():
    # Token 0: probs [1, 2, 5] / 8; token 1: probs [4, 4, 2] / 10 (tie goes to the lower index).
    logits_ne = jnp.log(jnp.array([[1.0, 2.0, 5.0], [4.0, 4.0, 2.0]]))
    weights_nk, experts_nk = routing.route_softmax_topk(logits_ne, 2, renormalize=False)
    np.testing.assert_array_equal(experts_nk, [[2, 1], [0, 1]])
    np.testing.assert_allclose(weights_nk, [[0.625, 0.25], [0.4, 0.4]], rtol=1e-6)
    weights_nk, experts_nk = routing.route_softmax_topk(logits_ne, 2, renormalize=True)
    np.testing.assert_array_equal(experts_nk, [[2, 1], [0, 1]])
    np.testing.assert_allclose(weights_nk, [[5 / 7, 2 / 7], [0.5, 0.5]], rtol=1e-6)


@pytest.mark.parametrize("k", [0, 4])
def test_routers_reject_k_outside_one_to_num_experts(k):
    with pytest.raises(ValueError, match="top_k"):
        routing.route_topk_softmax(jnp.zeros((2, 3)), k)
    with pytest.raises(ValueError, match="top_k"):
        routing.route_softmax_topk(jnp.zeros((2, 3)), k, renormalize=True)


PROBS_NE = jnp.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])


def test_balance_loss_top1_all_tokens_valid():
    # f = [2/3, 1/3, 0], P = [0.8, 1.1, 1.1] / 3 -> 3 * (1.6 + 1.1) / 9 = 0.9.
    loss = routing.balance_loss(PROBS_NE, jnp.array([[0], [1], [0]]), jnp.ones(3, bool))
    np.testing.assert_allclose(loss, 0.9, rtol=1e-6)


def test_balance_loss_skips_padding_tokens():
    # Tokens 0, 1 valid: f = [1/2, 1/2, 0], P = [0.3, 0.45, 0.25] -> 3 * (0.15 + 0.225) = 1.125.
    mask_n = jnp.array([True, True, False])
    loss = routing.balance_loss(PROBS_NE, jnp.array([[0], [1], [0]]), mask_n)
    np.testing.assert_allclose(loss, 1.125, rtol=1e-6)


def test_balance_loss_is_one_under_uniform_top2_routing():
    loss = routing.balance_loss(PROBS_NE, jnp.array([[0, 1], [1, 2], [2, 0]]), jnp.ones(3, bool))
    np.testing.assert_allclose(loss, 1.0, rtol=1e-6)


def test_balance_loss_gradient_reaches_only_through_probabilities():
    experts_nk = jnp.array([[0], [1], [0]])
    grad_ne = jax.grad(routing.balance_loss)(PROBS_NE, experts_nk, jnp.ones(3, bool))
    # d/dP_ne of E * sum_e f_e * mean_n P_ne = E * f_e / N = [2/3, 1/3, 0] for every token.
    np.testing.assert_allclose(grad_ne, np.tile([2 / 3, 1 / 3, 0.0], (3, 1)), rtol=1e-6)


def test_expert_load_counts_valid_assignments():
    experts_nk = jnp.array([[0, 1], [1, 2], [1, 0]])
    load_e = routing.expert_load(experts_nk, jnp.array([True, True, False]), 3)
    np.testing.assert_allclose(load_e, [0.25, 0.5, 0.25], rtol=1e-6)
    assert load_e.dtype == jnp.float32


def test_z_loss_is_mean_squared_logsumexp_over_valid_tokens():
    # logsumexp: ln 2 and ln 4; squares 0.48045301 and 1.92181206.
    logits_ne = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])
    np.testing.assert_allclose(routing.z_loss(logits_ne, jnp.ones(2, bool)), 1.20113253, rtol=1e-6)
    np.testing.assert_allclose(
        routing.z_loss(logits_ne, jnp.array([True, False])), 0.48045301, rtol=1e-6
    )


def test_losses_are_zero_for_a_batch_of_padding_only():
    mask_n = jnp.zeros(3, bool)
    assert routing.balance_loss(PROBS_NE, jnp.array([[0], [1], [0]]), mask_n) == 0.0
    assert routing.z_loss(jnp.log(PROBS_NE), mask_n) == 0.0


def test_expert_load_and_balance_loss_ignore_sentinel_and_out_of_range_ids():
    # Id 3 = E (sentinel) and -1 count nowhere: 2 routed assignments, one to expert 0, one to 1.
    experts_nk = jnp.array([[0, 3], [1, -1], [2, 3]])
    mask_n = jnp.array([True, True, False])
    np.testing.assert_allclose(routing.expert_load(experts_nk, mask_n, 3), [0.5, 0.5, 0.0])
    # f = [1/2, 1/2, 0], P = [0.3, 0.45, 0.25] over tokens 0, 1 -> 3 * (0.15 + 0.225) = 1.125.
    loss = routing.balance_loss(PROBS_NE, experts_nk, mask_n)
    np.testing.assert_allclose(loss, 1.125, rtol=1e-6)


def test_balance_loss_carries_gradient_to_the_logits():
    # Both tokens pick expert 0 of 2: f = [1, 0], L = 2 * mean_n p_n0 and p = [1/2, 1/2], so
    # dL/dlogit_n0 = 2 / 2 * p0 * (1 - p0) = 0.25 and dL/dlogit_n1 = -0.25.
    def loss_fn(logits_ne):
        probs_ne = jax.nn.softmax(logits_ne, axis=-1)
        return routing.balance_loss(probs_ne, jnp.array([[0], [0]]), jnp.ones(2, bool))

    grad_ne = jax.grad(loss_fn)(jnp.zeros((2, 2)))
    np.testing.assert_allclose(grad_ne, [[0.25, -0.25], [0.25, -0.25]], rtol=1e-6)


def test_gumbel_routing_keeps_the_argmax_first_and_the_softmax_weights():
    # Token 0: probs [3, 1, ~0] / 4, e^-200 is far beyond any Gumbel gap, so the second is 1.
    # Token 1: probs [0.5, 0.3, 0.2]; the second is sampled from {1, 2}.
    logits_ne = jnp.array(
        [[math.log(3.0), 0.0, -200.0], [math.log(0.5), math.log(0.3), math.log(0.2)]]
    )
    key = jax.random.key(0)
    weights_nk, experts_nk = routing.route_softmax_topk_gumbel(logits_ne, 2, False, key)
    assert experts_nk.dtype == jnp.int32
    np.testing.assert_array_equal(experts_nk[0], [0, 1])
    np.testing.assert_allclose(weights_nk[0], [0.75, 0.25], rtol=1e-6)
    assert experts_nk[1, 0] == 0 and int(experts_nk[1, 1]) in (1, 2)
    np.testing.assert_allclose(weights_nk[1, 1], 0.3 if experts_nk[1, 1] == 1 else 0.2, rtol=1e-6)
    weights_nk, _ = routing.route_softmax_topk_gumbel(logits_ne, 2, True, key)
    second = 0.5 / 0.8 if experts_nk[1, 1] == 1 else 0.5 / 0.7
    np.testing.assert_allclose(weights_nk[:, 0], [0.75, second], rtol=1e-6)
    weights_nk, experts_nk = routing.route_softmax_topk_gumbel(logits_ne, 1, False, key)
    np.testing.assert_array_equal(experts_nk, [[0], [0]])
    np.testing.assert_allclose(weights_nk, [[0.75], [0.5]], rtol=1e-6)


def test_gumbel_second_choice_never_repeats_is_seeded_and_follows_the_softmax():
    # 2000 copies of probs [0.5, 0.3, 0.2]: without replacement P(second = 1) = 0.3 / 0.5 = 0.6.
    logits_ne = jnp.tile(jnp.log(jnp.array([0.5, 0.3, 0.2])), (2000, 1))
    _, experts_nk = routing.route_softmax_topk_gumbel(logits_ne, 3, True, jax.random.key(1))
    _, again_nk = routing.route_softmax_topk_gumbel(logits_ne, 3, True, jax.random.key(1))
    _, other_nk = routing.route_softmax_topk_gumbel(logits_ne, 3, True, jax.random.key(2))
    np.testing.assert_array_equal(experts_nk, again_nk)
    assert not np.array_equal(experts_nk, other_nk)
    np.testing.assert_array_equal(np.sort(experts_nk, axis=-1), np.tile([0, 1, 2], (2000, 1)))
    assert abs(float(jnp.mean(experts_nk[:, 1] == 1)) - 0.6) < 0.05


# Token 0 sorted probs [0.5, 0.3, 0.15, 0.05] (experts 0-3), cumsum [0.5, 0.8, 0.95, 1];
# token 1 sorted [0.72, 0.16, 0.10, 0.02] (experts 2, 1, 3, 0), cumsum [0.72, 0.88, 0.98, 1].
TOP_P_LOGITS_NE = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.02, 0.16, 0.72, 0.10]]))


@pytest.mark.parametrize(
    "top_p, k_n, weights_nk, experts_nk",
    [
        # 0.5 alone exceeds 0.4 -> k = 1 for both tokens, unused slots get the sentinel 4.
        (0.4, [1, 1], [[1, 0, 0], [1, 0, 0]], [[0, 4, 4], [2, 4, 4]]),
        # 0.5 < 0.7 -> k = 2 for token 0: [0.5, 0.3] / 0.8; token 1 still 1 (0.72 >= 0.7).
        (0.7, [2, 1], [[0.625, 0.375, 0], [1, 0, 0]], [[0, 1, 4], [2, 4, 4]]),
        # 0.5, 0.8 < 0.9 -> k = 3: [0.5, 0.3, 0.15] / 0.95 and [0.72, 0.16, 0.10] / 0.98.
        (
            0.9,
            [3, 3],
            [[0.5263158, 0.3157895, 0.1578947], [0.7346939, 0.1632653, 0.1020408]],
            [[0, 1, 2], [2, 1, 3]],
        ),
        # Four cumsums below 0.99 would give k = 4, capped by k_max = 3.
        (
            0.99,
            [3, 3],
            [[0.5263158, 0.3157895, 0.1578947], [0.7346939, 0.1632653, 0.1020408]],
            [[0, 1, 2], [2, 1, 3]],
        ),
    ],
)
def test_top_p_routing_picks_k_per_token(top_p, k_n, weights_nk, experts_nk):
    got_w, got_e, got_k = routing.route_top_p(TOP_P_LOGITS_NE, top_p, k_max=3)
    np.testing.assert_array_equal(got_k, k_n)
    np.testing.assert_array_equal(got_e, experts_nk)
    np.testing.assert_allclose(got_w, weights_nk, rtol=1e-5, atol=1e-7)
    assert got_e.dtype == jnp.int32 and got_k.dtype == jnp.int32


def test_top_p_rejects_bad_arguments():
    with pytest.raises(ValueError, match="top_p"):
        routing.route_top_p(TOP_P_LOGITS_NE, 0.0, k_max=2)
    with pytest.raises(ValueError, match="top_k"):
        routing.route_top_p(TOP_P_LOGITS_NE, 0.5, k_max=5)


# sigmoid: 0 -> 0.5, ln 3 -> 0.75, -ln 3 -> 0.25.
SIGMOID_LOGITS_NE = jnp.array([[0.0, math.log(3.0), -math.log(3.0)]])


def test_sigmoid_routing_weights_are_the_scores():
    bias_e = jnp.zeros(3)
    weights_nk, experts_nk = routing.route_sigmoid_bias(SIGMOID_LOGITS_NE, bias_e, 2)
    np.testing.assert_array_equal(experts_nk, [[1, 0]])
    np.testing.assert_allclose(weights_nk, [[0.6, 0.4]], rtol=1e-6)  # [0.75, 0.5] / 1.25
    weights_nk, _ = routing.route_sigmoid_bias(
        SIGMOID_LOGITS_NE, bias_e, 2, renormalize=False, scaling=2.0
    )
    np.testing.assert_allclose(weights_nk, [[1.5, 1.0]], rtol=1e-6)


def test_sigmoid_bias_changes_the_choice_but_not_the_weights_nor_gets_gradient():
    # Biased scores [0.5, 0.75, 0.85]: expert 2 now beats 0; weights [0.25, 0.75] / 1.0.
    bias_e = jnp.array([0.0, 0.0, 0.6])
    weights_nk, experts_nk = routing.route_sigmoid_bias(SIGMOID_LOGITS_NE, bias_e, 2)
    np.testing.assert_array_equal(experts_nk, [[2, 1]])
    np.testing.assert_allclose(weights_nk, [[0.25, 0.75]], rtol=1e-6)

    def weighted_sum(logits_ne, bias_e):
        weights_nk, _ = routing.route_sigmoid_bias(logits_ne, bias_e, 2, renormalize=False)
        return jnp.sum(weights_nk * jnp.array([1.0, 2.0]))

    grad_logits_ne, grad_bias_e = jax.grad(weighted_sum, argnums=(0, 1))(SIGMOID_LOGITS_NE, bias_e)
    np.testing.assert_array_equal(grad_bias_e, [0.0, 0.0, 0.0])
    # d sigmoid = s (1 - s): expert 2 (slot 0): 0.25 * 0.75; expert 1 (slot 1): 2 * 0.75 * 0.25.
    np.testing.assert_allclose(grad_logits_ne, [[0.0, 0.375, 0.1875]], rtol=1e-6)


def test_sigmoid_routing_respects_a_mask_and_checks_the_bias_shape():
    mask_ne = jnp.array([[True, False, True]])
    weights_nk, experts_nk = routing.route_sigmoid_bias(
        SIGMOID_LOGITS_NE, jnp.zeros(3), 2, mask_ne=mask_ne
    )
    np.testing.assert_array_equal(experts_nk, [[0, 2]])
    np.testing.assert_allclose(weights_nk, [[2 / 3, 1 / 3]], rtol=1e-6)  # [0.5, 0.25] / 0.75
    with pytest.raises(ValueError, match="bias_e"):
        routing.route_sigmoid_bias(SIGMOID_LOGITS_NE, jnp.zeros(4), 2)


def test_group_limited_mask_scores_groups_by_their_top_two():
    scores_ne = jnp.array(
        [
            [0.9, 0.1, 0.5, 0.4, 0.3, 0.3],  # group sums [1.0, 0.9, 0.6]
            [0.95, 0.0, 0.6, 0.5, 0.0, 0.0],  # [0.95, 1.1, 0]: group 1 wins though 0.95 is max
        ]
    )
    np.testing.assert_array_equal(
        routing.group_limited_mask(scores_ne, num_groups=3, top_groups=1),
        [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]],
    )
    np.testing.assert_array_equal(
        routing.group_limited_mask(scores_ne, num_groups=3, top_groups=2),
        [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]],
    )
    # Groups of 3: [0.9, 0, 0 | 0.5, 0.5, 0.1] -> top-2 sums 0.9 and 1.0.
    np.testing.assert_array_equal(
        routing.group_limited_mask(jnp.array([[0.9, 0.0, 0.0, 0.5, 0.5, 0.1]]), 2, 1),
        [[0, 0, 0, 1, 1, 1]],
    )
    with pytest.raises(ValueError, match="num_groups"):
        routing.group_limited_mask(scores_ne, num_groups=4, top_groups=1)
    with pytest.raises(ValueError, match="top_groups"):
        routing.group_limited_mask(scores_ne, num_groups=3, top_groups=4)


def test_group_equal_routing_takes_the_same_number_from_every_group():
    # probs [0.35, 0.3, 0.2 | 0.05, 0.06, 0.04]: global top-4 would take three from group 0;
    # MoGE takes experts 0, 1 from group 0 and 4, 3 from group 1.
    logits_ne = jnp.log(jnp.array([[0.35, 0.3, 0.2, 0.05, 0.06, 0.04]]))
    weights_nk, experts_nk = routing.route_group_equal(logits_ne, 2, 4, renormalize=False)
    np.testing.assert_array_equal(experts_nk, [[0, 1, 4, 3]])
    np.testing.assert_allclose(weights_nk, [[0.35, 0.3, 0.06, 0.05]], rtol=1e-5)
    weights_nk, _ = routing.route_group_equal(logits_ne, 2, 4, renormalize=True)
    np.testing.assert_allclose(
        weights_nk, [[0.4605263, 0.3947368, 0.0789474, 0.0657895]], rtol=1e-5
    )  # / 0.76
    with pytest.raises(ValueError, match="top_k"):
        routing.route_group_equal(logits_ne, 2, 3, renormalize=True)
    with pytest.raises(ValueError, match="num_groups"):
        routing.route_group_equal(logits_ne, 4, 4, renormalize=True)


def test_jitter_stays_within_bounds_and_is_seeded():
    x_nd = jnp.full((7, 5), 2.0)
    y_nd = routing.jitter(x_nd, 0.1, jax.random.key(0))
    assert jnp.all((y_nd >= 1.8) & (y_nd <= 2.2)) and not jnp.all(y_nd == 2.0)
    np.testing.assert_array_equal(y_nd, routing.jitter(x_nd, 0.1, jax.random.key(0)))
    assert routing.jitter(x_nd, 0.0, jax.random.key(0)) is x_nd
    assert routing.jitter(x_nd.astype(jnp.bfloat16), 0.1, jax.random.key(0)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="eps"):
        routing.jitter(x_nd, -0.1, jax.random.key(0))


def test_bias_update_raises_underloaded_and_lowers_overloaded_experts():
    # mean load 0.25: expert 0 over (-rate), 1 and 2 at the mean (0), 3 under (+rate).
    new_e = routing.bias_update(jnp.zeros(4), jnp.array([0.5, 0.25, 0.25, 0.0]), 0.01)
    np.testing.assert_allclose(new_e, [-0.01, 0.0, 0.0, 0.01], rtol=1e-6)


def test_bias_updates_balance_a_skewed_sigmoid_router():
    # 12 tokens that all prefer expert 0; a few selection-only bias steps spread them out.
    logits_ne = jnp.asarray(np.random.default_rng(0).normal(size=(12, 4)) + [2.0, 0.0, 0.0, 0.0])
    mask_n = jnp.ones(12, bool)
    bias_e = jnp.zeros(4)
    _, experts_nk = routing.route_sigmoid_bias(logits_ne, bias_e, 1)
    first_load_e = routing.expert_load(experts_nk, mask_n, 4)
    for _ in range(20):
        _, experts_nk = routing.route_sigmoid_bias(logits_ne, bias_e, 1)
        bias_e = routing.bias_update(bias_e, routing.expert_load(experts_nk, mask_n, 4), 0.05)
    last_load_e = routing.expert_load(experts_nk, mask_n, 4)
    assert first_load_e[0] > 0.5 and last_load_e.max() < first_load_e.max()


# Dynamic experts 0, 1 (routed) and 2 (null); id 3 is the sentinel. Token weights: prompt 1,
# answer 10, padding 0.
DCMOE_LOGITS_NE = jnp.array(
    [[0.0, 0.0, 5.0], [math.log(3.0), 0.0, 0.0], [7.0, math.log(3.0), 0.0], [1.0, 2.0, 3.0]]
)
DCMOE_EXPERTS_NK = jnp.array([[0, 1], [0, 3], [1, 2], [0, 1]])
DCMOE_WEIGHT_N = jnp.array([1.0, 10.0, 1.0, 0.0])


def test_dcmoe_balance_loss_restricts_the_softmax_and_weights_tokens():
    # Restricted softmax rows: [.5, .5, 0], [1, 0, 0] (sentinel selects nothing), [0, .75, .25].
    # Sum of weights 12; f = [11, 2, 1] / 12, P = [10.5, 1.25, 0.25] / 12;
    # L = 3 * (11 * 10.5 + 2 * 1.25 + 1 * 0.25) / 144 = 354.75 / 144.
    loss = routing.balance_loss_dcmoe(DCMOE_LOGITS_NE, DCMOE_EXPERTS_NK, DCMOE_WEIGHT_N)
    np.testing.assert_allclose(loss, 354.75 / 144, rtol=1e-6)
    zero = routing.balance_loss_dcmoe(DCMOE_LOGITS_NE, DCMOE_EXPERTS_NK, jnp.zeros(4))
    assert zero == 0.0


def test_dcmoe_balance_loss_gradient_flows_through_the_selected_logits_only():
    grad_ne = jax.grad(routing.balance_loss_dcmoe)(
        DCMOE_LOGITS_NE, DCMOE_EXPERTS_NK, DCMOE_WEIGHT_N
    )
    # Token 0, p = [.5, .5]: dL/dl_0 = 3/12 * p0 p1 * (f_0 - f_1) = 0.25 * 0.25 * 9/12.
    # Token 1 has one selected expert (p = 1, constant); token 3 is padding.
    # Token 2, p = [.75, .25] over {1, 2}: dL/dl_1 = 0.25 * 0.1875 * (f_1 - f_2) = 0.25 * 0.1875 / 12.
    expected_ne = [
        [0.046875, -0.046875, 0.0],
        [0.0, 0.0, 0.0],
        [0.0, 0.00390625, -0.00390625],
        [0.0, 0.0, 0.0],
    ]
    np.testing.assert_allclose(grad_ne, expected_ne, rtol=1e-5, atol=1e-8)
    assert np.all(np.isfinite(grad_ne))


def test_router_entropy_is_log_e_when_uniform_and_skips_padding():
    probs_ne = jnp.array([[0.25] * 4, [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    np.testing.assert_allclose(
        routing.router_entropy(probs_ne[:1], jnp.ones(1, bool)), math.log(4.0), rtol=1e-6
    )
    # (ln 4 + 0) / 2; the padding token's ln 2 is left out.
    entropy = routing.router_entropy(probs_ne, jnp.array([True, True, False]))
    np.testing.assert_allclose(entropy, math.log(4.0) / 2, rtol=1e-6)


def test_aux_weight_is_constant_or_annealed_linearly():
    assert routing.aux_weight(1000, start=0.01) == pytest.approx(0.01)
    anneal = jax.jit(lambda step: routing.aux_weight(step, start=0.025, end=0.001, decay_steps=100))
    # 0.025 + (0.001 - 0.025) * step / 100, held at 0.001 after step 100.
    for step, expected in [(0, 0.025), (50, 0.013), (100, 0.001), (250, 0.001)]:
        np.testing.assert_allclose(anneal(step), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="decay_steps"):
        routing.aux_weight(0, start=0.025, end=0.001)
