"""The experiment, typed: `configs/*.py`'s ConfigDict, with its command-line overrides, turned once
where it enters (`from_config_dict`) into frozen dataclasses that every later module reads.

Each section becomes its owner's config: `config.model` the models' `ModelSpec`, `config.data`
the built-in pipeline's `DataConfig`, `config.json_data` the JSON pipeline's `JsonDataConfig`
(without sources: each stage names its own), `config.stages` `StageConfig`s, `config.eval` an
`EvalConfig`, `config.mesh` and `config.sharding_rules` what `parallel.sharded.make_plan` reads.
Every section is typed even when another failed, and the problems are raised together as one
`config.ConfigError`, each naming the config path to change (`config.model.moe.top_k`,
`config.stages.s3_moe.steps`); the checks across sections (the stage graph, the mesh, the paths)
are `train.validate`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from unimoe import compilation_cache
from unimoe.config import (
    ConfigError,
    EvalConfig,
    StageConfig,
    exit_on_user_error,
    from_fields,
    loaded_config,
)
from unimoe.data import json_pipeline, pipeline, shapes
from unimoe.models.unimoe import ModelSpec
from unimoe.parallel import rules as rules_lib

# Sections with a typed config of their own.
_SECTIONS = (
    'model', 'data', 'stages', 'eval', 'json_data', 'mesh', 'sharding_rules', 'pretrained'
)
# Not the run's: read before the experiment is built (`unimoe.main` starts the processes with
# `distributed`) or by what reports it (`paper`: experiments/paper's table row; `target_device`:
# the device whose memory `train.lower --compile` plans for).
_EDGE_ONLY = ('distributed', 'paper', 'target_device')


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """A whole experiment. `stages` holds every stage `config.stages` defines, `stage_order` the
    ones that run, in order; `mesh` None trains on one device; `tokenizer` '' is the built-in
    tokenizer; `vocab_size` is the vocabulary of a model lowered without a tokenizer
    (`train.lower`); `nonfinite` the policy for NaN / Inf losses (`train.nonfinite.MODES`);
    `allow_changed_config` runs against a workdir trained with another config
    (`train.workdir.check_unchanged`); `compilation_cache_dir` is where compiled programs are
    kept between runs ('' : nowhere; `unimoe.compilation_cache`)."""

    seed: int
    model: ModelSpec
    data: pipeline.DataConfig
    stages: dict[str, StageConfig]
    stage_order: tuple[str, ...]
    eval: EvalConfig = EvalConfig()
    json_data: json_pipeline.JsonDataConfig | None = None
    tokenizer: str = ''
    pretrained: dict[str, str] = dataclasses.field(default_factory=dict)
    mesh: dict[str, int] | None = None
    sharding_rules: dict[str, tuple[str, ...]] = dataclasses.field(
        default_factory=lambda: rules_lib.parse_rules(None)
    )
    nonfinite: str = 'stop'
    log_every: int = 25
    checkpoint_every: int = 200
    vocab_size: int = 0
    # Go on in a workdir whose stages were trained with another config (`train.workdir`).
    allow_changed_config: bool = False
    compilation_cache_dir: str = dataclasses.field(default_factory=compilation_cache.default_dir)

    def __post_init__(self):
        for name in ('log_every', 'checkpoint_every'):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"config.{name}={getattr(self, name)} must be >= 1 (steps between two)"
                )

    def stage(self, name: str) -> StageConfig:
        if name not in self.stages:
            raise ValueError(
                f"stage {name!r} is not defined in config.stages: {sorted(self.stages)}"
            )
        return self.stages[name]

    def ordered_stages(self) -> list[StageConfig]:
        """The stages that run, in order."""
        return [self.stage(name) for name in self.stage_order]

    @property
    def pretrained_dirs(self) -> dict[str, str]:
        """The converted checkpoints the first stages start from ({label: directory}, set ones)."""
        return {label: directory for label, directory in self.pretrained.items() if directory}


def from_config_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> ExperimentConfig:
    """The typed experiment (from a config file's ConfigDict, or its plain-dict form); raises
    `ConfigError` listing every section's problem, each naming the config field to change."""
    raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    missing = [key for key in ('model', 'data', 'stages', 'stage_order') if key not in raw]
    if missing:
        raise ConfigError([f"config.{key} is missing: every config sets it" for key in missing])
    sections = {key: raw.pop(key, None) for key in _SECTIONS + _EDGE_ONLY}
    if raw.get('tokenizer') is None:
        raw.pop('tokenizer', None)
    problems: list[str] = []

    def typed(build: Callable[[], Any]) -> Any:
        try:
            return build()
        except ValueError as e:
            problems.append(str(e))
            return None

    model = typed(lambda: ModelSpec.from_dict(sections['model']))
    data = typed(lambda: from_fields(pipeline.DataConfig, 'config.data', sections['data']))
    if model is not None and data is not None:
        typed(lambda: _check_media_tokens(model, data))
    fields = dict(
        stages={
            name: typed(lambda name=name, stage=stage: StageConfig.from_config(name, stage))
            for name, stage in sections['stages'].items()
        },
        eval=typed(lambda: from_fields(EvalConfig, 'config.eval', sections['eval'] or {})),
        json_data=typed(lambda: _json_data(sections['json_data'], sections['data'])),
        mesh=typed(lambda: _mesh(sections['mesh'])),
        sharding_rules=rules_lib.parse_rules(sections['sharding_rules']),
        pretrained={k: str(v or '') for k, v in (sections['pretrained'] or {}).items()},
    )
    if model is not None and model.sound is not None:
        typed(lambda: _check_sound_bins(model.sound.num_mel_bins, data, fields['json_data']))
    experiment = typed(
        lambda: from_fields(ExperimentConfig, 'config', raw, model=model, data=data, **fields)
    )
    if problems:
        raise ConfigError(problems)
    return experiment


def from_config_flag(flag: Any) -> ExperimentConfig:
    """The typed experiment of a command line's `config_flags` flag; a mistake in the config file,
    its overrides or a section ends the program (one line per problem, exit code 2)."""
    try:
        return from_config_dict(loaded_config(flag))
    except ConfigError as e:
        exit_on_user_error(e)


def _check_media_tokens(model: ModelSpec, data: pipeline.DataConfig) -> None:
    """The tokenizer expands each media placeholder to `config.data.n_<media>_tokens` positions:
    exactly as many as the model's connectors emit."""
    if data.sound_tasks and model.sound is None:
        raise ValueError(
            f"config.data.sound_tasks={list(data.sound_tasks)} routes audio to the sound tower, "
            "but config.model.sound / sound_conn are empty: set them, or empty sound_tasks"
        )
    for name, count in model.num_media_tokens.items():
        expected = getattr(data, f'n_{name}_tokens')
        if count != expected:
            raise ValueError(
                f"config.data.n_{name}_tokens={expected}, but the model emits {count} {name} "
                "tokens (config.model.vision / audio_conn / sound_conn): the tokenizer must "
                "expand placeholders to match"
            )


def _check_sound_bins(
    num_mel_bins: int,
    data: pipeline.DataConfig | None,
    json_data: json_pipeline.JsonDataConfig | None,
) -> None:
    """BEATs reads the filterbanks the data computes: as many mel bins on every routed path."""
    feeds = []
    if data is not None and data.sound_tasks:
        feeds.append(('config.data', data.sound_mel_bins))
    if json_data is not None and json_data.sound_sources:
        feeds.append(('config.json_data', json_data.sound_mel_bins))
    for section, bins in feeds:
        if bins != num_mel_bins:
            raise ValueError(
                f"{section}.sound_mel_bins={bins}, but config.model.sound.num_mel_bins="
                f"{num_mel_bins}: BEATs reads the filterbanks the data computes"
            )


def _json_data(
    json_data: Mapping[str, Any] | None, data: Mapping[str, Any]
) -> json_pipeline.JsonDataConfig | None:
    """`config.json_data` with the shapes of `config.data` (what the model expects)."""
    if json_data is None:
        return None
    return from_fields(
        json_pipeline.JsonDataConfig,
        'config.json_data',
        json_data,
        **shapes.from_config_data(data),
        batch_size=data['batch_size'],
    )


def _mesh(mesh: Mapping[str, Any] | None) -> dict[str, int] | None:
    if not mesh:
        return None
    bad = {axis: size for axis, size in mesh.items() if not isinstance(size, int)}
    if bad:
        raise ValueError(f"config.mesh sizes must be integers (-1 for the rest), got {bad}")
    return dict(mesh)
