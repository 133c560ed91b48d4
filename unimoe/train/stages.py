"""What each training stage trains and what it starts from.

A stage config names
- `trains`: '+'-joined parts of the parameter tree (keys of `TRAINABLE_PARTS`);
- `init_from`: earlier stages whose final parameters are copied in, matched by path, later
  stages overriding earlier ones;
- `experts_from`: for MoE stages, the dense stages whose FFNs become expert 0, 1, ... of every MoE
  layer (Uni-MoE's stage 2 -> 3 upcycling: each expert is one modality-specific model's FFN).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimoe.convert import upcycle

log = logging.getLogger(__name__)

# Parameter-path regexes, matched against '/'-joined paths such as 'llm/layers/0/ffn/gate/kernel'.
TRAINABLE_PARTS: dict[str, str] = {
    'llm': r'^llm/',
    'vision': r'^(vision|image_head)/',
    'audio': r'^(audio|audio_head)/',
    'connectors': r'^(image_proj|audio_conn)/',
    'ffn': r'^llm/layers/\d+/ffn/',
    'lora': r'(^|/)lora',
    'router': r'/router/',
}


def path_str(path: Sequence[Any]) -> str:
    return '/'.join(str(p) for p in path)


def trainable_filter(trains: str) -> Callable[[tuple, Any], bool]:
    """An NNX filter selecting the Params of the named parts; unknown parts raise."""
    names = [n for n in trains.split('+') if n]
    unknown = [n for n in names if n not in TRAINABLE_PARTS]
    if unknown or not names:
        raise ValueError(
            f"stage.trains={trains!r}: unknown parts {unknown}; known: {sorted(TRAINABLE_PARTS)}"
        )
    pattern = re.compile('|'.join(f'(?:{TRAINABLE_PARTS[n]})' for n in names))

    def is_trainable(path: tuple, value: Any) -> bool:
        return isinstance(value, nnx.Param) and bool(pattern.search(path_str(path)))

    return is_trainable


def flat_params(raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flattens a raw (target-less) restored param tree into {'a/b/c': array}."""
    flat: dict[str, np.ndarray] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for key, child in node.items():
                visit(f'{prefix}/{key}' if prefix else str(key), child)
        else:
            flat[prefix.removesuffix('/value')] = np.asarray(node)

    visit('', raw)
    return flat


def load_params(
    model: nnx.Module,
    sources: Sequence[tuple[str, Mapping[str, np.ndarray]]],
    experts_from: Sequence[tuple[str, Mapping[str, np.ndarray]]] = (),
    upcycle_mode: str = 'per_source',
) -> dict[str, str]:
    """Copies parameters into `model` by path; returns {path: source name} of what was copied.

    `sources` are (name, flat params) applied in order. `experts_from` fills the expert banks of
    every MoE layer from the dense FFNs at the same layer (`unimoe.convert.upcycle`): with
    'per_source', expert `e` from `experts_from[e]`; with 'copies' or 'slices', all experts from the
    one source. A path found with a different shape is an error: silently skipping it would train
    from a half-initialised model.
    """
    state = nnx.state(model, nnx.Param)
    origin: dict[str, str] = {}
    for path, variable in nnx.to_flat_state(state):
        key = path_str(path)
        value = variable.get_value()
        for name, flat in sources:
            if key in flat:
                value = _checked(key, flat[key], value, name)
                origin[key] = name
        if experts_from:
            upcycled = upcycle.expert_bank_value(key, value.shape, experts_from, upcycle_mode)
            if upcycled is not None:
                value = upcycled
                origin[key] = '+'.join(name for name, _ in experts_from)
        # The State holds the model's own Variables, so this writes into the model.
        variable.set_value(jnp.asarray(value, dtype=variable.get_value().dtype))
    log.info('initialised %d params from earlier stages', len(origin))
    return origin


# The vocabulary axis of the token tables. A pretrained LM's tables may be shorter than the
# model's by the tokens appended to its tokenizer (the media placeholders of
# `data.tokenizer.PretrainedTokenizer`): its rows are copied, the appended rows keep their init.
VOCAB_AXES = {'llm/embed/embedding': 0, 'llm/lm_head/kernel': 1}


def _checked(key: str, value: np.ndarray, current: Any, source: str) -> np.ndarray:
    shape = tuple(current.shape)
    if tuple(value.shape) == shape:
        return value
    axis = VOCAB_AXES.get(key)
    if (
        axis is not None
        and value.ndim == len(shape)
        and all(value.shape[i] == shape[i] for i in range(len(shape)) if i != axis)
        and value.shape[axis] < shape[axis]
    ):
        log.info(
            'param %s: %s has %d vocabulary entries, the model %d; the %d appended ones keep '
            'their init',
            key,
            source,
            value.shape[axis],
            shape[axis],
            shape[axis] - value.shape[axis],
        )
        extended = np.array(current)
        rows = [slice(None)] * len(shape)
        rows[axis] = slice(0, value.shape[axis])
        extended[tuple(rows)] = value
        return extended
    raise ValueError(
        f"param {key}: stage {source!r} has shape {value.shape}, model expects {shape}"
    )
