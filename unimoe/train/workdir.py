"""What a workdir remembers of the runs that used it, so that a run cannot quietly change it.

Each stage records, when it first starts, the config fields that define what it learns
(`<workdir>/<stage>/stage_config.json`: the model, the seed, the stage's own fields and the shapes
and choice of its data, each under its config path). A later run whose config differs in any of
them for a stage it would resume, skip or start from is refused before anything is written,
with every differing field listed (`check_unchanged`); `config.allow_changed_config=True` goes on
anyway, keeping finished stages as they were trained and noting the change in the record of a
stage it resumes. Fields that say where things are or how a run is watched (`data_dir`,
`media_root`, `worker_count`, `on_error`, the mesh, evaluation, logging) may change freely.

`config.json` is the config of the latest run that got past these checks; a differing earlier one
is kept beside it as `config.<UTC time>.json`, so the workdir's history stays complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from typing import Any

import ml_collections

from unimoe.config import ConfigError
from unimoe.experiment import ExperimentConfig
from unimoe.models.unimoe import ModelSpec

log = logging.getLogger(__name__)

RECORD_FILE = 'stage_config.json'
RUN_CONFIG_FILE = 'config.json'
# Where the data is and how it is read, not what it is: free to change between runs.
_NOT_DEFINING = {'data_dir', 'media_root', 'worker_count', 'on_error'}
# Per stage, the data section's own values are replaced by the stage's (trainer.stage_loader).
_STAGE_OWNED = {'batch_size', 'sources', 'weights', 'seed'}
_MAX_SHOWN = 80  # characters of a value shown in a difference


def stage_definition(experiment: ExperimentConfig, name: str) -> dict[str, Any]:
    """{config path: JSON value} of every field that defines what stage `name` learns."""
    stage = experiment.stage(name)
    data = experiment.json_data if stage.json_sources else experiment.data
    data_key = 'json_data' if stage.json_sources else 'data'
    sections = {
        'seed': experiment.seed,
        'model': _model_fields(experiment.model),
        f'stages.{name}': dataclasses.asdict(stage),
        data_key: {
            k: v
            for k, v in dataclasses.asdict(data).items()
            if k not in _NOT_DEFINING | _STAGE_OWNED
        },
    }
    return _flat('config', json.loads(json.dumps(sections)))


def _model_fields(spec: ModelSpec) -> dict[str, Any]:
    """`config.model`'s sections as the config spells them (the LM's MoE and LoRA are
    `config.model.moe` / `.lora`; its vocabulary is the tokenizer's)."""
    fields = dataclasses.asdict(spec)
    llm = fields['llm']
    fields['moe'], fields['lora'] = llm.pop('moe'), llm.pop('lora')
    # remat changes what is recomputed, not what is learned.
    del llm['vocab_size'], llm['moe_layers'], llm['remat']
    return fields


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, child in value.items():
        flat.update(_flat(f'{prefix}.{key}', child))
    return flat


def _record_path(workdir: pathlib.Path, name: str) -> pathlib.Path:
    return workdir / name / RECORD_FILE


def _stages_used(experiment: ExperimentConfig) -> list[str]:
    """The stages a run trains, skips or takes weights from, in order, each once."""
    used: list[str] = []

    def visit(name: str) -> None:
        if name in used or name not in experiment.stages:
            return
        stage = experiment.stage(name)
        for source in stage.init_from + stage.experts_from:
            visit(source)
        used.append(name)

    for name in experiment.stage_order:
        visit(name)
    return used


def differences(experiment: ExperimentConfig, workdir: pathlib.Path) -> list[str]:
    """One line per field that differs between a stage's record in `workdir` and this config."""
    lines = []
    for name in _stages_used(experiment):
        path = _record_path(workdir, name)
        if not path.is_file():
            continue
        trained = json.loads(path.read_text())['config']
        now = stage_definition(experiment, name)
        for field in sorted(set(trained) | set(now)):
            if trained.get(field) != now.get(field):
                lines.append(
                    f'{field}: stage {name} in {workdir} was trained with '
                    f'{_shown(trained.get(field))}, this config has {_shown(now.get(field))}'
                )
    return lines


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + '...'


def check_unchanged(experiment: ExperimentConfig, workdir: pathlib.Path) -> None:
    """Raises `ConfigError` listing every field of a stage trained in `workdir` that this config
    changes, unless `config.allow_changed_config` (then logs them)."""
    changed = differences(experiment, workdir)
    if not changed:
        return
    if experiment.allow_changed_config:
        for line in changed:
            log.warning('config.allow_changed_config: %s', line)
        return
    raise ConfigError(
        changed
        + [
            f'the stages above were trained in {workdir} with another config (its '
            f'{RUN_CONFIG_FILE}): run that config, use a new --workdir, or set '
            '--config.allow_changed_config=True to keep what is trained and go on with this one'
        ]
    )


def record_stage_start(
    experiment: ExperimentConfig, name: str, workdir: pathlib.Path, step: int
) -> None:
    """Writes the stage's record when it first starts; a resume that changed it (allowed by
    `config.allow_changed_config`) appends the step and the fields it changed."""
    path = _record_path(workdir, name)
    now = stage_definition(experiment, name)
    if not path.is_file():
        _write_json(path, {'config': now, 'changes': []})
        return
    record = json.loads(path.read_text())
    current = dict(record['config'])
    for change in record['changes']:
        current.update(change['fields'])
    changed = {k: v for k, v in now.items() if current.get(k) != v}
    if changed:
        record['changes'].append({'resumed_at_step': step, 'fields': changed})
        _write_json(path, record)


def write_run_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """`config.json` := this run's config; an earlier, different one is kept as
    `config.<UTC time>.json`."""
    path = workdir / RUN_CONFIG_FILE
    text = config.to_json_best_effort(indent=2) + '\n'
    if path.is_file() and path.read_text() != text:
        stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(path.stat().st_mtime))
        path.rename(path.with_name(f'config.{stamp}.json'))
    path.write_text(text)


def _write_json(path: pathlib.Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + '\n')
    tmp.replace(path)
