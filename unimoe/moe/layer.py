"""The MoE FFN layer: router + dispatch + expert banks, returning (y, aux statistics)."""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from unimoe.moe import dispatch, expert_parallel, fused_routing, routing
from unimoe.moe.experts import GROUPED_IMPLS, ExpertBank
from unimoe.nn.lora import Linear, LoRAConfig

log = logging.getLogger(__name__)

ROUTERS = ("topk_softmax", "softmax_topk", "top_p", "sigmoid_bias", "group_equal")
SECOND_CHOICES = ("argmax", "gumbel")
DISPATCH_IMPLS = ("dropless", "capacity")
KERNEL_IMPLS = ("auto", "xla", "pallas")
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
        later choices from logits + Gumbel noise in training (Uni-MoE 8E / DeepSpeed);
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
    grouped_impl: the grouped matmul of dropless dispatch (`ExpertBank.grouped`): one of
      GROUPED_IMPLS, or 'auto' = 'tiles' on CPU (ragged_dot computes every group densely there)
      and 'ragged_dot' on accelerators.
    kernel_impl: 'pallas' = the `unimoe.kernels` Pallas kernels: the grouped matmul of dropless
      dispatch (instead of `grouped_impl`) and fused routing (logits -> weights, expert counts
      and the expert sort in one kernel) for routers in `fused_routing.FUSED_ROUTERS` without
      group limiting or Gumbel sampling; interpret mode on CPU (tests only: slow). 'xla' = the
      XLA paths; 'auto' = 'pallas' on TPU and GPU, 'xla' on CPU.
    expert_parallel: when the mesh set with `jax.set_mesh` has an `expert` axis of size > 1,
      dropless dispatch splits the experts over it (`unimoe.moe.expert_parallel`, shard_map):
      'auto' or 'all_to_all' = per-peer mailboxes and all_to_all; 'all_gather' = all-gather the
      tokens, reduce-scatter the outputs (never drops; for small expert axes or large K);
      'off' = never (the experts then follow the compiler's sharding).
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
    grouped_impl: str = "auto"
    kernel_impl: str = "auto"
    expert_parallel: str = "auto"
    ep_capacity_factor: float = 0.0

    def __post_init__(self):
        def require(ok: bool, field: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"MoEConfig.{field} {rule}, got {getattr(self, field)!r}")

        require(self.num_experts >= 1, "num_experts", "must be >= 1")
        require(self.router in ROUTERS, "router", f"must be one of {ROUTERS}")
        require(self.num_null_experts >= 0, "num_null_experts", "must be >= 0")
        require(
            self.num_null_experts == 0 or self.router in NULL_EXPERT_ROUTERS,
            "num_null_experts",
            f"needs a softmax router {NULL_EXPERT_ROUTERS} (router={self.router!r})",
        )
        columns = self.num_router_columns
        require(
            self.router == "top_p" or 1 <= self.top_k <= columns,
            "top_k",
            f"must be in [1, num_experts + num_null_experts={columns}]",
        )
        require(self.ffn_dim >= 0, "ffn_dim", "must be >= 0 (0 = the LM's)")
        require(
            self.second_choice in SECOND_CHOICES, "second_choice", f"must be in {SECOND_CHOICES}"
        )
        require(
            self.second_choice == "argmax" or self.router == "softmax_topk",
            "second_choice",
            f"'gumbel' needs router='softmax_topk' (router={self.router!r})",
        )
        require(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        require(0 <= self.k_max <= columns, "k_max", f"must be in [0, {columns}] (0 = all)")
        require(self.num_shared_experts >= 0, "num_shared_experts", "must be >= 0")
        require(self.shared_ffn_dim >= 0, "shared_ffn_dim", "must be >= 0 (0 = expert width)")
        require(
            not self.shared_gate or self.num_shared_experts > 0,
            "shared_gate",
            "needs num_shared_experts > 0",
        )
        require(
            self.num_groups >= 1 and self.num_experts % self.num_groups == 0,
            "num_groups",
            f"must be >= 1 and divide num_experts={self.num_experts}",
        )
        require(0 <= self.top_groups <= self.num_groups, "top_groups", "must be in [0, num_groups]")
        if self.top_groups > 0:
            require(
                self.router in GROUP_LIMITED_ROUTERS,
                "top_groups",
                f"needs a router in {GROUP_LIMITED_ROUTERS} (router={self.router!r})",
            )
            require(
                self.top_k <= self.top_groups * self.num_experts // self.num_groups,
                "top_groups",
                f"leaves fewer experts than top_k={self.top_k}",
            )
        if self.router == "group_equal":
            require(
                self.num_groups > 1 and self.top_k % self.num_groups == 0,
                "num_groups",
                f"must be > 1 and divide top_k={self.top_k} for router='group_equal'",
            )
        require(self.routed_scaling > 0, "routed_scaling", "must be > 0")
        require(0.0 <= self.jitter_eps < 1.0, "jitter_eps", "must be in [0, 1)")
        require(self.bias_update_rate >= 0, "bias_update_rate", "must be >= 0")
        require(
            self.bias_update_rate == 0 or self.router == "sigmoid_bias",
            "bias_update_rate",
            f"needs router='sigmoid_bias' (router={self.router!r})",
        )
        require(self.impl in DISPATCH_IMPLS, "impl", f"must be one of {DISPATCH_IMPLS}")
        require(
            self.capacity_factor > 0 if self.impl == "capacity" else self.capacity_factor == 0,
            "capacity_factor",
            f"must be > 0 for impl='capacity' and 0 for impl='dropless' (impl={self.impl!r})",
        )
        require(self.min_capacity >= 0, "min_capacity", "must be >= 0")
        require(
            self.drop_policy in dispatch.DROP_POLICIES,
            "drop_policy",
            f"must be in {dispatch.DROP_POLICIES}",
        )
        require(
            self.grouped_impl in ("auto", *GROUPED_IMPLS),
            "grouped_impl",
            f"must be 'auto' or one of {GROUPED_IMPLS}",
        )
        require(self.kernel_impl in KERNEL_IMPLS, "kernel_impl", f"must be in {KERNEL_IMPLS}")
        require(
            self.expert_parallel in EXPERT_PARALLEL,
            "expert_parallel",
            f"must be in {EXPERT_PARALLEL}",
        )
        require(
            self.ep_capacity_factor >= 0, "ep_capacity_factor", "must be >= 0 (0 = the EP degree)"
        )

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

    def resolved_grouped_impl(self) -> str:
        if self.grouped_impl != "auto":
            return self.grouped_impl
        return "tiles" if jax.default_backend() == "cpu" else "ragged_dot"

    def resolved_kernel_impl(self) -> str:
        if self.kernel_impl != "auto":
            return self.kernel_impl
        return "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla"


class RouterBias(nnx.Variable):
    """Selection-only per-expert bias (aux-loss-free balancing); not a Param, so optimizers and
    Param filters never touch it. The train step moves it with `routing.bias_update`."""


class SharedExperts(nnx.Module):
    """Always-on SwiGLU down(silu(gate(x)) * up(x)), param names as the dense `llm.MLP`."""

    def __init__(self, dim: int, ffn_dim: int, *, lora: LoRAConfig, rngs: nnx.Rngs):
        self.gate = Linear(dim, ffn_dim, lora=lora, rngs=rngs)
        self.up = Linear(dim, ffn_dim, lora=lora, rngs=rngs)
        self.down = Linear(ffn_dim, dim, lora=lora, rngs=rngs)

    def __call__(self, x_nd: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x_nd)) * self.up(x_nd))


