"""Which experts each modality's tokens use, layer by layer (Uni-MoE's specialization figures)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from unimoe.models.unimoe import UniMoE


@nnx.jit
def _expert_counts(model: UniMoE, arrays: Mapping[str, Any]):
    return model(arrays)[1].expert_counts_be


def expert_usage_by_layer(
    model: UniMoE, batches: Iterable[Mapping[str, Any]]
) -> dict[str, np.ndarray]:
    """{modality name: float64 [layers, experts]}: each layer's share of that modality's routed
    assignments per expert (rows sum to 1), over every non-padding token of the valid examples.

    `batches` are `unimoe.data.pipeline.collate` batches (their `modality_name` and `valid` say
    which rows count). Layers are the model's MoE layers, in order.
    """
    counts: dict[str, np.ndarray] = {}
    for batch in batches:
        arrays = {k: v for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype != object}
        counts_lbe = np.asarray(_expert_counts(model, arrays), np.float64)
        for row, (modality, valid) in enumerate(zip(batch['modality_name'], batch['valid'])):
            if valid:
                counts[modality] = counts.get(modality, 0.0) + counts_lbe[:, row]
    return {m: c / np.maximum(c.sum(-1, keepdims=True), 1.0) for m, c in counts.items()}
