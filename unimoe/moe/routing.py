"""Routers and auxiliary losses, as pure functions of router logits.

Axis letters: N tokens (flattened B*T), E experts, K experts per token (slots), G expert groups.
All router math runs in float32 whatever the activation dtype, because top-k choices and softmax
weights are sensitive to rounding.

Sentinel slots: a slot that computes nothing carries the expert id E (one past the last expert it
could name) and weight 0 (unused top-P slots) or its own weight (null experts, remapped by the
layer). One-hot counts of an out-of-range id are all zero, so the loads and losses here count
sentinel slots nowhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_logits(logits_ne: jax.Array) -> None:
    if logits_ne.ndim != 2:
        raise ValueError(f"router logits must be [N, E], got shape {logits_ne.shape}")


def _check_k(logits_ne: jax.Array, k: int) -> None:
    _check_logits(logits_ne)
    if not 1 <= k <= logits_ne.shape[-1]:
        raise ValueError(f"top_k must be in [1, {logits_ne.shape[-1]}] (num_experts), got {k}")


def _normalize(weights_nk: jax.Array) -> jax.Array:
    # The floor keeps a row of zero weights (every pick scored 0) at 0 instead of NaN.
    return weights_nk / jnp.maximum(jnp.sum(weights_nk, axis=-1, keepdims=True), 1e-20)


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


def route_softmax_topk_gumbel(
    logits_ne: jax.Array, k: int, renormalize: bool, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Softmax over all E; first choice its argmax, later choices sampled (Uni-MoE 8E, DeepSpeed).

    DeepSpeed's "second expert sampling": choices 2..k are the top-(k-1) of logits + Gumbel noise
    with the first choice masked out, i.e. sampled without replacement from the softmax over the
    remaining experts (the Gumbel-top-k trick, one noise draw per token). Weights are the chosen
    experts' full-softmax probabilities, renormalized to sum 1 when `renormalize`; the gradient
    reaches the logits through them, not through the (sampled) choice.
    """
    _check_k(logits_ne, k)
    logits_ne = logits_ne.astype(jnp.float32)
    probs_ne = jax.nn.softmax(logits_ne, axis=-1)
    first_n = jnp.argmax(probs_ne, axis=-1).astype(jnp.int32)
    experts_nk = first_n[:, None]
    if k > 1:
        noise_ne = jax.random.gumbel(key, logits_ne.shape, jnp.float32)
        first_ne = jax.nn.one_hot(first_n, logits_ne.shape[-1], dtype=bool)
        noisy_ne = jnp.where(first_ne, -jnp.inf, jax.lax.stop_gradient(logits_ne) + noise_ne)
        _, rest_nk = jax.lax.top_k(noisy_ne, k - 1)
        experts_nk = jnp.concatenate([experts_nk, rest_nk.astype(jnp.int32)], axis=-1)
    weights_nk = jnp.take_along_axis(probs_ne, experts_nk, axis=-1)
    if renormalize:
        weights_nk = _normalize(weights_nk)
    return weights_nk, experts_nk


