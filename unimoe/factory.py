"""The model factory: builds an experiment's model, initialises it, loads a stage's parameters.

Everything that needs "the model of stage X" comes here: the trainer, evaluation, accounting,
lowering, conversion and the notebooks. It also owns the table of the model's parts (`PARTS`),
in which a stage's `trains` (`TRAINABLE_PARTS`), the initialisation check (`validate`), the
modalities' needs (`MODALITY_PARTS`) and the parameter accounting are all written.

A stage config names
- `trains`: '+'-joined names of `TRAINABLE_PARTS` (groups of parts) or `ADAPTERS`;
- `init_from`: earlier stages whose final parameters are copied in, matched by path, later
  stages overriding earlier ones;
- `experts_from`: for MoE stages, the dense stages whose FFNs become expert 0, 1, ... of every MoE
  layer (Uni-MoE's stage 2 -> 3 upcycling: each expert is one modality-specific model's FFN).
"""

from __future__ import annotations

import logging
import pathlib
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimoe.checkpoint import Checkpointer, path_str
from unimoe.config import ConfigError
from unimoe.convert import core as convert_core, upcycle
from unimoe.data import tasks as tasks_lib
from unimoe.data.tokenizer import TextTokenizer
from unimoe.experiment import ExperimentConfig
from unimoe.models import layer_stack
from unimoe.models.abstract import abstract_module
from unimoe.models.unimoe import ModelSpec, UniMoE, UniMoEConfig
from unimoe.parallel import rules as rules_lib, sharded

log = logging.getLogger(__name__)

# The model's parts: disjoint parameter-path regexes covering every parameter, matched against
# '/'-joined paths such as 'llm/layers/0/ffn/gate/kernel'. The FFNs are a part of their own:
# stage 2 trains them and stage 3 takes them from `experts_from`.
PARTS: dict[str, str] = {
    'llm': r'^llm/(?!(blocks/)?layers/\d+/ffn/)',  # the LM but its FFNs
    'ffn': r'^llm/(blocks/)?layers/\d+/ffn/',  # unrolled or scanned (`models.layer_stack`)
    'vision': r'^vision/',
    'image_head': r'^image_head/',
    'audio': r'^audio/',
    'audio_head': r'^audio_head/',
    'sound': r'^sound/',  # BEATs (`config.model.sound`)
    'sound_head': r'^sound_head/',
    'image_connector': r'^image_proj/',
    'audio_connector': r'^audio_conn/',
    'sound_connector': r'^sound_conn/',  # the Q-Former
}
# What a stage's `trains` names: groups of parts (an encoder with its probe head) ...
TRAINABLE_PARTS: dict[str, tuple[str, ...]] = {
    'llm': ('llm', 'ffn'),
    'ffn': ('ffn',),
    'vision': ('vision', 'image_head'),
    'audio': ('audio', 'audio_head'),
    'sound': ('sound', 'sound_head'),
    'connectors': ('image_connector', 'audio_connector', 'sound_connector'),
}
# ... or adapters inside the parts, which start new on purpose (LoRA's B is zero, a new router is
# near uniform), so training them initialises no part.
ADAPTERS: dict[str, str] = {'lora': r'(^|/)lora', 'router': r'/router/'}
# The parts a chat example of each modality reads besides the LM (audio the data routes to the
# sound tower reads `SOUND_PARTS` instead of the audio ones).
MODALITY_PARTS: dict[str, tuple[str, ...]] = {
    'image': ('vision', 'image_connector'),
    'video': ('vision', 'image_connector'),
    'speech': ('audio', 'audio_connector'),
    'audio': ('audio', 'audio_connector'),
    'image_speech': ('vision', 'image_connector', 'audio', 'audio_connector'),
    'text': (),
}
AUDIO_PARTS = ('audio', 'audio_connector')
SOUND_PARTS = ('sound', 'sound_connector')
_PART_PATTERNS = {name: re.compile(pattern) for name, pattern in PARTS.items()}


def part_of(path: str) -> str:
    """The `PARTS` entry a parameter path belongs to."""
    for name, pattern in _PART_PATTERNS.items():
        if pattern.search(path):
            return name
    raise ValueError(f"parameter {path!r} is in no part of unimoe.factory.PARTS: add it there")


def _trains_regex(name: str) -> str:
    if name in ADAPTERS:
        return ADAPTERS[name]
    return '|'.join(PARTS[part] for part in TRAINABLE_PARTS[name])


