"""Checks an experiment config before anything is built or compiled; errors say what to change.

`validate_experiment` runs `trainer.validate_stages` (the stage graph) and adds: the non-finite
policy, the MoE routing shape, the device mesh, the paths the config names, and whether every
stage's frozen parts are initialised by something (its `init_from` stages, `experts_from`, or
`config.pretrained`) rather than left at their random init.

Mesh: `config.mesh`, a dict {axis name: size} over `unimoe.parallel.mesh.MESH_AXES` (e.g.
`dict(data=4, expert=2)`, one size may be -1), must cover the device count; its `expert` axis
must divide the number of experts, and every stage's batch must split over the batch axes of
the sharding rules and over the processes.
"""

from __future__ import annotations

import math
import pathlib

import jax
import ml_collections

from unimoe import factory
from unimoe.config import StageConfig, stage_config, stage_order
from unimoe.convert import core as convert_core
from unimoe.data import json_builder, tasks as tasks_lib
from unimoe.moe import config as moe_config
from unimoe.parallel import mesh as mesh_lib, rules as rules_lib
from unimoe.train import nonfinite, trainer

# `config.pretrained` labels -> parts (the converted Whisper holds its decoder as the connector's
# body, but the connector's own projection starts new: stage 1 trains the connectors).
_PRETRAINED = {'llm': factory.TRAINABLE_PARTS['llm'], 'vision': ('vision',), 'audio': ('audio',)}


def validate_experiment(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError / FileNotFoundError naming the config field to change."""
    trainer.validate_stages(config)
    mode = config.get('nonfinite', 'stop')
    if mode not in nonfinite.MODES:
        raise ValueError(f"config.nonfinite={mode!r} must be one of {nonfinite.MODES}")
    _check_mesh(config, _check_moe(config))
    _check_paths(config)
    _check_initialisation(config)


def _check_moe(config: ml_collections.ConfigDict) -> moe_config.MoEConfig | None:
    """The MoE layers' config, or None when no stage has MoE layers."""
    names = stage_order(config)
    if not any(stage_config(config, name).moe for name in names):
        return None
    try:
        return moe_config.MoEConfig(**config.model.moe.to_dict())
    except TypeError as e:  # an unknown field
        raise ValueError(f"config.model.moe: {e}") from e
    except ValueError as e:  # MoEConfig names the field: name it where the user sets it
        raise ValueError(str(e).replace('MoEConfig.', 'config.model.moe.', 1)) from e


def _check_mesh(config: ml_collections.ConfigDict, moe: moe_config.MoEConfig | None) -> None:
    mesh = config.get('mesh')
    if not mesh:
        if jax.process_count() > 1:  # without a mesh a run trains on one device
            raise ValueError(
                f"this run has {jax.process_count()} processes but no config.mesh: set one "
                "(e.g. --config.mesh.data=-1) so the processes train one model together"
            )
        return
    sizes = mesh_lib.mesh_shape(dict(mesh), jax.device_count())
    expert = sizes['expert']
    if config.model.moe.num_experts % expert:
        raise ValueError(
            f"config.model.moe.num_experts={config.model.moe.num_experts} is not divisible by "
            f"the expert-parallel degree config.mesh.expert={expert}: each device must hold the "
            "same number of experts; change one of them"
        )
    rules = rules_lib.parse_rules(config.get('sharding_rules'))
    unknown = sorted({a for axes in rules.values() for a in axes} - set(mesh_lib.MESH_AXES))
    if unknown:
        raise ValueError(
            f"config.sharding_rules names mesh axes {unknown}; the mesh has {mesh_lib.MESH_AXES}"
        )
    expert_parallel = moe is not None and moe.expert_parallel != 'off' and expert > 1
    if expert_parallel and 'expert' not in rules['batch']:
        raise ValueError(
            f"config.sharding_rules.batch={rules['batch']} keeps the tokens whole over the "
            f"`expert` axis (config.mesh.expert={expert}), which expert parallelism splits them "
            "over: add 'expert', or set config.model.moe.expert_parallel='off'"
        )
    batch_shards = math.prod(sizes[a] for a in rules['batch'])
    for name in stage_order(config):
        batch_size = stage_config(config, name).batch_size
        if batch_size % batch_shards or batch_size % jax.process_count():
            raise ValueError(
                f"stage {name!r}: batch_size={batch_size} must be divisible by the "
                f"{batch_shards} batch shards of config.mesh={sizes} (sharding rule 'batch' -> "
                f"{rules['batch']}) and by the {jax.process_count()} processes"
            )


def _check_paths(config: ml_collections.ConfigDict) -> None:
    for label, directory in config.get('pretrained', {}).items():
        if directory and not (pathlib.Path(directory) / convert_core.META_FILE).is_file():
            raise FileNotFoundError(
                f"config.pretrained.{label}={directory!r} is not a converted checkpoint (no "
                f"{convert_core.META_FILE}): convert it with `python -m unimoe.convert from-hf`"
            )
    if config.get('tokenizer') and not pathlib.Path(config.tokenizer).is_file():
        raise FileNotFoundError(f"config.tokenizer={config.tokenizer!r} does not exist")
    if 'json_data' not in config:
        return
    json_data = config.json_data
    if json_data.get('media_root') and not pathlib.Path(json_data.media_root).exists():
        raise FileNotFoundError(
            f"config.json_data.media_root={json_data.media_root!r} does not exist"
        )
    for name in stage_order(config):
        for source in stage_config(config, name).json_sources:
            if not json_builder.builder(json_data.data_dir, source).is_prepared():
                raise FileNotFoundError(
                    f"stage {name!r} reads json_sources {source!r}, which is not prepared in "
                    f"config.json_data.data_dir={json_data.data_dir!r}: run "
                    "unimoe.data.json_builder.prepare first"
                )


def _needed(stage: StageConfig) -> set[str]:
    """The parts a stage's forward pass reads."""
    if stage.mode == 'classify_image':
        return {'vision'}
    if stage.mode == 'classify_audio':
        return {'audio'}
    needed = set(factory.TRAINABLE_PARTS['llm'])
    if stage.mode == 'chat' and not stage.json_sources:
        # JSON data's modalities are only known by reading it: the LM is checked, media are not.
        for task in stage.tasks:
            needed.update(factory.MODALITY_PARTS[tasks_lib.TASKS[task]])
    return needed


def _check_initialisation(config: ml_collections.ConfigDict) -> None:
    pretrained = {
        part
        for label, directory in config.get('pretrained', {}).items()
        if directory
        for part in _PRETRAINED.get(label, ())
    }
    defined: dict[str, set[str]] = {}
    for name in stage_order(config):
        stage = stage_config(config, name)
        sources = stage.init_from
        provided = set().union(*(defined[s] for s in sources)) if sources else set(pretrained)
        if stage.experts_from:
            provided.add('ffn')
        defined[name] = factory.trained_parts(stage.trains) | provided
        missing = sorted(_needed(stage) - defined[name])
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
