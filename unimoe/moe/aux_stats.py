"""The statistics an MoE layer returns beside its output, in one typed structure.

One `MoEAux` per layer from `MoELayer`; the decoder stacks its layers' (`stack`), adding a leading
L_moe axis, and sums the losses over it (`reduce_layers`): the trainer weights one sum per loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

# Losses summed over MoE layers; every other field stays stacked per layer.
SUMMED = ("balance_loss", "z_loss", "dcmoe_balance_loss")
# Logged statistics with one value per stacked layer (`expert_load` has an expert axis besides).
_PER_LAYER = ("dropped_fraction", "experts_per_token", "router_entropy")


@struct.dataclass
class MoEAux:
    """Per layer (scalars unless noted); with a leading L_moe axis once stacked.

    balance_loss, z_loss, dcmoe_balance_loss: the router losses (`routing.py`), over every router
      column (null experts balance too), before any capacity drop.
    router_entropy: mean entropy of the valid tokens' router softmax.
    dropped_fraction: valid routed assignments dropped by capacity (0 when dropless).
    experts_per_token: mean number of routed experts a valid token runs (K for top-k, the dynamic
      k_n of top-P without its null experts).
    expert_load [E]: fraction of the valid tokens' routed assignments per expert.
    expert_counts_be [B, E]: routed assignments per example (per-modality expert usage).
    """

    balance_loss: jax.Array
    z_loss: jax.Array
    dcmoe_balance_loss: jax.Array
    router_entropy: jax.Array
    dropped_fraction: jax.Array
    experts_per_token: jax.Array
    expert_load: jax.Array
    expert_counts_be: jax.Array

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
        )

    @classmethod
    def stack(cls, layers: Sequence[MoEAux]) -> MoEAux:
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)

    def reduce_layers(self) -> MoEAux:
        """The losses summed over the stacked layers; the other statistics stay per layer."""
        return self.replace(**{name: getattr(self, name).sum(0) for name in SUMMED})

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