def trained_parts(trains: str) -> set[str]:
    """The parts a stage training `trains` defines (adapters define none)."""
    return {part for name in trains.split('+') for part in TRAINABLE_PARTS.get(name, ())}


def trainable_filter(trains: str) -> Callable[[tuple, Any], bool]:
    """An NNX filter selecting the Params of the named parts; unknown names raise."""
    names = [n for n in trains.split('+') if n]
    known = {*TRAINABLE_PARTS, *ADAPTERS}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(
            f"stage.trains={trains!r}: unknown parts {unknown}; known: {sorted(known)}"
        )
    pattern = re.compile('|'.join(f'(?:{_trains_regex(n)})' for n in names))

    def is_trainable(path: tuple, value: Any) -> bool:
        return isinstance(value, nnx.Param) and bool(pattern.search(path_str(path)))

    return is_trainable


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
    # Matched by unrolled names (`llm/layers/<i>/...`, as upcycling speaks them); a scanned LM's
    # stacked parameters, and a source saved from one, are viewed layer by layer and stacked back.
    sources = [(name, layer_stack.unrolled_params(flat)) for name, flat in sources]
    variables = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    current = layer_stack.unrolled_params({k: v.get_value() for k, v in variables.items()})
    values, origin = {}, {}
    for key, value in current.items():
        for name, flat in sources:
            if key in flat:
                value = _checked(key, flat[key], value, name)
                origin[key] = name
        if experts_from:
            upcycled = upcycle.expert_bank_value(key, value.shape, experts_from, upcycle_mode)
            if upcycled is not None:
                value = upcycled
                origin[key] = '+'.join(name for name, _ in experts_from)
        values[key] = value
    if current.keys() != variables.keys():
        lm = model.llm.cfg
        values = layer_stack.scanned_params(values, lm.block_period, lm.num_layers)
        origin = layer_stack.scanned_origin(origin, lm.block_period)
    for key, variable in variables.items():
        # The State holds the model's own Variables, so this writes into the model.
        variable.set_value(jnp.asarray(values[key], dtype=variable.get_value().dtype))
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
    raise ConfigError(
        [
            f"param {key}: {source!r} has shape {value.shape}, this config's model {shape}: it "
            "was trained or converted with another config.model; retrain or reconvert it with "
            "this one, or use a new --workdir"
        ]
    )


def is_lm_matrix(path: str, leaf: Any) -> bool:
    """An LM weight every use casts to the compute dtype: its matrices but the router's (which
    computes in float32)."""
    return path.startswith('llm/') and '/router/' not in path and getattr(leaf, 'ndim', 0) >= 2


def frozen_in_compute_dtype(rest: nnx.State, dtype: str) -> nnx.State:
    """`rest` (a stage's frozen state) with the LM's float32 matrices in `dtype`, the LM's compute
    dtype: every use casts them to it anyway (`nn.lora.Linear`, the expert matmuls, the token
    embedding), so the stage computes the same numbers (tested bit for bit) with half their
    memory. The router's weights (it computes in float32), vectors (norms, biases) and the
    encoders' weights keep their dtype. Concrete arrays or abstract ones (`train.lower`)."""

    def cast(key_path: Any, leaf: Any) -> Any:
        if not (is_lm_matrix(rules_lib.key_path_str(key_path), leaf) and leaf.dtype == jnp.float32):
            return leaf
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(dtype), sharding=leaf.sharding)
        return leaf.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, rest)


