"""A workdir remembers what each stage was trained with; a run that changes it is refused (every
differing field listed) before anything is written, unless `config.allow_changed_config`."""

import json

import pytest

from unimoe import config as config_lib
from unimoe.train import validate, workdir

CONFIG = 'configs/unimoe_tiny.py:mode=test'


def _experiment(**overrides):
    config = config_lib.load_config(CONFIG)
    for path, value in overrides.items():
        *parents, field = path.split('.')
        target = config
        for key in parents:
            target = target[key]
        target[field] = value
    return validate.validate_experiment(config)


def test_a_changed_stage_is_refused_listing_every_differing_field(tmp_path):
    trained = _experiment()
    for name in ('s1_align', 's3_moe'):
        workdir.record_stage_start(trained, name, tmp_path, step=0)
    changed = _experiment(
        **{'stages.s3_moe.learning_rate': 0.5, 'model.moe.top_k': 1, 'seed': 3}
    )
    with pytest.raises(config_lib.ConfigError) as raised:
        workdir.check_unchanged(changed, tmp_path)
    problems = raised.value.problems
    assert problems[:-1] == [
        f'config.model.moe.top_k: stage s1_align in {tmp_path} was trained with 2, this config has 1',
        f'config.seed: stage s1_align in {tmp_path} was trained with 0, this config has 3',
        f'config.model.moe.top_k: stage s3_moe in {tmp_path} was trained with 2, this config has 1',
        f'config.seed: stage s3_moe in {tmp_path} was trained with 0, this config has 3',
        f'config.stages.s3_moe.learning_rate: stage s3_moe in {tmp_path} was trained with 0.001, '
        'this config has 0.5',
    ]
    assert '--config.allow_changed_config=True' in problems[-1]
    # Allowed: the run goes on, and a resumed stage's record says from which step it changed.
    allowed = _experiment(**{'stages.s3_moe.learning_rate': 0.5, 'allow_changed_config': True})
    workdir.check_unchanged(allowed, tmp_path)
    workdir.record_stage_start(allowed, 's3_moe', tmp_path, step=7)
    record = json.loads((tmp_path / 's3_moe' / workdir.RECORD_FILE).read_text())
    assert record['config']['config.stages.s3_moe.learning_rate'] == 0.001
    assert record['changes'] == [
        {'resumed_at_step': 7, 'fields': {'config.stages.s3_moe.learning_rate': 0.5}}
    ]


def test_where_the_data_is_and_how_the_run_is_watched_may_change(tmp_path):
    workdir.record_stage_start(_experiment(), 's3_moe', tmp_path, step=0)
    moved = _experiment(
        **{
            'data.data_dir': '/elsewhere',
            'data.worker_count': 2,
            'eval.max_new_tokens': 9,
            'log_every': 1,
            'checkpoint_every': 1,
            'stages.s0_llm.learning_rate': 0.5,  # a stage s3_moe neither is nor starts from
        }
    )
    assert workdir.differences(moved, tmp_path) == []


def test_config_json_keeps_the_earlier_run_config(tmp_path):
    first = config_lib.load_config(CONFIG)
    workdir.write_run_config(first, tmp_path)
    workdir.write_run_config(first, tmp_path)  # the same: nothing kept twice
    assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json']
    second = config_lib.load_config(CONFIG)
    second.eval.max_new_tokens = 9
    workdir.write_run_config(second, tmp_path)
    kept = [p for p in tmp_path.iterdir() if p.name != 'config.json']
    assert len(kept) == 1 and kept[0].name.startswith('config.2')
    assert json.loads(kept[0].read_text())['eval']['max_new_tokens'] == first.eval.max_new_tokens
    assert json.loads((tmp_path / 'config.json').read_text())['eval']['max_new_tokens'] == 9
