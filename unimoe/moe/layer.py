"""The MoE FFN layer: router + dispatch + expert banks, returning (y, `MoEAux` statistics).

Composed of parts chosen once from `MoEConfig`: the router (`routers.ROUTERS`, or the fused
Pallas kernel), the grouped-matmul backend (`gmm.resolve_backend`), and the dispatch path
(`dispatch_path`: dropless, capacity, or expert-parallel on a mesh with an `expert` axis).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from unimoe.moe import dispatch, expert_parallel, gmm, routers, routing
from unimoe.moe.aux_stats import MoEAux
from unimoe.moe.config import MoEConfig
from unimoe.moe.experts import ExpertBank
from unimoe.nn.lora import Linear, LoRAConfig

log = logging.getLogger(__name__)


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
    jitter and Gumbel sampling (but for `cfg.gumbel_at_inference`). `dropless` (`nnx.view(model, dropless=True)`, what generation
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

    def backend(self, num_tokens: int) -> str:
        """The grouped-matmul backend (`gmm.BACKENDS`) for a call on num_tokens tokens; 'pallas'
        also fuses the routing."""
        cfg = self.cfg
        under_mesh = not jax.sharding.get_abstract_mesh().empty
        return gmm.resolve_backend(
            cfg.kernel_impl, num_tokens * cfg.num_slots, cfg.num_experts, under_mesh=under_mesh
        )

    def dispatch_path(self, num_tokens: int) -> str:
        """'capacity', 'dropless' or 'expert-parallel' for a call on num_tokens tokens."""
        cfg = self.cfg
        if cfg.impl == "capacity" and not self.dropless:
            return "capacity"
        ep_size = expert_parallel.expert_parallel_size() if cfg.expert_parallel != "off" else 1
        if ep_size < 2:
            return "dropless"
        if num_tokens % expert_parallel.token_shards():
            # e.g. a decode step of a few tokens: the compiler's sharding is fine there.
            log.info(
                "MoELayer: %d tokens do not split over %d token shards: not expert-parallel",
                num_tokens,
                expert_parallel.token_shards(),
            )
            return "dropless"
        return "expert-parallel"

    @property
    def _sampling(self) -> bool:
        """Training-mode randomness (jitter, Gumbel) is on: a stochastic config, not a view."""
        return self.router_rngs is not None and not self.deterministic

    def router_state(self) -> routers.RouterState:
        cfg = self.cfg
        gumbel = cfg.second_choice == "gumbel" and (
            self._sampling or (cfg.gumbel_at_inference and self.router_rngs is not None)
        )
        return routers.RouterState(
            bias_e=self.router_bias[...] if self.router_bias is not None else None,
            sample_key=self.router_rngs if gumbel else None,
        )

    def __call__(
        self,
        x_btd: jax.Array,
        token_mask_bt: jax.Array | None = None,
        *,
        token_weight_bt: jax.Array | None = None,
    ) -> tuple[jax.Array, MoEAux]:
        """x_btd -> (y_btd, aux); padding tokens (mask False) count in no loss, load or capacity.

        token_weight_bt: per-token weight of the DCMoE balance loss (e.g. 1 prompt, 10 answer;
        multiplied by the mask); default the mask.
        """
        batch, seq, dim = x_btd.shape
        token_mask_bt = _checked_mask(token_mask_bt, token_weight_bt, batch, seq)
        cfg = self.cfg
        x_nd = x_btd.reshape(batch * seq, dim)
        mask_n = token_mask_bt.reshape(batch * seq)
        router_in_nd = x_nd.astype(jnp.float32)
        if cfg.jitter_eps > 0 and self._sampling:
            router_in_nd = routing.jitter(router_in_nd, cfg.jitter_eps, self.router_rngs())
        logits_ne = self.router(router_in_nd)
        backend, path = self.backend(batch * seq), self.dispatch_path(batch * seq)
        routed = routers.route(logits_ne, cfg, self.router_state(), fused=backend == "pallas")
        # Null experts and unused top-P slots -> the sentinel id E (computes nothing).
        experts_nk = jnp.minimum(routed.columns_nk, cfg.num_experts)
        weights_nk = routed.weights_nk * cfg.routed_scaling
        self._log_path(path, backend, fused=routed.expert_sort is not None, num_tokens=batch * seq)
        if path == "capacity":
            y_nd, dropped_fraction = self._capacity(x_nd, weights_nk, experts_nk, mask_n, logits_ne, routed)
        elif path == "expert-parallel":
            y_nd, dropped_fraction = expert_parallel.expert_parallel_dispatch(
                x_nd, weights_nk, experts_nk, mask_n, self.experts,
                capacity_factor=cfg.ep_capacity_factor, backend=backend, exchange=self._exchange,
            )
        else:
            y_nd = self._dropless(x_nd, weights_nk, experts_nk, backend, routed.expert_sort)
            dropped_fraction = jnp.zeros((), jnp.float32)
        if self.shared_experts is not None:
            y_nd = y_nd + self._shared(x_nd)
        aux = self._aux(logits_ne, routed.columns_nk, experts_nk, mask_n, token_weight_bt, batch)
        return y_nd.reshape(batch, seq, dim), aux.replace(
            dropped_fraction=jnp.asarray(dropped_fraction, jnp.float32)
        )

    @property
    def _exchange(self) -> str:
        return "all_gather" if self.cfg.expert_parallel == "all_gather" else "all_to_all"

    def _log_path(self, path: str, backend: str, *, fused: bool, num_tokens: int) -> None:
        # Runs once per trace under jit, so this names the path each compiled step takes.
        cfg = self.cfg
        log.info(
            "MoELayer: %s router (%s), %s dispatch (%s), E=%d (+%d null, %d shared) K=%d, "
            "%d tokens%s",
            cfg.router,
            "fused Pallas kernel" if fused else "XLA",
            path,
            backend if path != "capacity" else "batched",
            cfg.num_experts,
            cfg.num_null_experts,
            cfg.num_shared_experts,
            cfg.num_slots,
            num_tokens,
            f", expert axis {expert_parallel.expert_parallel_size()} ({self._exchange})"
            if path == "expert-parallel"
            else "",
        )

    def _dropless(self, x_nd, weights_nk, experts_nk, backend: str, expert_sort) -> jax.Array:
        num_experts = self.cfg.num_experts
        if backend == "tiles":
            return dispatch.dropless_tiled_dispatch(
                x_nd, weights_nk, experts_nk, self.experts.gathered, num_experts,
                tile=self.experts.tile_for(experts_nk.size, num_experts),
            )
        grouped = functools.partial(self.experts.grouped, backend=backend)
        return dispatch.dropless_dispatch(
            x_nd, weights_nk, experts_nk, grouped, num_experts, sort=expert_sort
        )

    def _capacity(self, x_nd, weights_nk, experts_nk, mask_n, logits_ne, routed):
        cfg = self.cfg
        # The router logit of each assignment ranks it under drop_policy='score' (DCMoE).
        scores_nk = jnp.take_along_axis(
            logits_ne, jnp.minimum(routed.columns_nk, cfg.num_router_columns - 1), axis=-1
        )
        return dispatch.capacity_dispatch(
            x_nd, weights_nk, experts_nk, self.experts.batched, cfg.num_experts,
            capacity_factor=cfg.capacity_factor, min_capacity=cfg.min_capacity,
            drop_policy=cfg.drop_policy, token_mask_n=mask_n, scores_nk=scores_nk,
        )

    def _shared(self, x_nd: jax.Array) -> jax.Array:
        shared_nd = self.shared_experts(x_nd)
        if self.shared_gate is not None:
            gate_n1 = jax.nn.sigmoid(self.shared_gate(x_nd.astype(jnp.float32)))
            shared_nd = shared_nd * gate_n1.astype(shared_nd.dtype)
        return shared_nd

    def _aux(
        self,
        logits_ne: jax.Array,
        columns_nk: jax.Array,
        experts_nk: jax.Array,
        mask_n: jax.Array,
        token_weight_bt: jax.Array | None,
        batch: int,
    ) -> MoEAux:
        """Losses over every router column (null experts balance too); loads over routed ones.

        The balance losses use the softmax over all columns whatever the router (as MaxText does
        for sigmoid routers), and are computed before any capacity drop (DCMoE).
        """
        num_experts, form = self.cfg.num_experts, self.cfg.balance_loss_form
        probs_ne = jax.nn.softmax(logits_ne, axis=-1)
        sums = routing.balance_sums(probs_ne, columns_nk, mask_n)
        token_weight_n = mask_n.astype(jnp.float32)
        if token_weight_bt is not None:
            token_weight_n = token_weight_n * token_weight_bt.reshape(-1).astype(jnp.float32)
        # Sentinel ids (== E) fall outside one_hot's range and count nowhere.
        counts_ne = jnp.sum(jax.nn.one_hot(experts_nk, num_experts, dtype=jnp.float32), axis=1)
        counts_ne = counts_ne * mask_n.astype(jnp.float32)[:, None]
        if form == "uni_moe_8e":
            balance = routing.balance_loss_uni_moe_8e(probs_ne)
        elif form == "hf_pooled":  # this layer alone; `MoEAux.reduce_layers` pools the layers
            balance = routing.balance_loss_pooled(*(s[None] for s in sums))
        else:
            balance = routing.balance_loss(probs_ne, columns_nk, mask_n)
        return MoEAux(
            balance_loss=balance,
            z_loss=routing.z_loss(logits_ne, mask_n),
            dcmoe_balance_loss=routing.balance_loss_dcmoe(logits_ne, columns_nk, token_weight_n),
            router_entropy=routing.router_entropy(probs_ne, mask_n),
            dropped_fraction=jnp.zeros((), jnp.float32),
            experts_per_token=counts_ne.sum() / jnp.maximum(mask_n.sum(), 1),
            expert_load=routing.expert_load(experts_nk, mask_n, num_experts),
            expert_counts_be=counts_ne.reshape(batch, -1, num_experts).sum(axis=1),
            balance_assignments_e=sums[0],
            balance_prob_sums_e=sums[1],
            balance_tokens=sums[2],
            balance_loss_form=form,
        )


def _checked_mask(
    token_mask_bt: jax.Array | None, token_weight_bt: jax.Array | None, batch: int, seq: int
) -> jax.Array:
    if token_mask_bt is None:
        token_mask_bt = jnp.ones((batch, seq), bool)
    if token_mask_bt.shape != (batch, seq):
        raise ValueError(f"token_mask must be [B, T]={batch, seq}, got {token_mask_bt.shape}")
    if token_weight_bt is not None and token_weight_bt.shape != (batch, seq):
        raise ValueError(f"token_weight must be [B, T]={batch, seq}, got {token_weight_bt.shape}")
    return token_mask_bt