def route_top_p(
    logits_ne: jax.Array, top_p: float, k_max: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-P dynamic routing (DCMoE / UniMoE-Audio) with static shapes.

    `logits_ne` covers every dynamic expert E_d (routed, then null). probs = softmax over E_d,
    sorted descending; a token uses k_n = min(k_max, 1 + #{j : cumsum_j < top_p}) experts, so a
    confident token uses one and an unsure one up to k_max. Returns (weights_nk, experts_nk, k_n)
    with K = k_max: the first k_n slots hold the best experts, weights = their probs renormalized
    to sum 1; slots j >= k_n have weight 0 and the sentinel id E_d. Null ids (>= the routed count)
    are left for the caller to remap to its own sentinel.
    """
    _check_k(logits_ne, k_max)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    num_experts = logits_ne.shape[-1]
    probs_ne = jax.nn.softmax(logits_ne.astype(jnp.float32), axis=-1)
    sorted_ne, order_ne = jax.lax.top_k(probs_ne, num_experts)
    # The cumsum only decides how many slots to keep; no gradient flows through a count.
    below_n = jnp.sum(jnp.cumsum(jax.lax.stop_gradient(sorted_ne), axis=-1) < top_p, axis=-1)
    k_n = jnp.minimum(1 + below_n, k_max).astype(jnp.int32)
    used_nk = jnp.arange(k_max)[None, :] < k_n[:, None]
    weights_nk = _normalize(jnp.where(used_nk, sorted_ne[:, :k_max], 0.0))
    experts_nk = jnp.where(used_nk, order_ne[:, :k_max], num_experts).astype(jnp.int32)
    return weights_nk, experts_nk, k_n


def route_sigmoid_bias(
    logits_ne: jax.Array,
    bias_e: jax.Array,
    k: int,
    *,
    renormalize: bool = True,
    scaling: float = 1.0,
    mask_ne: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sigmoid scores with a selection-only bias (DeepSeek-V3 auxiliary-loss-free balancing).

    scores = sigmoid(logits); the top-k of scores + bias_e are chosen, but the weights are the
    unbiased scores of the chosen experts (renormalized to sum 1 when `renormalize`) times
    `scaling` (DeepSeek's routed_scaling_factor). The bias gets no gradient: it is moved by
    `bias_update` from the observed load, outside the optimizer. `mask_ne` (e.g. from
    `group_limited_mask(scores + bias, ...)`) marks the experts a token may choose.
    """
    _check_k(logits_ne, k)
    num_experts = logits_ne.shape[-1]
    if bias_e.shape != (num_experts,):
        raise ValueError(f"bias_e must be [E]={(num_experts,)}, got shape {bias_e.shape}")
    scores_ne = jax.nn.sigmoid(logits_ne.astype(jnp.float32))
    choice_ne = jax.lax.stop_gradient(scores_ne + bias_e.astype(jnp.float32)[None, :])
    if mask_ne is not None:
        if mask_ne.shape != logits_ne.shape:
            raise ValueError(f"mask_ne must be {logits_ne.shape}, got shape {mask_ne.shape}")
        choice_ne = jnp.where(mask_ne, choice_ne, -jnp.inf)
    _, experts_nk = jax.lax.top_k(choice_ne, k)
    weights_nk = jnp.take_along_axis(scores_ne, experts_nk, axis=-1)
    if renormalize:
        weights_nk = _normalize(weights_nk)
    return weights_nk * scaling, experts_nk.astype(jnp.int32)


def _check_groups(num_experts: int, num_groups: int) -> None:
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(
            f"num_groups must be >= 1 and divide num_experts={num_experts}, got {num_groups}"
        )


def group_limited_mask(scores_ne: jax.Array, num_groups: int, top_groups: int) -> jax.Array:
    """bool[N, E]: experts of each token's `top_groups` best groups (DeepSeek group-limited).

    Experts are split into `num_groups` equal contiguous groups; a group's score is the sum of its
    two best expert scores (its only score for groups of one expert), as in DeepSeek-V3.
    """
    _check_logits(scores_ne)
    num_tokens, num_experts = scores_ne.shape
    _check_groups(num_experts, num_groups)
    if not 1 <= top_groups <= num_groups:
        raise ValueError(f"top_groups must be in [1, num_groups={num_groups}], got {top_groups}")
    group_size = num_experts // num_groups
    scores_ngs = scores_ne.astype(jnp.float32).reshape(num_tokens, num_groups, group_size)
    group_scores_ng = jnp.sum(jax.lax.top_k(scores_ngs, min(2, group_size))[0], axis=-1)
    _, groups_nt = jax.lax.top_k(group_scores_ng, top_groups)
    keep_ng = jnp.sum(jax.nn.one_hot(groups_nt, num_groups, dtype=jnp.int32), axis=1) > 0
    return jnp.repeat(keep_ng, group_size, axis=-1)


def route_group_equal(
    logits_ne: jax.Array, num_groups: int, k: int, renormalize: bool
) -> tuple[jax.Array, jax.Array]:
    """Mixture of Grouped Experts (Pangu Pro MoE): equal picks in every expert group.

    Softmax over all E, then the top-(k/G) experts inside each of the G equal contiguous groups,
    so every group (e.g. every device) gets the same number of assignments. Slots are ordered
    group by group, best first inside a group. Weights are the full-softmax probabilities,
    renormalized to sum 1 when `renormalize`.
    """
    _check_k(logits_ne, k)
    num_tokens, num_experts = logits_ne.shape
    _check_groups(num_experts, num_groups)
    if k % num_groups:
        raise ValueError(f"top_k must be a multiple of num_groups={num_groups}, got {k}")
    group_size, per_group = num_experts // num_groups, k // num_groups
    probs_ngs = jax.nn.softmax(logits_ne.astype(jnp.float32), axis=-1).reshape(
        num_tokens, num_groups, group_size
    )
    weights_ngk, local_ngk = jax.lax.top_k(probs_ngs, per_group)
    experts_ngk = local_ngk + (jnp.arange(num_groups) * group_size)[None, :, None]
    weights_nk = weights_ngk.reshape(num_tokens, k)
    if renormalize:
        weights_nk = _normalize(weights_nk)
    return weights_nk, experts_ngk.reshape(num_tokens, k).astype(jnp.int32)


def jitter(x: jax.Array, eps: float, key: jax.Array) -> jax.Array:
    """Router input jitter (DCMoE, MegaBlocks): x times uniform noise in [1 - eps, 1 + eps]."""
    if eps < 0:
        raise ValueError(f"jitter eps must be >= 0, got {eps}")
    if eps == 0:
        return x
    noise = jax.random.uniform(key, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
    return (x.astype(jnp.float32) * noise).astype(x.dtype)


def bias_update(bias_e: jax.Array, load_e: jax.Array, rate: float) -> jax.Array:
    """Auxiliary-loss-free balancing step: raise the bias of underloaded experts, lower the rest.

    bias += rate * sign(mean(load) - load); `load_e` may be counts or fractions (only the sign of
    the gap matters). Applied by the train step, never by the optimizer.
    """
    if bias_e.shape != load_e.shape or bias_e.ndim != 1:
        raise ValueError(f"bias_e and load_e must both be [E], got {bias_e.shape}, {load_e.shape}")
    load_e = load_e.astype(jnp.float32)
    step_e = rate * jnp.sign(jnp.mean(load_e) - load_e)
    return (bias_e.astype(jnp.float32) + step_e).astype(bias_e.dtype)


def _valid_count(token_mask_n: jax.Array) -> jax.Array:
    # A batch of padding only would divide by zero; its losses are then 0.
    return jnp.maximum(jnp.sum(token_mask_n.astype(jnp.float32)), 1.0)


def _counts(experts_nk: jax.Array, weight_n: jax.Array, num_experts: int) -> jax.Array:
    # one_hot of an out-of-range id (a sentinel slot) is all zeros, so it counts nowhere.
    onehot_nke = jax.nn.one_hot(experts_nk, num_experts, dtype=jnp.float32)
    return jnp.einsum("nke,n->e", onehot_nke, weight_n.astype(jnp.float32))


def expert_load(experts_nk: jax.Array, token_mask_n: jax.Array, num_experts: int) -> jax.Array:
    """float32[E]: fraction of the valid tokens' routed assignments that went to each expert.

    Sentinel / out-of-range ids are not assignments: they count in neither the numerator nor the
    denominator, so the loads sum to 1 whenever any valid token was routed (else all 0).
    """
    counts_e = _counts(experts_nk, token_mask_n, num_experts)
    return counts_e / jnp.maximum(jnp.sum(counts_e), 1.0)


def balance_loss(probs_ne: jax.Array, experts_nk: jax.Array, token_mask_n: jax.Array) -> jax.Array:
    """Switch load-balancing loss E * sum_e f_e * P_e, equal to 1.0 under uniform routing (the
    default 'switch_topk' form; the others: `balance_loss_uni_moe_8e`).

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


# `MoEConfig.balance_loss_form`: which balance loss `aux.balance_loss` carries (see below).
BALANCE_LOSS_FORMS = ("switch_topk", "uni_moe_8e", "hf_pooled")


def balance_loss_uni_moe_8e(probs_ne: jax.Array) -> jax.Array:
    """Uni-MoE 8E's balance loss (DeepSpeed `top1gating` / `top2gating`): E * sum_e me_e * ce_e.

    me_e = mean router probability of e and ce_e = fraction of rows whose argmax is e, both over
    ALL N rows of the flattened batch, padding included (the 8E layer gets no token mask), and
    only the first choice counted even for top-2. 1.0 under uniform routing. The forms compared
    (L MoE layers, E router columns, k assignments per token, f_le / P_le the per-layer load and
    mean probability over valid tokens as in `balance_loss`, each form summed as stated):

      'switch_topk' (`balance_loss`, the default) = sum_l E sum_e f_le P_le: every top-k
        assignment, loads summing to 1, valid tokens only; L under uniform routing.
      'uni_moe_8e' (this) = sum_l E sum_e me_le ce_le; L under uniform routing. Equal to
        'switch_topk' for top-1 routing without padding; for top-2 it is blind to the second
        choice's imbalance.
      'hf_pooled' (`balance_loss_pooled`, Hugging Face Mixtral / Qwen2-MoE
        `load_balancing_loss_func`) = E sum_e (k mean_l f_le)(mean_l P_le), counts and
        probabilities pooled over layers first, NOT summed over them; k under uniform routing.
        On one layer it is k x 'switch_topk'; on L layers that route alike, k / L x the sum of
        'switch_topk', otherwise imbalances of different layers may cancel in the pool. A
        Mixtral / Qwen `router_aux_loss_coef` means the same here with this form.
    """
    _check_logits(probs_ne)
    num_experts = probs_ne.shape[-1]
    probs_ne = probs_ne.astype(jnp.float32)
    # argmax has no gradient: as in DeepSpeed, ce_e only weights the probabilities.
    first_ne = jax.nn.one_hot(jnp.argmax(probs_ne, axis=-1), num_experts, dtype=jnp.float32)
    return num_experts * jnp.sum(jnp.mean(probs_ne, axis=0) * jnp.mean(first_ne, axis=0))


def balance_sums(
    probs_ne: jax.Array, experts_nk: jax.Array, token_mask_n: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One layer's share of `balance_loss_pooled`: (assignments_e, prob_sums_e, tokens), i.e.
    the valid tokens' assignments per column (sentinel ids count nowhere), their summed router
    probabilities per column, and the number of valid tokens."""
    _check_logits(probs_ne)
    valid_n = token_mask_n.astype(jnp.float32)
    assignments_e = _counts(experts_nk, valid_n, probs_ne.shape[-1])
    prob_sums_e = jnp.einsum("ne,n->e", probs_ne.astype(jnp.float32), valid_n)
    return assignments_e, prob_sums_e, jnp.sum(valid_n)


def balance_loss_pooled(
    assignments_le: jax.Array, prob_sums_le: jax.Array, tokens_l: jax.Array
) -> jax.Array:
    """Hugging Face's pooled balance loss from L layers' `balance_sums` (stacked on axis 0):
    E * sum_e (sum_l assignments_le / T) * (sum_l prob_sums_le / T), T = sum_l tokens_l.

    The assignment fractions sum to k, so uniform routing gives k; 0 when no token is valid
    (where HF divides by zero). How it maps to the other forms: `balance_loss_uni_moe_8e`.
    """
    num_experts = assignments_le.shape[-1]
    total = jnp.maximum(jnp.sum(tokens_l), 1.0)
    frac_e = jnp.sum(assignments_le, axis=0) / total
    mean_prob_e = jnp.sum(prob_sums_le, axis=0) / total
    return num_experts * jnp.sum(frac_e * mean_prob_e)


def balance_loss_dcmoe(
    logits_ne: jax.Array, experts_nk: jax.Array, token_weight_n: jax.Array
) -> jax.Array:
    """DCMoE / UniMoE-Audio balance loss E * sum_e f_e * P_e over the E dynamic experts.

    f_e = weighted fraction of tokens that selected e; P_e = weighted mean of the softmax taken
    over each token's selected experts only (the others get probability 0). Token weights are 0 on
    padding and, in DCMoE, 1 on prompt and 10 on answer tokens; means are sum(w x) / sum(w). Pass
    the ids of `route_top_p` before null experts are remapped (null experts are balanced too) and
    before any capacity drop; sentinel slots (id E) select nothing.
    """
    _check_logits(logits_ne)
    num_experts = logits_ne.shape[-1]
    weight_n = token_weight_n.astype(jnp.float32)
    onehot_nke = jax.nn.one_hot(experts_nk, num_experts, dtype=jnp.float32)
    selected_ne = jnp.sum(onehot_nke, axis=1) > 0
    total = jnp.sum(weight_n)
    total = jnp.where(total > 0, total, 1.0)
    frac_e = jnp.einsum("ne,n->e", selected_ne.astype(jnp.float32), weight_n) / total
    # A finite fill instead of -inf keeps a token that selected nothing free of NaN; its row of
    # probabilities is then zeroed.
    logits_ne = jnp.where(selected_ne, logits_ne.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs_ne = jnp.where(selected_ne, jax.nn.softmax(logits_ne, axis=-1), 0.0)
    mean_prob_e = jnp.einsum("ne,n->e", probs_ne, weight_n) / total
    return num_experts * jnp.sum(frac_e * mean_prob_e)


def z_loss(logits_ne: jax.Array, token_mask_n: jax.Array) -> jax.Array:
    """ST-MoE router z-loss: mean over valid tokens of logsumexp(logits)^2."""
    lse_n = jax.nn.logsumexp(logits_ne.astype(jnp.float32), axis=-1)
    valid_n = token_mask_n.astype(jnp.float32)
    return jnp.sum(lse_n**2 * valid_n) / _valid_count(token_mask_n)


def router_entropy(probs_ne: jax.Array, token_mask_n: jax.Array) -> jax.Array:
    """Mean over valid tokens of the router distribution's entropy in nats (log E when uniform)."""
    entropy_n = jnp.sum(jax.scipy.special.entr(probs_ne.astype(jnp.float32)), axis=-1)
    return jnp.sum(entropy_n * token_mask_n.astype(jnp.float32)) / _valid_count(token_mask_n)


def aux_weight(
    step: jax.Array | int, *, start: float, end: float | None = None, decay_steps: int = 0
) -> jax.Array:
    """Coefficient of the balance loss at `step`: constant `start` when `end` is None, else
    linear from `start` at step 0 to `end` at `decay_steps`, then `end` (UniMoE-Audio anneals
    0.025 -> 0.001 over 10000 steps)."""
    if end is None:
        return jnp.asarray(start, jnp.float32)
    if decay_steps < 1:
        raise ValueError(f"decay_steps must be >= 1 when end is set, got {decay_steps}")
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / decay_steps, 0.0, 1.0)
    return jnp.asarray(start, jnp.float32) + (end - start) * frac
