"""Dispatch / combine strategies: send each token to its K experts and mix the results.

Axis letters: N tokens, D model width, E experts, K experts per token, M = N*K assignments.
Combining happens in float32 so bf16 expert outputs are not summed with bf16 weights.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# (x_md sorted by expert, group_sizes_e) -> y_md, e.g. `ExpertBank.grouped`.
GroupedExpertFn = Callable[[jax.Array, jax.Array], jax.Array]
# x_ecd -> y_ecd: every expert on its own block of rows, e.g. `ExpertBank.batched`.
BatchedExpertFn = Callable[[jax.Array], jax.Array]


def _check_routing(x_nd: jax.Array, weights_nk: jax.Array, experts_nk: jax.Array) -> None:
    if x_nd.ndim != 2:
        raise ValueError(f"x must be [N, D], got shape {x_nd.shape}")
    if weights_nk.shape != experts_nk.shape or weights_nk.shape[0] != x_nd.shape[0]:
        raise ValueError(
            f"weights {weights_nk.shape} and experts {experts_nk.shape} must both be "
            f"[N={x_nd.shape[0]}, K]"
        )


def _combine(y_nkd: jax.Array, weights_nk: jax.Array, dtype: jnp.dtype) -> jax.Array:
    y_nd = jnp.einsum("nkd,nk->nd", y_nkd.astype(jnp.float32), weights_nk.astype(jnp.float32))
    return y_nd.astype(dtype)


def dropless_dispatch(
    x_nd: jax.Array,
    weights_nk: jax.Array,
    experts_nk: jax.Array,
    expert_fn: GroupedExpertFn,
    num_experts: int,
) -> jax.Array:
    """No capacity, no dropped tokens: sort the N*K assignments by expert and run grouped matmuls.

    The sort is stable, so within an expert rows keep token order (deterministic results).
    """
    _check_routing(x_nd, weights_nk, experts_nk)
    num_tokens, top_k = experts_nk.shape
    experts_m = experts_nk.reshape(-1)
    order_m = jnp.argsort(experts_m, stable=True)
    token_of_sorted_m = order_m // top_k
    group_sizes_e = jnp.bincount(experts_m, length=num_experts).astype(jnp.int32)
    y_sorted_md = expert_fn(x_nd[token_of_sorted_m], group_sizes_e)
    y_md = jnp.zeros_like(y_sorted_md).at[order_m].set(y_sorted_md, unique_indices=True)
    return _combine(y_md.reshape(num_tokens, top_k, -1), weights_nk, x_nd.dtype)


def dense_reference(
    x_nd: jax.Array,
    weights_nk: jax.Array,
    experts_nk: jax.Array,
    expert_fn: BatchedExpertFn,
    num_experts: int,
) -> jax.Array:
    """Slow oracle: every expert on every token, then pick each token's K outputs."""
    _check_routing(x_nd, weights_nk, experts_nk)
    x_end = jnp.broadcast_to(x_nd[None], (num_experts, *x_nd.shape))
    y_end = expert_fn(x_end)
    y_nkd = y_end[experts_nk, jnp.arange(x_nd.shape[0])[:, None]]
    return _combine(y_nkd, weights_nk, x_nd.dtype)
