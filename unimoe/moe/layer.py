"""The MoE FFN layer: router + dispatch + expert bank, returning (y, aux statistics)."""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from unimoe.models.lora import Linear, LoRAConfig
from unimoe.moe import dispatch, routing
from unimoe.moe.experts import GROUPED_IMPLS, ExpertBank

log = logging.getLogger(__name__)

ROUTERS = ("topk_softmax", "softmax_topk")
DISPATCH_IMPLS = ("dropless",)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Routing and dispatch of one MoE FFN.

    router: 'topk_softmax' = softmax over the top-k logits (Uni-MoE 4E, Mixtral);
      'softmax_topk' = softmax over all experts then top-k, renormalized when `renormalize`
      (Uni-MoE 8E, Switch, Qwen2-MoE); `renormalize` only affects 'softmax_topk'.
    ffn_dim: width of each expert; 0 means the LM's dense ffn_dim (experts upcycled from it).
    impl: dispatch strategy; 'dropless' = sort by expert + grouped matmul, no token dropped.
    grouped_impl: the grouped matmul of dropless dispatch (`ExpertBank.grouped`): 'tiles',
      'ragged_dot', or 'auto' = 'tiles' on CPU (ragged_dot computes every group densely there)
      and 'ragged_dot' on accelerators.
    """

    num_experts: int = 4
    top_k: int = 2
    ffn_dim: int = 0
    router: str = "topk_softmax"
    renormalize: bool = True
    impl: str = "dropless"
    grouped_impl: str = "auto"

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"MoEConfig.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}"
            )
        if self.ffn_dim < 0:
            raise ValueError(f"MoEConfig.ffn_dim must be >= 0 (0 = the LM's), got {self.ffn_dim}")
        if self.router not in ROUTERS:
            raise ValueError(f"MoEConfig.router must be one of {ROUTERS}, got {self.router!r}")
        if self.impl not in DISPATCH_IMPLS:
            raise ValueError(f"MoEConfig.impl must be one of {DISPATCH_IMPLS}, got {self.impl!r}")
        if self.grouped_impl not in ("auto", *GROUPED_IMPLS):
            raise ValueError(
                f"MoEConfig.grouped_impl must be 'auto' or one of {GROUPED_IMPLS}, "
                f"got {self.grouped_impl!r}"
            )

    def resolved_grouped_impl(self) -> str:
        if self.grouped_impl != "auto":
            return self.grouped_impl
        return "tiles" if jax.default_backend() == "cpu" else "ragged_dot"


class MoELayer(nnx.Module):
    """Routes each token to top_k of num_experts SwiGLU experts and mixes their outputs.

    The router is a bias-free `Linear(dim, E)` evaluated in float32 and never gets LoRA (it is
    trained fully in Uni-MoE stage 3); experts get LoRA when `lora.rank > 0`.
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
    ):
        self.cfg = cfg
        self.router = Linear(dim, cfg.num_experts, rngs=rngs)
        self.experts = ExpertBank(
            cfg.num_experts, dim, cfg.ffn_dim or ffn_dim, lora=lora, rngs=rngs
        )

    def __call__(
        self, x_btd: jax.Array, token_mask_bt: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x_btd -> (y_btd, aux); padding tokens (mask False) count in no loss or load."""
        batch, seq, dim = x_btd.shape
        if token_mask_bt is None:
            token_mask_bt = jnp.ones((batch, seq), bool)
        if token_mask_bt.shape != (batch, seq):
            raise ValueError(f"token_mask must be [B, T]={batch, seq}, got {token_mask_bt.shape}")
        cfg = self.cfg
        x_nd = x_btd.reshape(batch * seq, dim)
        mask_n = token_mask_bt.reshape(batch * seq)
        logits_ne = self.router(x_nd.astype(jnp.float32))
        if cfg.router == "topk_softmax":
            weights_nk, experts_nk = routing.route_topk_softmax(logits_ne, cfg.top_k)
        else:
            weights_nk, experts_nk = routing.route_softmax_topk(
                logits_ne, cfg.top_k, cfg.renormalize
            )

        # Runs once per trace under jit, so this names the path each compiled step takes.
        grouped_impl = cfg.resolved_grouped_impl()
        log.info(
            "MoELayer: %s dispatch (%s), E=%d K=%d, %d tokens",
            cfg.impl,
            grouped_impl,
            cfg.num_experts,
            cfg.top_k,
            batch * seq,
        )
        y_nd = dispatch.dropless_dispatch(
            x_nd,
            weights_nk,
            experts_nk,
            functools.partial(self.experts.grouped, impl=grouped_impl),
            cfg.num_experts,
        )
        aux = {
            "balance_loss": routing.balance_loss(
                jax.nn.softmax(logits_ne, axis=-1), experts_nk, mask_n
            ),
            "z_loss": routing.z_loss(logits_ne, mask_n),
            "expert_load": routing.expert_load(experts_nk, mask_n, cfg.num_experts),
        }
        return y_nd.reshape(batch, seq, dim), aux
