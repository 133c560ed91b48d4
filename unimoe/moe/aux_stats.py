"""The statistics an MoE layer returns beside its output, in one typed structure.

One `MoEAux` per layer from `MoELayer`; the decoder stacks its layers' (`stack`), adding a leading
L_moe axis, and sums the losses over it (`reduce_layers`): the trainer weights one sum per loss.
The one exception is the 'hf_pooled' balance loss, pooled over the layers' sums instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from unimoe.moe import routing

# Losses summed over MoE layers; every other field stays stacked per layer.
SUMMED = ("balance_loss", "z_loss", "dcmoe_balance_loss")
# Logged statistics with one value per stacked layer (`expert_load` has an expert axis besides).
_PER_LAYER = ("dropped_fraction", "experts_per_token", "router_entropy")
# One layer's share of the pooled balance loss (`routing.balance_sums`).
_BALANCE_SUMS = ("balance_assignments_e", "balance_prob_sums_e", "balance_tokens")


@struct.dataclass
class MoEAux:
    """Per layer (scalars unless noted); with a leading L_moe axis once stacked.

    balance_loss, z_loss, dcmoe_balance_loss: the router losses (`routing.py`), over every router
      column (null experts balance too), before any capacity drop; balance_loss in the layer
      config's `balance_loss_form` (`routing.balance_loss_uni_moe_8e` compares the forms).
    router_entropy: mean entropy of the valid tokens' router softmax.
    dropped_fraction: valid routed assignments dropped by capacity (0 when dropless).
    experts_per_token: mean number of routed experts a valid token runs (K for top-k, the dynamic
      k_n of top-P without its null experts).
    expert_load [E]: fraction of the valid tokens' routed assignments per expert.
    expert_counts_be [B, E]: routed assignments per example (per-modality expert usage).
    balance_assignments_e, balance_prob_sums_e [E + E_null], balance_tokens: the layer's
      `routing.balance_sums`, pooled over the layers when `balance_loss_form` is 'hf_pooled'.
    balance_loss_form: static (not a leaf): `reduce_layers` needs it and every layer has it.
    """

    balance_loss: jax.Array
    z_loss: jax.Array
    dcmoe_balance_loss: jax.Array
    router_entropy: jax.Array
    dropped_fraction: jax.Array
    experts_per_token: jax.Array
    expert_load: jax.Array
    expert_counts_be: jax.Array
    balance_assignments_e: jax.Array
    balance_prob_sums_e: jax.Array
    balance_tokens: jax.Array
    balance_loss_form: str = struct.field(pytree_node=False, default="switch_topk")

    @classmethod
    def no_layers(cls, batch: int, num_experts: int) -> MoEAux:
        """The stacked aux of a model without MoE layers (L_moe = 0)."""
        empty = jnp.zeros((0,), jnp.float32)
        return cls(
            **{name: empty for name in SUMMED},
            router_entropy=empty,
            dropped_fraction=empty,
            experts_per_token=empty,
            expert_load=jnp.zeros((0, num_experts), jnp.float32),
            expert_counts_be=jnp.zeros((0, batch, num_experts), jnp.float32),
            balance_assignments_e=jnp.zeros((0, num_experts), jnp.float32),
            balance_prob_sums_e=jnp.zeros((0, num_experts), jnp.float32),
            balance_tokens=empty,
        )

    @classmethod
    def stack(cls, layers: Sequence[MoEAux]) -> MoEAux:
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)

    def reduce_layers(self) -> MoEAux:
        """The losses summed over the stacked layers ('hf_pooled': the balance loss of the pooled
        sums instead); the other statistics stay per layer."""
        reduced = {name: getattr(self, name).sum(0) for name in SUMMED}
        if self.balance_loss_form == "hf_pooled":
            reduced["balance_loss"] = routing.balance_loss_pooled(
                *(getattr(self, name) for name in _BALANCE_SUMS)
            )
        return self.replace(**reduced)

    def metrics(self) -> dict[str, jax.Array]:
        """What a training step logs (per-example counts are reduced by modality instead)."""
        return {name: getattr(self, name) for name in (*SUMMED, "expert_load", *_PER_LAYER)}

    @staticmethod
    def metric_axes(layer_labels: Sequence[str]) -> dict[str, tuple]:
        """The axes of `metrics()`'s arrays (`train.metrics.Axes`), `layer_labels` naming the
        stacked MoE layers; the summed losses are scalars."""
        return {
            "expert_load": (tuple(layer_labels), "expert"),
            **{name: (tuple(layer_labels),) for name in _PER_LAYER},
        }
