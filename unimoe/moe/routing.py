"""Routers and auxiliary losses, as pure functions of router logits.

Axis letters: N tokens (flattened B*T), E experts, K experts per token. All router math runs in
float32 whatever the activation dtype, because top-k choices and softmax weights are sensitive to
rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_k(logits_ne: jax.Array, k: int) -> None:
    if logits_ne.ndim != 2:
        raise ValueError(f"router logits must be [N, E], got shape {logits_ne.shape}")
    if not 1 <= k <= logits_ne.shape[-1]:
        raise ValueError(f"top_k must be in [1, {logits_ne.shape[-1]}] (num_experts), got {k}")


def route_topk_softmax(logits_ne: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k of the logits, then softmax over the k chosen logits (Uni-MoE 4E, Mixtral).

    Returns (weights_nk float32 summing to 1 per token, experts_nk int32), best expert first.
    """
    _check_k(logits_ne, k)
    top_logits_nk, experts_nk = jax.lax.top_k(logits_ne.astype(jnp.float32), k)
    return jax.nn.softmax(top_logits_nk, axis=-1), experts_nk.astype(jnp.int32)


def route_softmax_topk(
    logits_ne: jax.Array, k: int, renormalize: bool
) -> tuple[jax.Array, jax.Array]:
    """Softmax over all E, then top-k (Switch, Uni-MoE 8E, Qwen2-MoE).

    With `renormalize` the k probabilities are rescaled to sum to 1 (Uni-MoE 8E); without it they
    keep their share of the full softmax (Switch, Qwen2-MoE's `norm_topk_prob=False`).
    """
    _check_k(logits_ne, k)
    probs_ne = jax.nn.softmax(logits_ne.astype(jnp.float32), axis=-1)
    weights_nk, experts_nk = jax.lax.top_k(probs_ne, k)
    if renormalize:
        weights_nk = weights_nk / jnp.sum(weights_nk, axis=-1, keepdims=True)
    return weights_nk, experts_nk.astype(jnp.int32)


def _valid_count(token_mask_n: jax.Array) -> jax.Array:
    # A batch of padding only would divide by zero; its losses are then 0.
    return jnp.maximum(jnp.sum(token_mask_n.astype(jnp.float32)), 1.0)


def expert_load(experts_nk: jax.Array, token_mask_n: jax.Array, num_experts: int) -> jax.Array:
    """float32[E]: fraction of the valid tokens' N*K assignments that went to each expert."""
    valid_n = token_mask_n.astype(jnp.float32)
    onehot_nke = jax.nn.one_hot(experts_nk, num_experts, dtype=jnp.float32)
    counts_e = jnp.einsum("nke,n->e", onehot_nke, valid_n)
    return counts_e / (_valid_count(token_mask_n) * experts_nk.shape[-1])


def balance_loss(probs_ne: jax.Array, experts_nk: jax.Array, token_mask_n: jax.Array) -> jax.Array:
    """Switch load-balancing loss E * sum_e f_e * P_e, equal to 1.0 under uniform routing.

    f_e is `expert_load` (no gradient flows through it: it counts choices); P_e is the mean router
    probability of expert e over valid tokens, which carries the gradient to the router.
    """
    num_experts = probs_ne.shape[-1]
    valid_n = token_mask_n.astype(jnp.float32)
    load_e = expert_load(experts_nk, token_mask_n, num_experts)
    mean_prob_e = jnp.einsum("ne,n->e", probs_ne.astype(jnp.float32), valid_n) / _valid_count(
        token_mask_n
    )
    return num_experts * jnp.sum(load_e * mean_prob_e)


def z_loss(logits_ne: jax.Array, token_mask_n: jax.Array) -> jax.Array:
    """ST-MoE router z-loss: mean over valid tokens of logsumexp(logits)^2."""
    lse_n = jax.nn.logsumexp(logits_ne.astype(jnp.float32), axis=-1)
    valid_n = token_mask_n.astype(jnp.float32)
    return jnp.sum(lse_n**2 * valid_n) / _valid_count(token_mask_n)
