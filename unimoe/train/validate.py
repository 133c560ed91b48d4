"""Checks an experiment before anything is built or compiled; errors say what to change.

`validate_experiment` types the ConfigDict (`experiment.from_config_dict`: every section and
field) and checks across sections: the stage graph, the non-finite policy, the device mesh, the
paths the config names, and whether every stage's frozen parts are initialised by something (its
`init_from` stages, `experts_from`, or `config.pretrained`) rather than left at their random
init.

Mesh: `config.mesh`, a dict {axis name: size} over `unimoe.parallel.mesh.MESH_AXES` (e.g.
`dict(data=4, expert=2)`, one size may be -1), must cover the device count; its `expert` axis
must divide the number of experts, and every stage's batch must split over the batch axes of
the sharding rules and over the processes.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import jax
import ml_collections

from unimoe import experiment as experiment_lib, factory
from unimoe.config import ConfigError, StageConfig, errors_at
from unimoe.convert import core as convert_core, upcycle
from unimoe.data import json_builder, pipeline, tasks as tasks_lib
from unimoe.experiment import ExperimentConfig
from unimoe.nn import sharding
from unimoe.parallel import mesh as mesh_lib
from unimoe.train import nonfinite, trainer

# `config.pretrained` labels -> parts (the converted Whisper holds its decoder as the connector's
# body, but the connector's own projection starts new: stage 1 trains the connectors).
_PRETRAINED = {
    'llm': factory.TRAINABLE_PARTS['llm'],
    'vision': ('vision',),
    'audio': ('audio',),
    'sound': ('sound',),  # `convert from-beats`
}
# `convert from-unimoe`: a whole released Uni-MoE model (configs/unimoe_released.py); not offered
# as the fix for one missing part.
_PRETRAINED_WHOLE = {
    'released': tuple(sorted({p for parts in factory.TRAINABLE_PARTS.values() for p in parts})),
}


def validate_experiment(config: ml_collections.ConfigDict) -> ExperimentConfig:
    """The typed, checked experiment. Raises `ConfigError` listing every problem found (each
    naming the config field to change): first those of typing the sections, then those across
    them."""
    experiment = experiment_lib.from_config_dict(config)
    problems = experiment_problems(experiment)
    if problems:
        raise ConfigError(problems)
    return experiment


def experiment_problems(experiment: ExperimentConfig) -> list[str]:
    """Every problem of a typed experiment: the stage graph's and the run's, then (on stages that
    exist) the mesh's and the paths', then (on a sound graph) whether every stage's parts are
    initialised, which a broken graph would report twice."""
    graph = _stage_problems(experiment)
    checks = [_run_problems]
    if all(name in experiment.stages for name in experiment.stage_order):
        checks += [_check_mesh, _check_paths]
    if not graph:
        checks.append(_check_initialisation)
    problems = list(graph)
    for check in checks:
        try:
            problems += check(experiment) or []
        except ValueError as e:
            problems.append(str(e))
    return problems


def validate_stages(experiment: ExperimentConfig) -> None:
    """Raises `ConfigError` if the stage graph cannot run (every problem names its stage)."""
    problems = _stage_problems(experiment)
    if problems:
        raise ConfigError(problems)


def _stage_problems(experiment: ExperimentConfig) -> list[str]:
    problems, seen = [], []
    for name in experiment.stage_order:
        if name in seen:
            problems.append(f"config.stage_order names {name!r} twice: list each stage once")
            continue
        try:
            _check_stage(experiment, name, seen)
        except ValueError as e:
            problems.append(str(e))
        seen.append(name)
    return problems


def _check_stage(experiment: ExperimentConfig, name: str, seen: list[str]) -> None:
    """Raises naming the stage's first problem."""
    if name not in experiment.stages:
        raise ValueError(f"stage_order names {name!r}, which config.stages does not define")
    stage = experiment.stage(name)
    where = f'config.stages.{name}'
    factory.trainable_filter(stage.trains)
    with errors_at(where, 'LossConfig'):
        trainer.stage_loss_config(stage)
    missing = [s for s in stage.init_from + stage.experts_from if s not in seen]
    if missing:
        raise ValueError(f"stage {name!r} starts from {missing[0]!r}, which does not run before it")
    _check_upcycling(experiment, stage)
    if stage.steps < 1:
        raise ValueError(f"stage {name!r}: steps={stage.steps} must be >= 1")
    with errors_at(where, 'OptimConfig'):  # learning rate, warmup, clipping, as the stage runs them
        trainer.stage_optim_config(stage)
    if stage.batch_size < 1:
        raise ValueError(f"{where}.batch_size={stage.batch_size} must be >= 1")
    if stage.micro_batches < 1 or stage.batch_size % stage.micro_batches:
        raise ValueError(
            f"{where}.micro_batches={stage.micro_batches} must be >= 1 and divide "
            f"batch_size={stage.batch_size}"
        )
    unknown = _unknown_tasks(f'{where}.tasks', stage.tasks)
    if unknown and not stage.json_sources:
        raise ValueError(unknown)
    if not stage.json_sources:
        try:  # a classify_sound stage reads only audio the data routes to BEATs, and the reverse
            pipeline.check_audio_route(experiment.data, stage.tasks, stage.mode)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    _check_tokenizer(experiment, stage)