class MoELayer(nnx.Module):
    """Routes each token to K of num_experts SwiGLU experts, mixes their outputs, adds shared ones.

    The router is a bias-free `Linear(dim, E + E_null)` evaluated in float32 and never gets LoRA
    (it is trained fully in Uni-MoE stage 3); experts get LoRA when `lora.rank > 0`.

    Slots that compute nothing (a null expert, an unused top-P slot) get the sentinel expert id E
    before dispatch: they keep their weight but produce zero output and take no capacity.
    `deterministic` (set by `nnx.view(model, deterministic=True)` / `model.eval()`) turns off
    jitter and Gumbel sampling. `dropless` (`nnx.view(model, dropless=True)`, what generation
    uses) runs an `impl='capacity'` layer through the dropless path: same routing and weights,
    no capacity, so a decode step never drops a token (capacity with C = N would compute the
    same sum).
    """

    Config = MoEConfig

    def __init__(
        self,
        dim: int,
        cfg: MoEConfig,
        *,
        ffn_dim: int,
        lora: LoRAConfig = LoRAConfig(),
        rngs: nnx.Rngs,
        deterministic: bool = False,
        dropless: bool = False,
    ):
        self.cfg = cfg
        self.deterministic = deterministic
        self.dropless = dropless
        expert_ffn = cfg.ffn_dim or ffn_dim
        self.router = Linear(dim, cfg.num_router_columns, rngs=rngs)
        self.experts = ExpertBank(cfg.num_experts, dim, expert_ffn, lora=lora, rngs=rngs)
        shared_ffn = cfg.num_shared_experts * (cfg.shared_ffn_dim or expert_ffn)
        self.shared_experts = (
            SharedExperts(dim, shared_ffn, lora=lora, rngs=rngs) if shared_ffn else None
        )
        self.shared_gate = Linear(dim, 1, rngs=rngs) if cfg.shared_gate else None
        self.router_bias = (
            RouterBias(jnp.zeros((cfg.num_experts,), jnp.float32))
            if cfg.router == "sigmoid_bias"
            else None
        )
        # Only stochastic configs carry RNG state, so deterministic layers keep a pure param tree.
        self.router_rngs = rngs.router.fork() if cfg.stochastic else None

    def set_view(self, deterministic: bool | None = None, dropless: bool | None = None):
        """Used by `nnx.view`: deterministic=True turns off router jitter and Gumbel sampling;
        dropless=True lifts the capacity of an impl='capacity' layer."""
        if deterministic is not None:
            self.deterministic = deterministic
        if dropless is not None:
            self.dropless = dropless

    @property
    def _exchange(self) -> str:
        return "all_gather" if self.cfg.expert_parallel == "all_gather" else "all_to_all"

    @property
    def _sampling(self) -> bool:
        return self.router_rngs is not None and not self.deterministic

    @property
    def _fusable_routing(self) -> bool:
        """Whether `fused_routing` computes this layer's routing exactly as `_route` does."""
        cfg = self.cfg
        gumbel = cfg.second_choice == "gumbel" and self._sampling
        return cfg.router in fused_routing.FUSED_ROUTERS and cfg.top_groups == 0 and not gumbel

    def _route(self, logits_ne: jax.Array) -> tuple[jax.Array, jax.Array]:
        """float32 logits over the router columns -> (weights_nk, column ids_nk).

        Unused top-P slots carry id num_router_columns; null experts keep their column ids here.
        """
        cfg = self.cfg
        if cfg.router == "topk_softmax":
            return routing.route_topk_softmax(logits_ne, cfg.top_k)
        if cfg.router == "top_p":
            weights_nk, experts_nk, _ = routing.route_top_p(logits_ne, cfg.top_p, cfg.num_slots)
            return weights_nk, experts_nk
        if cfg.router == "group_equal":
            return routing.route_group_equal(logits_ne, cfg.num_groups, cfg.top_k, cfg.renormalize)
        if cfg.router == "sigmoid_bias":
            bias_e = self.router_bias[...]
            keep_ne = None
            if cfg.top_groups > 0:
                # Groups are ranked on the biased selection scores, as in DeepSeek-V3.
                keep_ne = routing.group_limited_mask(
                    jax.nn.sigmoid(logits_ne) + bias_e, cfg.num_groups, cfg.top_groups
                )
            return routing.route_sigmoid_bias(
                logits_ne, bias_e, cfg.top_k, renormalize=cfg.renormalize, mask_ne=keep_ne
            )
        # softmax_topk, optionally group-limited and with a Gumbel-sampled second choice.
        kept_mass_n1 = None
        if cfg.top_groups > 0:
            probs_ne = jax.nn.softmax(logits_ne, axis=-1)
            keep_ne = routing.group_limited_mask(probs_ne, cfg.num_groups, cfg.top_groups)
            logits_ne = jnp.where(keep_ne, logits_ne, -jnp.inf)
            # The softmax over the kept experts is p / kept_mass; unrenormalized weights must
            # stay shares of the softmax over all experts.
            kept_mass_n1 = jnp.sum(jnp.where(keep_ne, probs_ne, 0.0), axis=-1, keepdims=True)
        if cfg.second_choice == "gumbel" and self._sampling:
            weights_nk, experts_nk = routing.route_softmax_topk_gumbel(
                logits_ne, cfg.top_k, cfg.renormalize, self.router_rngs()
            )
        else:
            weights_nk, experts_nk = routing.route_softmax_topk(
                logits_ne, cfg.top_k, cfg.renormalize
            )
        if kept_mass_n1 is not None and not cfg.renormalize:
            weights_nk = weights_nk * kept_mass_n1
        return weights_nk, experts_nk

    def __call__(
        self,
        x_btd: jax.Array,
        token_mask_bt: jax.Array | None = None,
        *,
        token_weight_bt: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x_btd -> (y_btd, aux); padding tokens (mask False) count in no loss, load or capacity.

        token_weight_bt: per-token weight of the DCMoE balance loss (e.g. 1 prompt, 10 answer;
        multiplied by the mask); default the mask.
        aux (every key always present, zeros when unused): 'balance_loss', 'z_loss',
        'dcmoe_balance_loss', 'router_entropy', 'dropped_fraction', 'experts_per_token' (scalars:
        the last is the mean number of routed experts a valid token runs, K for top-k, the dynamic
        k_n of top-P without its null experts), 'expert_load' [E] (fraction of the valid tokens'
        routed assignments per expert, sentinel slots excluded), 'expert_counts_be' [B, E] (routed
        assignments per example, for per-modality expert usage).
        """
        batch, seq, dim = x_btd.shape
        if token_mask_bt is None:
            token_mask_bt = jnp.ones((batch, seq), bool)
        if token_mask_bt.shape != (batch, seq):
            raise ValueError(f"token_mask must be [B, T]={batch, seq}, got {token_mask_bt.shape}")
        if token_weight_bt is not None and token_weight_bt.shape != (batch, seq):
            raise ValueError(
                f"token_weight must be [B, T]={batch, seq}, got {token_weight_bt.shape}"
            )
        cfg = self.cfg
        num_experts = cfg.num_experts
        x_nd = x_btd.reshape(batch * seq, dim)
        mask_n = token_mask_bt.reshape(batch * seq)

        router_in_nd = x_nd.astype(jnp.float32)
        if cfg.jitter_eps > 0 and self._sampling:
            router_in_nd = routing.jitter(router_in_nd, cfg.jitter_eps, self.router_rngs())
        logits_ne = self.router(router_in_nd)
        pallas = cfg.resolved_kernel_impl() == "pallas"
        fused = pallas and self._fusable_routing
        expert_sort = None
        if fused:
            spec = fused_routing.RouterSpec(
                cfg.router, cfg.num_slots, num_experts, cfg.renormalize, cfg.top_p
            )
            routed = fused_routing.route(logits_ne, spec)
            weights_nk, columns_nk = routed.weights_nk, routed.columns_nk
            expert_sort = (routed.rank_m, routed.group_sizes_e)
        else:
            weights_nk, columns_nk = self._route(logits_ne)
        weights_nk = weights_nk * cfg.routed_scaling
        # Null experts and unused top-P slots -> the sentinel id E (computes nothing).
        experts_nk = jnp.minimum(columns_nk, num_experts)

        # Runs once per trace under jit, so this names the path each compiled step takes.
        grouped_impl = "pallas" if pallas else cfg.resolved_grouped_impl()
        impl = "dropless" if self.dropless else cfg.impl
        ep_size = expert_parallel.expert_parallel_size() if cfg.expert_parallel != "off" else 1
        if impl == "dropless" and ep_size > 1:
            if (batch * seq) % expert_parallel.token_shards() == 0:
                impl = "expert-parallel"
            else:
                # e.g. a decode step of a few tokens: the compiler's sharding is fine there.
                log.info(
                    "MoELayer: %d tokens do not split over %d token shards: not expert-parallel",
                    batch * seq,
                    expert_parallel.token_shards(),
                )
        log.info(
            "MoELayer: %s router (%s), %s dispatch (%s), E=%d (+%d null, %d shared) K=%d, "
            "%d tokens%s",
            cfg.router,
            "fused Pallas kernel" if fused else "XLA",
            impl,
            grouped_impl if impl != "capacity" else "batched",
            num_experts,
            cfg.num_null_experts,
            cfg.num_shared_experts,
            cfg.num_slots,
            batch * seq,
            f", expert axis {ep_size} ({self._exchange})" if impl == "expert-parallel" else "",
        )
        if impl == "expert-parallel":
            y_nd, dropped_fraction = expert_parallel.expert_parallel_dispatch(
                x_nd,
                weights_nk,
                experts_nk,
                mask_n,
                self.experts,
                capacity_factor=cfg.ep_capacity_factor,
                grouped_impl=grouped_impl,
                exchange=self._exchange,
            )
        elif impl == "dropless" and grouped_impl == "tiles":
            y_nd = dispatch.dropless_tiled_dispatch(
                x_nd,
                weights_nk,
                experts_nk,
                self.experts.gathered,
                num_experts,
                tile=self.experts.tile_for(experts_nk.size, num_experts),
            )
            dropped_fraction = jnp.zeros((), jnp.float32)
        elif impl == "dropless":
            y_nd = dispatch.dropless_dispatch(
                x_nd,
                weights_nk,
                experts_nk,
                functools.partial(self.experts.grouped, impl=grouped_impl),
                num_experts,
                sort=expert_sort,
            )
            dropped_fraction = jnp.zeros((), jnp.float32)
        else:
            # The router logit of each assignment ranks it under drop_policy='score' (DCMoE).
            scores_nk = jnp.take_along_axis(
                logits_ne, jnp.minimum(columns_nk, cfg.num_router_columns - 1), axis=-1
            )
            y_nd, dropped_fraction = dispatch.capacity_dispatch(
                x_nd,
                weights_nk,
                experts_nk,
                self.experts.batched,
                num_experts,
                capacity_factor=cfg.capacity_factor,
                min_capacity=cfg.min_capacity,
                drop_policy=cfg.drop_policy,
                token_mask_n=mask_n,
                scores_nk=scores_nk,
            )
        if self.shared_experts is not None:
            shared_nd = self.shared_experts(x_nd)
            if self.shared_gate is not None:
                gate_n1 = jax.nn.sigmoid(self.shared_gate(x_nd.astype(jnp.float32)))
                shared_nd = shared_nd * gate_n1.astype(shared_nd.dtype)
            y_nd = y_nd + shared_nd

        aux = self._aux(logits_ne, columns_nk, experts_nk, mask_n, token_weight_bt, batch)
        aux["dropped_fraction"] = jnp.asarray(dropped_fraction, jnp.float32)
        return y_nd.reshape(batch, seq, dim), aux

    def _aux(
        self,
        logits_ne: jax.Array,
        columns_nk: jax.Array,
        experts_nk: jax.Array,
        mask_n: jax.Array,
        token_weight_bt: jax.Array | None,
        batch: int,
    ) -> dict[str, jax.Array]:
        """Losses over every router column (null experts balance too); loads over routed ones.

        The balance losses use the softmax over all columns whatever the router (as MaxText does
        for sigmoid routers), and are computed before any capacity drop (DCMoE).
        """
        num_experts = self.cfg.num_experts
        probs_ne = jax.nn.softmax(logits_ne, axis=-1)
        token_weight_n = mask_n.astype(jnp.float32)
        if token_weight_bt is not None:
            token_weight_n = token_weight_n * token_weight_bt.reshape(-1).astype(jnp.float32)
        # Sentinel ids (== E) fall outside one_hot's range and count nowhere.
        counts_ne = jnp.sum(jax.nn.one_hot(experts_nk, num_experts, dtype=jnp.float32), axis=1)
        counts_ne = counts_ne * mask_n.astype(jnp.float32)[:, None]
        return {
            "balance_loss": routing.balance_loss(probs_ne, columns_nk, mask_n),
            "z_loss": routing.z_loss(logits_ne, mask_n),
            "dcmoe_balance_loss": routing.balance_loss_dcmoe(logits_ne, columns_nk, token_weight_n),
            "router_entropy": routing.router_entropy(probs_ne, mask_n),
            "expert_load": routing.expert_load(experts_nk, mask_n, num_experts),
            "expert_counts_be": counts_ne.reshape(batch, -1, num_experts).sum(axis=1),
            "experts_per_token": counts_ne.sum() / jnp.maximum(mask_n.sum(), 1),
        }
