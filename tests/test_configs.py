"""Every experiment config loads, passes validation, and every stage's model builds abstractly."""

import pathlib

import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from tests.tiny_model import TokenizerInfo
from unimoe import config as config_lib, experiment, factory
from unimoe.train import trainer, validate

CONFIGS = sorted(pathlib.Path(__file__).parent.parent.glob('configs/*.py'))
ARMS = {
    'unimoe_tiny.py': ['', 'mode=test'],
    # The released models at their 7B sizes (no checkpoint: the fine-tuning stage needs a tokenizer).
    'unimoe_released.py': [f'variant={v},tokenizer=tokenizer.model' for v in config_lib.RELEASED_VARIANTS],
}


def _specs():
    for path in CONFIGS:
        for arg in ARMS.get(path.name, ['']):
            yield f'{path}:{arg}' if arg else str(path)


@pytest.mark.parametrize('spec', list(_specs()))
def test_config_stages_build_abstractly(spec):
    typed = experiment.from_config_dict(config_lib.load_config(spec))
    validate.validate_stages(typed)
    # Stages differ in their model only by (moe, lora_rank); build each kind once.
    kinds = {(stage.moe, stage.lora_rank): stage for stage in typed.ordered_stages()}
    for stage in kinds.values():
        model = factory.build_model(
            typed.model,
            TokenizerInfo(vocab_size=512),
            moe=stage.moe,
            lora_rank=stage.lora_rank,
            seed=0,
            abstract=True,
        )
        params = nnx.state(model, nnx.Param)
        assert sum(v.get_value().size for _, v in nnx.to_flat_state(params)) > 0


def test_parse_arg_rejects_unknown_keys_and_bad_values():
    assert config_lib.parse_arg('steps=3,fast=true', steps=1, fast=False).to_dict() == {
        'steps': 3,
        'fast': True,
    }
    with pytest.raises(ValueError, match='unknown config arg'):
        config_lib.parse_arg('stpes=3', steps=1)
    with pytest.raises(ValueError, match='is not a int'):
        config_lib.parse_arg('steps=many', steps=1)
    with pytest.raises(ValueError, match="mode='fast'"):
        config_lib.load_config(f'{CONFIGS[0].parent}/unimoe_tiny.py:mode=fast')


def test_validate_stages_rejects_a_stage_that_starts_from_a_later_one():
    config = config_lib.load_config(f'{CONFIGS[0].parent}/unimoe_tiny.py')
    config.stages.s1_align.init_from = 's2_image'
    with pytest.raises(ValueError, match="stage 's1_align' starts from 's2_image'"):
        validate.validate_stages(experiment.from_config_dict(config))


def test_every_loss_field_is_settable_from_the_command_line():
    stage = '--config.stages.s3_moe'
    argv = [
        'main',
        '--config=configs/unimoe_tiny.py:mode=test',
        f'{stage}.balance_coef_end=0.0',
        f'{stage}.balance_decay_steps=7',
        f'{stage}.dcmoe_coef=0.5',
        f'{stage}.dcmoe_coef_end=0.01',
        f'{stage}.answer_token_weight=10.0',
    ]
    values = flags.FlagValues()
    # As `unimoe.main` defines it (locked: an undeclared field cannot be set).
    config_flags.DEFINE_config_file('config', None, '', values, lock_config=True, sys_argv=argv)
    values(argv)
    loss = trainer.stage_loss_config(experiment.from_config_dict(values.config).stage('s3_moe'))
    assert (loss.balance_coef_end, loss.balance_decay_steps) == (0.0, 7)
    assert (loss.dcmoe_coef, loss.dcmoe_coef_end, loss.answer_token_weight) == (0.5, 0.01, 10.0)
    # Unset, the annealed ends stay None: constant coefficients.
    tiny = config_lib.load_config('configs/unimoe_tiny.py')
    default = trainer.stage_loss_config(experiment.from_config_dict(tiny).stage('s3_moe'))
    assert (default.balance_coef_end, default.dcmoe_coef_end) == (None, None)


def test_every_stage_field_and_the_eval_settings_are_typed_from_the_command_line():
    argv = [
        'main',
        '--config=configs/unimoe_tiny.py:mode=test',
        '--config.stages.s3_moe.upcycle_mode=copies',
        '--config.stages.s3_moe.json_weights=0.25,0.75',
        '--config.eval.tasks=text_qa,audio_qa',
    ]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, '', values, lock_config=True, sys_argv=argv)
    values(argv)
    typed = experiment.from_config_dict(values.config)
    stage = typed.stage('s3_moe')
    assert (stage.upcycle_mode, stage.json_weights) == ('copies', (0.25, 0.75))
    settings = typed.eval
    assert settings.tasks == ('text_qa', 'audio_qa') and settings.batch_size == 64
    assert settings.stages[-1] == 's3_moe'
    config = config_lib.load_config('configs/unimoe_tiny.py:mode=test')
    config.eval = {'tasks': 'text_qa', 'batch_size': 'many'}  # written by hand, not by the CLI
    with pytest.raises(ValueError, match=r"config.eval.batch_size='many' must be of type int"):
        experiment.from_config_dict(config)
    config.eval = {'batch_size': 8, 'max_tokens': 4}
    with pytest.raises(ValueError, match=r"config.eval has unknown fields \['max_tokens'\]"):
        experiment.from_config_dict(config)


def test_stage_config_is_typed_once_and_names_the_bad_field():
    config = config_lib.load_config('configs/unimoe_tiny.py:mode=test')
    stage = experiment.from_config_dict(config).stage('s3_moe')
    assert stage.experts_from == ('s2_image', 's2_video', 's2_speech', 's2_audio')
    assert stage.init_from == ('s1_align',) and stage.json_sources == () and stage.moe is True
    config.stages.s3_moe.json_weights = '0.25,0.75'
    assert experiment.from_config_dict(config).stage('s3_moe').json_weights == (0.25, 0.75)
    config.stages.s2_image.json_weights = '0.5,half'
    with pytest.raises(ValueError, match=r"config.stages.s2_image.json_weights='half' must be of type float"):
        experiment.from_config_dict(config)
    del config.stages.s2_image.json_weights
    config.stages.s3_moe.upcyle_mode = 'copies'  # a typo is an unknown field, not a silent default
    with pytest.raises(ValueError, match=r"config.stages.s3_moe has unknown fields \['upcyle_mode'\]"):
        experiment.from_config_dict(config)
