"""`MoEConfig`: what one MoE FFN routes, computes and dispatches; validated where it is built."""

from __future__ import annotations

import dataclasses
import functools

from unimoe.moe import dispatch, gmm, routers, routing

SECOND_CHOICES = ("argmax", "gumbel")
DISPATCH_IMPLS = ("dropless", "capacity")
# Routers whose probabilities are a softmax over every router column, so null experts fit in.
NULL_EXPERT_ROUTERS = ("topk_softmax", "softmax_topk", "top_p")
GROUP_LIMITED_ROUTERS = ("softmax_topk", "sigmoid_bias")
EXPERT_PARALLEL = ("auto", "all_to_all", "all_gather", "off")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Routing, experts and dispatch of one MoE FFN. Defaults are Uni-MoE 4E (top-2 of 4, dropless).

    router:
      'topk_softmax' = softmax over the top-k logits (Uni-MoE 4E, Mixtral);
      'softmax_topk' = softmax over all experts then top-k, renormalized when `renormalize`
        (Uni-MoE 8E, Switch, Qwen2-MoE `norm_topk_prob`); `second_choice='gumbel'` samples the
        later choices from logits + Gumbel noise in training (Uni-MoE 8E / DeepSpeed), and at
        inference too with `gumbel_at_inference` (DeepSpeed's gate does: the released 8E model
        is evaluated that way);
      'top_p' = DCMoE dynamic k: per token the fewest experts whose sorted softmax mass reaches
        `top_p`, at most `k_max` (0 = all router columns); `top_k` is unused;
      'sigmoid_bias' = DeepSeek-V3: sigmoid scores, top-k of scores + `router_bias` (selection
        only, moved by the train step with `routing.bias_update` at `bias_update_rate`);
      'group_equal' = Pangu MoGE: softmax over all, top_k / num_groups per contiguous group.
    renormalize: rescale the k weights to sum 1 ('softmax_topk', 'sigmoid_bias', 'group_equal').
    num_null_experts: DCMoE null experts, extra router columns that compute nothing but keep their
      share of the weight (the routed output shrinks); softmax routers only.
    num_shared_experts, shared_ffn_dim: always-on experts added to the routed output, stored as
      one dense SwiGLU of width num_shared_experts * shared_ffn_dim (a sum of SwiGLUs is exactly a
      SwiGLU over their concatenated hidden units); shared_ffn_dim 0 = the routed experts' width.
    shared_gate: scale the shared output by sigmoid(x @ w[D, 1]) (Qwen2-MoE).
    num_groups, top_groups: experts in num_groups contiguous groups; top_groups > 0 keeps only the
      top_groups groups (by the sum of their top-2 selection scores) before top-k (DeepSeek).
    routed_scaling: multiplies the routed weights (DeepSeek-V3 `routed_scaling_factor`).
    jitter_eps: multiplicative uniform noise in [1 - eps, 1 + eps] on the router input in training
      (DCMoE, MegaBlocks); experts see the clean input.
    ffn_dim: width of each routed expert; 0 means the LM's dense ffn_dim (upcycled experts).
    impl: 'dropless' = sort by expert + grouped matmul, nothing dropped (capacity_factor must be
      0); 'capacity' = at most C = max(ceil(N * k / E * capacity_factor), min_capacity) tokens
      per expert, the rest dropped by `drop_policy` ('position': first in token order; 'score':
      highest router logit).
    kernel_impl: the expert computation's backend, one decision for the grouped matmul and the
      routing (`unimoe.moe.gmm.resolve_backend` is where it is made): 'tiles' = `moe.gmm`'s loops
      over whole tiles per expert (fastest on CPU), 'ragged_dot' = `jax.lax.ragged_dot`,
      'pallas' = the `unimoe.kernels` grouped matmul and fused routing (logits -> weights, expert
      counts and the expert sort in one kernel, for routers in `fused_routing.FUSED_ROUTERS`
      without group limiting or Gumbel sampling; interpret mode on CPU, for tests: slow);
      'xla' = the platform's XLA backend ('ragged_dot' on TPU and GPU; on CPU 'tiles', where
      ragged_dot computes every group densely, but 'ragged_dot' for a few rows per expert, as in
      a decode step, outside a mesh); 'auto' = 'pallas' on TPU and GPU, 'xla' on CPU.
    expert_parallel: when the mesh set with `jax.set_mesh` has an `expert` axis of size > 1,
      dropless dispatch splits the experts over it (`unimoe.moe.expert_parallel`, shard_map):
      'auto' or 'all_to_all' = per-peer mailboxes and all_to_all; 'all_gather' = all-gather the
      tokens, reduce-scatter the outputs (never drops; for small expert axes or large K);
      'off' = never (the experts then follow the compiler's sharding).
    balance_loss_form: the balance loss that aux['balance_loss'] carries (`LossConfig.balance_coef`
      weights it), over every router column, before any capacity drop:
      'switch_topk' = per layer E * sum_e f_e * P_e over the valid tokens' top-k assignments
        (loads summing to 1), summed over layers: 1 per layer under uniform routing (default);
      'uni_moe_8e' = the official Uni-MoE 8E code's (DeepSpeed gating): first choice only,
        means over every token, padding included, summed over layers (faithful re-training);
      'hf_pooled' = Hugging Face Mixtral / Qwen2-MoE `load_balancing_loss_func`: top-k counts
        and probabilities pooled over the layers, then E * sum_e f_e * P_e with f summing to k,
        so their `router_aux_loss_coef` means the same here. One layer: k x 'switch_topk'.
      How the forms map to each other: `routing.balance_loss_uni_moe_8e`.
    ep_capacity_factor: rows each device may send to each expert-parallel peer, as a multiple of
      its balanced share N_local * K / P; 0 = P, which never drops. Smaller factors drop the
      overflow (reported in aux['dropped_fraction']).
    """

    num_experts: int = 4
    top_k: int = 2
    ffn_dim: int = 0
    router: str = "topk_softmax"
    renormalize: bool = True
    second_choice: str = "argmax"
    gumbel_at_inference: bool = False
    top_p: float = 0.7
    k_max: int = 0
    num_null_experts: int = 0
    num_shared_experts: int = 0
    shared_ffn_dim: int = 0
    shared_gate: bool = False
    num_groups: int = 1
    top_groups: int = 0
    routed_scaling: float = 1.0
    jitter_eps: float = 0.0
    bias_update_rate: float = 0.0
    impl: str = "dropless"
    capacity_factor: float = 0.0
    min_capacity: int = 4
    drop_policy: str = "position"
    kernel_impl: str = "auto"
    expert_parallel: str = "auto"
    ep_capacity_factor: float = 0.0
    balance_loss_form: str = "switch_topk"

    def __post_init__(self):
        _check_routing(self)
        _check_experts(self)
        _check_dispatch(self)

    @property
    def num_router_columns(self) -> int:
        """Routed experts first, then null experts (DCMoE's column order)."""
        return self.num_experts + self.num_null_experts

    @property
    def num_slots(self) -> int:
        """K: routing slots per token (static; top-P fills unused slots with the sentinel)."""
        if self.router == "top_p":
            return self.k_max or self.num_router_columns
        return self.top_k

    @property
    def stochastic(self) -> bool:
        """Whether training-mode routing draws random numbers (the layer then holds an RNG)."""
        return self.jitter_eps > 0 or self.second_choice == "gumbel"


def _require(cfg: MoEConfig, ok: bool, field: str, rule: str) -> None:
    if not ok:
        raise ValueError(f"MoEConfig.{field} {rule}, got {getattr(cfg, field)!r}")


def _check_routing(cfg: MoEConfig) -> None:
    require = functools.partial(_require, cfg)
    require(cfg.num_experts >= 1, "num_experts", "must be >= 1")
    require(cfg.router in routers.ROUTERS, "router", f"must be one of {tuple(routers.ROUTERS)}")
    require(cfg.num_null_experts >= 0, "num_null_experts", "must be >= 0")
    require(
        cfg.num_null_experts == 0 or cfg.router in NULL_EXPERT_ROUTERS,
        "num_null_experts",
        f"needs a softmax router {NULL_EXPERT_ROUTERS} (router={cfg.router!r})",
    )
    columns = cfg.num_router_columns
    require(
        cfg.router == "top_p" or 1 <= cfg.top_k <= columns,
        "top_k",
        f"must be in [1, num_experts + num_null_experts={columns}]",
    )
    require(cfg.second_choice in SECOND_CHOICES, "second_choice", f"must be in {SECOND_CHOICES}")
    require(
        cfg.second_choice == "argmax" or cfg.router == "softmax_topk",
        "second_choice",
        f"'gumbel' needs router='softmax_topk' (router={cfg.router!r})",
    )
    require(
        not cfg.gumbel_at_inference or cfg.second_choice == "gumbel",
        "gumbel_at_inference",
        f"needs second_choice='gumbel' (second_choice={cfg.second_choice!r})",
    )
    require(0.0 < cfg.top_p <= 1.0, "top_p", "must be in (0, 1]")
    require(0 <= cfg.k_max <= columns, "k_max", f"must be in [0, {columns}] (0 = all)")
    _check_groups(cfg)
    require(cfg.routed_scaling > 0, "routed_scaling", "must be > 0")
    require(0.0 <= cfg.jitter_eps < 1.0, "jitter_eps", "must be in [0, 1)")
    require(cfg.bias_update_rate >= 0, "bias_update_rate", "must be >= 0")
    require(
        cfg.balance_loss_form in routing.BALANCE_LOSS_FORMS,
        "balance_loss_form",
        f"must be one of {routing.BALANCE_LOSS_FORMS}",
    )
    require(
        cfg.bias_update_rate == 0 or cfg.router == "sigmoid_bias",
        "bias_update_rate",
        f"needs router='sigmoid_bias' (router={cfg.router!r})",
    )


def _check_groups(cfg: MoEConfig) -> None:
    require = functools.partial(_require, cfg)
    require(
        cfg.num_groups >= 1 and cfg.num_experts % cfg.num_groups == 0,
        "num_groups",
        f"must be >= 1 and divide num_experts={cfg.num_experts}",
    )
    require(0 <= cfg.top_groups <= cfg.num_groups, "top_groups", "must be in [0, num_groups]")
    if cfg.top_groups > 0:
        require(
            cfg.router in GROUP_LIMITED_ROUTERS,
            "top_groups",
            f"needs a router in {GROUP_LIMITED_ROUTERS} (router={cfg.router!r})",
        )
        require(
            cfg.top_k <= cfg.top_groups * cfg.num_experts // cfg.num_groups,
            "top_groups",
            f"leaves fewer experts than top_k={cfg.top_k}",
        )
    if cfg.router == "group_equal":
        require(
            cfg.num_groups > 1 and cfg.top_k % cfg.num_groups == 0,
            "num_groups",
            f"must be > 1 and divide top_k={cfg.top_k} for router='group_equal'",
        )


def _check_experts(cfg: MoEConfig) -> None:
    require = functools.partial(_require, cfg)
    require(cfg.ffn_dim >= 0, "ffn_dim", "must be >= 0 (0 = the LM's)")
    require(cfg.num_shared_experts >= 0, "num_shared_experts", "must be >= 0")
    require(cfg.shared_ffn_dim >= 0, "shared_ffn_dim", "must be >= 0 (0 = expert width)")
    require(
        not cfg.shared_gate or cfg.num_shared_experts > 0, "shared_gate", "needs num_shared_experts > 0"
    )


def _check_dispatch(cfg: MoEConfig) -> None:
    require = functools.partial(_require, cfg)
    require(cfg.impl in DISPATCH_IMPLS, "impl", f"must be one of {DISPATCH_IMPLS}")
    require(
        cfg.capacity_factor > 0 if cfg.impl == "capacity" else cfg.capacity_factor == 0,
        "capacity_factor",
        f"must be > 0 for impl='capacity' and 0 for impl='dropless' (impl={cfg.impl!r})",
    )
    require(cfg.min_capacity >= 0, "min_capacity", "must be >= 0")
    require(
        cfg.drop_policy in dispatch.DROP_POLICIES, "drop_policy", f"must be in {dispatch.DROP_POLICIES}"
    )
    require(cfg.kernel_impl in gmm.KERNEL_IMPLS, "kernel_impl", f"must be in {gmm.KERNEL_IMPLS}")
    require(cfg.expert_parallel in EXPERT_PARALLEL, "expert_parallel", f"must be in {EXPERT_PARALLEL}")
    require(cfg.ep_capacity_factor >= 0, "ep_capacity_factor", "must be >= 0 (0 = the EP degree)")
