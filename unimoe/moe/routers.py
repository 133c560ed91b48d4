"""The routers: one function per `MoEConfig.router`, in a registry, each returning a `Routed`.

A router maps float32 logits over the router columns [N, E + E_null] to K (weight, column) slots
per token; unused top-P slots carry the column id E + E_null, null experts keep their column ids
(the layer turns both into the sentinel expert E). `route` is the one entry: it runs the fused
Pallas kernel (`fused_routing`) where that computes the same routing, else the registry's router.
The routing math itself is `routing.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from unimoe.moe import fused_routing, routing

if TYPE_CHECKING:
    from unimoe.moe.config import MoEConfig


class Routed(NamedTuple):
    """weights_nk float32, columns_nk int32; expert_sort: (rank_m, group_sizes_e) when the fused
    kernel already sorted the assignments by expert (dispatch then skips its own sort)."""

    weights_nk: jax.Array
    columns_nk: jax.Array
    expert_sort: tuple[jax.Array, jax.Array] | None = None


class RouterState(NamedTuple):
    """What a router reads besides the logits: sigmoid_bias's selection bias [E], and a key
    source when training-mode sampling (Gumbel) is on (None otherwise)."""

    bias_e: jax.Array | None = None
    sample_key: Callable[[], jax.Array] | None = None


Router = Callable[[jax.Array, "MoEConfig", RouterState], Routed]
ROUTERS: dict[str, Router] = {}


def register(name: str) -> Callable[[Router], Router]:
    def add(router: Router) -> Router:
        ROUTERS[name] = router
        return router

    return add


@register("topk_softmax")
def _topk_softmax(logits_ne: jax.Array, cfg: MoEConfig, state: RouterState) -> Routed:
    """Softmax over the top-k logits (Uni-MoE 4E, Mixtral)."""
    return Routed(*routing.route_topk_softmax(logits_ne, cfg.top_k))


@register("top_p")
def _top_p(logits_ne: jax.Array, cfg: MoEConfig, state: RouterState) -> Routed:
    """DCMoE dynamic k: the fewest experts whose sorted softmax mass reaches top_p."""
    weights_nk, columns_nk, _ = routing.route_top_p(logits_ne, cfg.top_p, cfg.num_slots)
    return Routed(weights_nk, columns_nk)


@register("group_equal")
def _group_equal(logits_ne: jax.Array, cfg: MoEConfig, state: RouterState) -> Routed:
    """Pangu MoGE: softmax over all, top_k / num_groups per contiguous group."""
    return Routed(
        *routing.route_group_equal(logits_ne, cfg.num_groups, cfg.top_k, cfg.renormalize)
    )


@register("sigmoid_bias")
def _sigmoid_bias(logits_ne: jax.Array, cfg: MoEConfig, state: RouterState) -> Routed:
    """DeepSeek-V3: sigmoid scores, top-k of scores + bias (selection only)."""
    keep_ne = None
    if cfg.top_groups > 0:
        # Groups are ranked on the biased selection scores, as in DeepSeek-V3.
        keep_ne = routing.group_limited_mask(
            jax.nn.sigmoid(logits_ne) + state.bias_e, cfg.num_groups, cfg.top_groups
        )
    return Routed(
        *routing.route_sigmoid_bias(
            logits_ne, state.bias_e, cfg.top_k, renormalize=cfg.renormalize, mask_ne=keep_ne
        )
    )


@register("softmax_topk")
def _softmax_topk(logits_ne: jax.Array, cfg: MoEConfig, state: RouterState) -> Routed:
    """Softmax over all then top-k, optionally group-limited and with a Gumbel-sampled second
    choice (Uni-MoE 8E, Switch, Qwen2-MoE, DeepSeek)."""
    kept_mass_n1 = None
    if cfg.top_groups > 0:
        probs_ne = jax.nn.softmax(logits_ne, axis=-1)
        keep_ne = routing.group_limited_mask(probs_ne, cfg.num_groups, cfg.top_groups)
        logits_ne = jnp.where(keep_ne, logits_ne, -jnp.inf)
        # The softmax over the kept experts is p / kept_mass; unrenormalized weights must stay
        # shares of the softmax over all experts.
        kept_mass_n1 = jnp.sum(jnp.where(keep_ne, probs_ne, 0.0), axis=-1, keepdims=True)
    if _samples_gumbel(cfg, state):
        weights_nk, columns_nk = routing.route_softmax_topk_gumbel(
            logits_ne, cfg.top_k, cfg.renormalize, state.sample_key()
        )
    else:
        weights_nk, columns_nk = routing.route_softmax_topk(logits_ne, cfg.top_k, cfg.renormalize)
    if kept_mass_n1 is not None and not cfg.renormalize:
        weights_nk = weights_nk * kept_mass_n1
    return Routed(weights_nk, columns_nk)


def _samples_gumbel(cfg: MoEConfig, state: RouterState) -> bool:
    return cfg.second_choice == "gumbel" and state.sample_key is not None


def fusable(cfg: MoEConfig, state: RouterState) -> bool:
    """Whether the fused kernel computes exactly what the registry's router does."""
    return (
        cfg.router in fused_routing.FUSED_ROUTERS
        and cfg.top_groups == 0
        and not _samples_gumbel(cfg, state)
    )


def route(logits_ne: jax.Array, cfg: MoEConfig, state: RouterState, *, fused: bool) -> Routed:
    """The layer's routing: the fused Pallas kernel when `fused` and `fusable`, else the router."""
    if fused and fusable(cfg, state):
        spec = fused_routing.RouterSpec(
            cfg.router, cfg.num_slots, cfg.num_experts, cfg.renormalize, cfg.top_p
        )
        result = fused_routing.route(logits_ne, spec)
        return Routed(
            result.weights_nk, result.columns_nk, (result.rank_m, result.group_sizes_e)
        )
    return ROUTERS[cfg.router](logits_ne, cfg, state)