def _unknown_tasks(where: str, tasks: tuple[str, ...]) -> str | None:
    unknown = sorted(set(tasks) - set(tasks_lib.TASKS))
    if not unknown:
        return None
    return f"{where} names unknown tasks {unknown}; the built-in ones: {sorted(tasks_lib.TASKS)}"


def _run_problems(experiment: ExperimentConfig) -> list[str]:
    """The non-finite policy and the evaluation settings."""
    problems = []
    if experiment.nonfinite not in nonfinite.MODES:
        problems.append(
            f"config.nonfinite={experiment.nonfinite!r} must be one of {nonfinite.MODES}"
        )
    if experiment.tokenizer and experiment.eval.stages:
        problems.append(
            "config.eval.stages evaluates on the built-in dataset, which needs the built-in "
            "tokenizer: set config.eval.stages='' when config.tokenizer is set"
        )
    not_run = [s for s in experiment.eval.stages if s not in experiment.stage_order]
    if not_run:
        problems.append(
            f"config.eval.stages names {not_run}, which config.stage_order does not run: drop "
            "them from config.eval.stages, or add them to config.stage_order"
        )
    unknown = _unknown_tasks('config.eval.tasks', experiment.eval.tasks)
    if unknown:
        problems.append(unknown)
    for name in ('batch_size', 'max_new_tokens'):
        if getattr(experiment.eval, name) < 1:
            problems.append(f"config.eval.{name}={getattr(experiment.eval, name)} must be >= 1")
    return problems


def _check_upcycling(experiment: ExperimentConfig, stage: StageConfig) -> None:
    experts, mode = stage.experts_from, stage.upcycle_mode
    num_experts = experiment.model.llm.moe.num_experts
    if mode not in upcycle.MODES:
        raise ValueError(
            f"stage {stage.name!r}: upcycle_mode={mode!r} is not one of {upcycle.MODES}"
        )
    wanted = num_experts if mode == 'per_source' else 1
    if experts and (not stage.moe or len(experts) != wanted):
        raise ValueError(
            f"stage {stage.name!r}: experts_from names {len(experts)} stages; upcycle_mode="
            f"{mode!r} needs moe=True and {wanted} source(s) (model.moe.num_experts="
            f"{num_experts})"
        )


def _check_tokenizer(experiment: ExperimentConfig, stage: StageConfig) -> None:
    """Built-in data is tokenized by the built-in tokenizer; Uni-MoE JSON data by the LM's own."""
    if stage.json_sources and not (experiment.tokenizer and experiment.json_data):
        raise ValueError(
            f"stage {stage.name!r} reads json_sources: set config.tokenizer (the LM's "
            "tokenizer.model / tokenizer.json) and config.json_data (data_dir, media_root, ...)"
        )
    if not stage.json_sources and experiment.tokenizer:
        raise ValueError(
            f"stage {stage.name!r} reads the built-in dataset, which needs the built-in "
            "tokenizer: unset config.tokenizer, or give the stage json_sources"
        )


def _check_mesh(experiment: ExperimentConfig) -> None:
    if not experiment.mesh:
        if jax.process_count() > 1:  # without a mesh a run trains on one device
            raise ValueError(
                f"this run has {jax.process_count()} processes but no config.mesh: set one "
                "(e.g. --config.mesh.data=-1) so the processes train one model together"
            )
        return
    sizes = mesh_lib.mesh_shape(experiment.mesh, jax.device_count())
    expert, moe = sizes['expert'], experiment.model.llm.moe
    if moe.num_experts % expert:
        raise ValueError(
            f"config.model.moe.num_experts={moe.num_experts} is not divisible by "
            f"the expert-parallel degree config.mesh.expert={expert}: each device must hold the "
            "same number of experts; change one of them"
        )
    rules = experiment.sharding_rules
    unknown = sorted({a for axes in rules.values() for a in axes} - set(mesh_lib.MESH_AXES))
    if unknown:
        raise ValueError(
            f"config.sharding_rules names mesh axes {unknown}; the mesh has {mesh_lib.MESH_AXES}"
        )
    has_moe = any(stage.moe for stage in experiment.ordered_stages())
    expert_parallel = has_moe and moe.expert_parallel != 'off' and expert > 1
    # The MoE layer splits its tokens over these (`expert_parallel._check_split`).
    if expert_parallel and 'expert' not in sharding.token_axes(mesh_lib.MESH_AXES, rules):
        raise ValueError(
            f"config.sharding_rules.batch={rules['batch']} (and .seq={rules['seq']}) keeps the "
            f"tokens whole over the `expert` axis (config.mesh.expert={expert}), which expert "
            "parallelism splits them over: add 'expert', or set "
            "config.model.moe.expert_parallel='off'"
        )
    batch_shards = math.prod(sizes[a] for a in rules['batch'])
    for stage in experiment.ordered_stages():
        micro = stage.batch_size // max(stage.micro_batches, 1)  # rows of one accumulated slice
        if micro % batch_shards or stage.batch_size % jax.process_count():
            raise ValueError(
                f"stage {stage.name!r}: batch_size={stage.batch_size} / micro_batches="
                f"{stage.micro_batches} must be divisible by the {batch_shards} batch shards of "
                f"config.mesh={sizes} (sharding rule 'batch' -> {rules['batch']}), batch_size by "
                f"the {jax.process_count()} processes"
            )


