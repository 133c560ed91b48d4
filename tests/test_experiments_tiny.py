"""The tiny ablation arms (experiments/tiny): configs, shared-stage links and the summary numbers."""

import pathlib

import pytest

from experiments.tiny import config as arms_config, run as arms_run
from unimoe import experiment
from unimoe.train import validate


@pytest.mark.parametrize('arm', arms_config.ARMS)
def test_arm_config_is_valid_and_shares_the_base_stages(arm):
    base = arms_config.get_config('arm=moe4,mode=test')
    config = arms_config.get_config(f'arm={arm},mode=test')
    typed = validate.validate_experiment(config)
    stage = arms_config.stage3_name(arm)
    assert typed.stage_order[-1] == stage
    experts = ('s2_image', 's2_video', 's2_speech', 's2_audio')
    assert typed.eval.stages == ((*experts, stage) if arm == 'moe4' else (stage,))
    for name in typed.stage_order[:-1]:
        assert config.stages[name].to_dict() == base.stages[name].to_dict()
    expected_experts = {'moe8': 8, 'moe8_no_balance': 8}.get(arm, 4)
    assert config.model.moe.num_experts == expected_experts
    assert config.stages[stage].moe == (arm != 'dense')
    assert (config.stages[stage].balance_coef == 0) == (
        arm.endswith('no_balance') or arm == 'dense'
    )


def test_unknown_arm_is_refused():
    with pytest.raises(ValueError, match='arm=.moe16. is not one of'):
        arms_config.get_config('arm=moe16')


def test_link_shared_stages(tmp_path: pathlib.Path):
    base = experiment.from_config_dict(arms_config.get_config('arm=moe4,mode=test'))
    config = arms_config.get_config('arm=no_stage2,mode=test')
    base_dir = tmp_path / 'base'
    for name in base.stage_order:
        (base_dir / name).mkdir(parents=True)
    typed = experiment.from_config_dict(config)
    shared = arms_run.link_shared_stages(typed, base, tmp_path / 'arm', base_dir)
    assert shared == ['s0_llm', 's0_vision', 's0_audio', 's0_sound', 's1_align']
    assert sorted(p.name for p in (tmp_path / 'arm').iterdir()) == sorted(shared)
    assert (tmp_path / 'arm' / 's1_align').resolve() == (base_dir / 's1_align').resolve()

    config.stages.s1_align.steps += 1
    with pytest.raises(ValueError, match="stage 's1_align' differs from the base arm"):
        arms_run.link_shared_stages(
            experiment.from_config_dict(config), base, tmp_path / 'other', base_dir
        )


def test_summarize_rescales_accuracy_by_chance():
    chance = {'a': 0.5, 'b': 0.2}
    results = {
        'moe': {'tasks': {'a': {'accuracy': 0.75}, 'b': {'accuracy': 0.6}}},
        'dense': {'tasks': {'a': {'accuracy': 1.0}, 'b': {'accuracy': 0.2}}},
    }
    loads = {'moe': [[0.5, 0.3, 0.2], [0.25, 0.25, 0.5]], 'dense': None}
    table, numbers = arms_run.summarize(results, chance, loads)
    # moe: skills (0.75-0.5)/0.5 = 0.5 and (0.6-0.2)/0.8 = 0.5; dense: 1.0 and 0.0.
    assert numbers['moe']['mean_skill'] == pytest.approx(0.5)
    assert numbers['moe']['skill_range'] == pytest.approx(0.0)
    assert numbers['dense']['min_skill'] == pytest.approx(0.0)
    assert numbers['dense']['skill_range'] == pytest.approx(1.0)
    assert numbers['moe']['max_load'] == pytest.approx(0.5)
    assert numbers['moe']['mean_accuracy'] == pytest.approx(0.675)
    assert '| moe | 75.0 | 60.0 | 67.5 | 0.500 | 0.500 | 0.000 | 0.50 (1/3) |' in table
    assert '| dense | 100.0 | 20.0 | 60.0 | 0.500 | 0.000 | 1.000 | - |' in table
