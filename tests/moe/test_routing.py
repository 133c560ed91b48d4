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
