"""Dense FFNs -> MoE expert banks ("upcycling"); the router is left new (its init).

Modes, for each MoE layer of E experts:
- 'per_source': expert e is the FFN of dense model e (Uni-MoE stage 2 -> 3: one model fine-tuned
  per modality; BAM);
- 'copies': every expert is the same dense FFN (sparse upcycling, Komatsuzaki et al.);
- 'slices': the one dense FFN's hidden units are cut into E contiguous slices of F / E units,
  expert e taking slice e of gate/up columns and down rows (DCMoE); the sum of all experts is the
  dense FFN, since SwiGLU acts on each hidden unit separately.

Dense weights are `unimoe.models.llm.MLP`'s (gate, up [D, F]; down [F, D]); expert banks are
`ExpertBank`'s (w_gate_edf, w_up_edf [E, D, F_e]; w_down_efd [E, F_e, D]).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

MODES = ("per_source", "copies", "slices")

# Dense FFN weight -> expert-bank weight of the same layer (both [in, out] per expert).
DENSE_TO_EXPERT = {
    "gate/kernel": "experts/w_gate_edf",
    "up/kernel": "experts/w_up_edf",
    "down/kernel": "experts/w_down_efd",
}
_FFN_PATH = re.compile(r"^((?:llm/)?layers/\d+/ffn/)(.*)$")


def dense_source_key(expert_key: str) -> str | None:
    """'llm/layers/3/ffn/experts/w_up_edf' -> 'llm/layers/3/ffn/up/kernel'; None if not experts."""
    match = _FFN_PATH.match(expert_key)
    if not match:
        return None
    for dense, expert in DENSE_TO_EXPERT.items():
        if match.group(2) == expert:
            return match.group(1) + dense
    return None


def expert_weights(
    dense: Sequence[np.ndarray], projection: str, mode: str, num_experts: int
) -> np.ndarray:
    """One projection ('gate', 'up' or 'down') of E experts from dense FFN weights.

    dense: one weight per source model for 'per_source' (E of them), else exactly one.
    """
    if mode not in MODES:
        raise ValueError(f"upcycling mode must be one of {MODES}, got {mode!r}")
    if projection not in ("gate", "up", "down"):
        raise ValueError(f"projection must be 'gate', 'up' or 'down', got {projection!r}")
    wanted = num_experts if mode == "per_source" else 1
    if len(dense) != wanted:
        raise ValueError(
            f"upcycling mode {mode!r} with {num_experts} experts takes {wanted} dense FFN(s), "
            f"got {len(dense)}"
        )
    shapes = {tuple(w.shape) for w in dense}
    if len(shapes) != 1:
        raise ValueError(f"dense {projection} weights differ in shape: {sorted(shapes)}")
    if mode == "per_source":
        return np.stack(dense)
    if mode == "copies":
        return np.stack([dense[0]] * num_experts)
    hidden_axis = 0 if projection == "down" else 1
    hidden = dense[0].shape[hidden_axis]
    if hidden % num_experts:
        raise ValueError(
            f"slices: the dense FFN's {hidden} hidden units do not split into {num_experts} experts"
        )
    return np.stack(np.split(dense[0], num_experts, axis=hidden_axis))


def expert_bank_value(
    key: str,
    shape: tuple[int, ...],
    sources: Sequence[tuple[str, Mapping[str, np.ndarray]]],
    mode: str = "per_source",
) -> np.ndarray | None:
    """The upcycled value of expert-bank param `key` (shape `shape`) from named flat dense
    checkpoints, or None when `key` is not an expert-bank weight. Errors name key and source."""
    dense_key = dense_source_key(key)
    if dense_key is None:
        return None
    for name, flat in sources:
        if dense_key not in flat:
            raise ValueError(
                f"{key}: source {name!r} has no dense FFN weight {dense_key!r} to upcycle"
            )
    projection = dense_key.rsplit("/", 2)[-2]
    try:
        value = expert_weights([flat[dense_key] for _, flat in sources], projection, mode, shape[0])
    except ValueError as err:
        names = [name for name, _ in sources]
        raise ValueError(f"{key}: upcycling from {names}: {err}") from err
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"{key}: upcycling ({mode}) from {sources[0][0]!r} {dense_key} "
            f"{tuple(sources[0][1][dense_key].shape)} gives {value.shape}, model expects {shape}"
        )
    return value