def params_into_abstract(
    model: UniMoE,
    params: Mapping[str, np.ndarray],
    source: str,
    cast: Callable[[str, np.ndarray], Any] = lambda path, value: value,
    seed: int = 0,
    missing_ok: tuple[str, ...] = (),
) -> UniMoE:
    """A concrete model from an abstract one (`build_model(abstract=True)`) and `params` holding
    every one of its parameters (unimoe paths, unrolled), never initialising them: the model of a
    converted checkpoint at paper scale costs the checkpoint's memory only. The vocabulary rows a
    tokenizer appends (`VOCAB_AXES`) are zeros; `cast(path, value)` may change a value's dtype
    (e.g. `frozen_in_compute_dtype`'s rule). The other state (RNG streams, router biases) is
    initialised as `build_model` would. A parameter `params` lacks (unless its path starts with
    one of `missing_ok`: zeros, for parts the source never had and its use never reads) or shapes
    differently is an error naming it and `source`."""
    graphdef, abstract_params, _ = nnx.split(model, nnx.Param, ...)
    variables = {path_str(p): v for p, v in nnx.to_flat_state(abstract_params)}
    current = layer_stack.unrolled_params({k: v.get_value() for k, v in variables.items()})
    filled = {}
    for key, leaf in current.items():
        if key not in params and not key.startswith(missing_ok):
            raise ValueError(f"{source}: has no param {key} (shape {tuple(leaf.shape)}) of this model")
        value = np.asarray(params[key]) if key in params else np.zeros(leaf.shape, leaf.dtype)
        if tuple(value.shape) != tuple(leaf.shape):
            value = _checked(key, value, np.zeros(leaf.shape, value.dtype), source)
        filled[key] = cast(key, value)
    if current.keys() != variables.keys():
        lm = model.llm.cfg
        filled = layer_stack.scanned_params(filled, lm.block_period, lm.num_layers)
    for key, variable in variables.items():
        variable.set_value(jnp.asarray(filled[key]))
    cfg = model.cfg
    # Only the small non-Param state is computed: XLA drops the unused parameter inits.
    rest = jax.jit(
        lambda: nnx.state(UniMoE(cfg, rngs=nnx.Rngs(seed)), nnx.Not(nnx.Param))
    )()
    return nnx.merge(graphdef, abstract_params, rest)


def build_model(
    spec: ModelSpec,
    tokenizer: TextTokenizer,
    *,
    moe: bool,
    lora_rank: int,
    seed: int,
    abstract: bool = False,
    plan: sharded.Plan | None = None,
) -> UniMoE:
    """The experiment's model (`config.model`, typed) for one stage kind; `abstract`: shapes only
    (no memory, no init); `plan`: every variable initialised directly in its shards on the plan's
    mesh."""
    model_cfg = UniMoEConfig.for_stage(
        spec,
        vocab_size=tokenizer.vocab_size,
        moe=moe,
        lora_rank=lora_rank,
        token_ids=dict(
            image_token_id=tokenizer.image_id,
            video_token_id=tokenizer.video_id,
            audio_token_id=tokenizer.audio_id,
        ),
        num_labels=(tasks_lib.NUM_IMAGE_LABELS, tasks_lib.NUM_AUDIO_LABELS),
    )
    if abstract:
        return abstract_module(lambda rngs: UniMoE(model_cfg, rngs=rngs), seed)
    if plan is not None:
        return sharded.init_module(plan, lambda rngs: UniMoE(model_cfg, rngs=rngs), seed)
    return UniMoE(model_cfg, rngs=nnx.Rngs(seed))


def stage_checkpointer(workdir: pathlib.Path, name: str) -> Checkpointer:
    return Checkpointer(workdir / name / 'checkpoints')


def final_params(workdir: pathlib.Path, name: str) -> dict[str, np.ndarray]:
    """The parameters a finished stage defined: those it trained or inherited from its sources.

    A stage's checkpoint holds every parameter of its model, but the ones it neither trained nor
    loaded are its random init: a stage starting from `s0_llm` and `s0_vision` must take the LM
    from the first and only the ViT from the second.
    """
    with stage_checkpointer(workdir, name) as ckpt:
        if not ckpt.is_done():
            raise ValueError(
                f"stage {name!r} is named as a source but has not finished in {workdir}"
            )
        flat, defined = ckpt.final_params()
    # Unrolled names whatever the stage's layout, as `load_params` matches them.
    return layer_stack.unrolled_params({path: flat[path] for path in defined})


def build_stage_model(
    experiment: ExperimentConfig,
    name: str,
    workdir: pathlib.Path,
    tokenizer: TextTokenizer,
    plan: sharded.Plan | None = None,
) -> tuple[UniMoE, dict[str, str]]:
    """The model of stage `name`, initialised from the stages its config names.

    Also returns {param path: source stage} for every parameter that came from a source.
    """
    stage = experiment.stage(name)
    model = build_model(
        experiment.model,
        tokenizer,
        moe=stage.moe,
        lora_rank=stage.lora_rank,
        seed=experiment.seed,
        plan=plan,
    )
    sources = [(src, final_params(workdir, src)) for src in stage.init_from]
    if experiment.pretrained_dirs and not sources:
        # The first stages start from the converted checkpoints (`python -m unimoe.convert`).
        sources = [('pretrained', convert_core.pretrained_params(experiment.pretrained_dirs))]
    experts = [(src, final_params(workdir, src)) for src in stage.experts_from]
    return model, load_params(model, sources, experts, upcycle_mode=stage.upcycle_mode)