def _sound_config_problems(sound: Any, meta: pathlib.Path) -> list[str]:
    """`config.model.sound` against the converted BEATs' own cfg: fields that change no shape
    (max_distance, deep_norm, gru_rel_pos, ...) would otherwise load and compute differently."""
    converted = json.loads(meta.read_text()).get('configs', {}).get('sound', {})
    differ = {k: v for k, v in converted.items() if getattr(sound, k, v) != v}
    return [
        f"config.model.sound.{key}={getattr(sound, key)!r}, but the BEATs converted in "
        f"{meta.parent} has {value!r}: set it to the checkpoint's value"
        for key, value in sorted(differ.items())
    ]


def _check_paths(experiment: ExperimentConfig) -> list[str]:
    """Every path the config names that is missing or not what it should be."""
    problems = []
    for label, directory in experiment.pretrained_dirs.items():
        meta = pathlib.Path(directory) / convert_core.META_FILE
        if not meta.is_file():
            command = 'from-beats FILE.pt' if label == 'sound' else 'from-hf HF_DIR'
            problems.append(
                f"config.pretrained.{label}={directory!r} is not a converted checkpoint (no "
                f"{convert_core.META_FILE}): convert it with `python -m unimoe.convert "
                f"{command} {directory}`"
            )
        elif label == 'sound' and experiment.model.sound is not None:
            problems += _sound_config_problems(experiment.model.sound, meta)
    tokenizer = experiment.tokenizer
    if tokenizer and not pathlib.Path(tokenizer).is_file():
        problems.append(f"config.tokenizer={tokenizer!r} does not exist")
    json_data = experiment.json_data
    if json_data is None:
        return problems
    if json_data.media_root and not pathlib.Path(json_data.media_root).exists():
        problems.append(f"config.json_data.media_root={json_data.media_root!r} does not exist")
    for stage in experiment.ordered_stages():
        for source in stage.json_sources:
            if not json_builder.builder(json_data.data_dir, source).is_prepared():
                problems.append(
                    f"stage {stage.name!r} reads json_sources {source!r}, which is not prepared in "
                    f"config.json_data.data_dir={json_data.data_dir!r}: run "
                    "unimoe.data.json_builder.prepare first"
                )
    return problems


def _needed(stage: StageConfig, sound_tasks: tuple[str, ...]) -> set[str]:
    """The parts a stage's forward pass reads (the audio of `sound_tasks` through the sound
    tower)."""
    encoder = {'classify_image': 'vision', 'classify_audio': 'audio', 'classify_sound': 'sound'}
    if stage.mode in encoder:
        return {encoder[stage.mode]}
    needed = set(factory.TRAINABLE_PARTS['llm'])
    if stage.mode == 'chat' and not stage.json_sources:
        # JSON data's modalities are only known by reading it: the LM is checked, media are not.
        for task in stage.tasks:
            parts = factory.MODALITY_PARTS[tasks_lib.TASKS[task]]
            if task in sound_tasks:
                parts = tuple(p for p in parts if p not in factory.AUDIO_PARTS)
                parts += factory.SOUND_PARTS
            needed.update(parts)
    return needed


def _check_initialisation(experiment: ExperimentConfig) -> None:
    pretrained = {
        part
        for label in experiment.pretrained_dirs
        for part in {**_PRETRAINED, **_PRETRAINED_WHOLE}.get(label, ())
    }
    defined: dict[str, set[str]] = {}
    for stage in experiment.ordered_stages():
        name = stage.name
        sources = stage.init_from
        provided = set().union(*(defined[s] for s in sources)) if sources else set(pretrained)
        if stage.experts_from:
            provided.add('ffn')
        defined[name] = factory.trained_parts(stage.trains) | provided
        missing = sorted(_needed(stage, experiment.data.sound_tasks) - defined[name])
        if missing:
            labels = sorted(k for k, parts in _PRETRAINED.items() if set(parts) & set(missing))
            parts = sorted(
                k for k, parts in factory.TRAINABLE_PARTS.items() if set(parts) & set(missing)
            )
            fix = f"Set config.pretrained.{{{','.join(labels)}}}, or add" if labels else 'Add'
            raise ValueError(
                f"stage {name!r} ({stage.mode}) runs {', '.join(missing)} frozen "
                f"(trains={stage.trains!r}), but nothing initialises them: not its init_from "
                f"({','.join(stage.init_from) or 'none'}), experts_from or config.pretrained. "
                f"{fix} to init_from stages that train {' or '.join(parts)}, "
                "or train them in this stage"
            )
