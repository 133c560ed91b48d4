"""The trainer starts a config's first stages from `config.pretrained` converted checkpoints, and
honours a stage's `upcycle_mode`."""

import pathlib

import numpy as np
import pytest
from flax import nnx

from tests.tiny_model import TokenizerInfo
from unimoe import checkpoint, config as config_lib, experiment, factory
from unimoe.convert import core
from unimoe.train import validate

CONFIG = pathlib.Path(__file__).parent.parent.parent / 'configs' / 'unimoe_tiny.py'


def test_first_stage_starts_from_the_converted_checkpoint(tmp_path):
    config = config_lib.load_config(f'{CONFIG}:mode=test')
    tokenizer = TokenizerInfo(vocab_size=512)
    spec = experiment.from_config_dict(config).model
    donor = factory.build_model(spec, tokenizer, moe=False, lora_rank=0, seed=7)
    llm_params = {
        checkpoint.path_str(path): np.asarray(v.get_value())
        for path, v in nnx.to_flat_state(nnx.state(donor, nnx.Param))
        if checkpoint.path_str(path).startswith('llm/')
    }
    converted = core.Converted('llama', {}, {}, llm_params, {}, {})
    config.pretrained = {'llm': str(core.save(converted, tmp_path / 'vicuna')), 'vision': ''}

    typed = experiment.from_config_dict(config)
    model, origin = factory.build_stage_model(typed, 's0_llm', tmp_path / 'run', tokenizer)
    assert set(origin) == set(llm_params) and set(origin.values()) == {'pretrained'}
    flat = {
        checkpoint.path_str(path): np.asarray(v.get_value())
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    for path, value in llm_params.items():
        np.testing.assert_array_equal(flat[path], value, err_msg=path)
    # A stage with init_from takes its sources, not the pretrained directories.
    assert typed.stage('s1_align').init_from


@pytest.mark.parametrize(
    'mode, experts_from, error',
    [
        ('copies', 's2_image', None),
        ('slices', 's2_image,s2_video', 'needs moe=True and 1 source'),
        ('per_source', 's2_image', 'needs moe=True and 4 source'),
        ('mixed', 's2_image', "upcycle_mode='mixed' is not one of"),
    ],
)
def test_validate_stages_checks_the_upcycle_mode(mode, experts_from, error):
    config = config_lib.load_config(f'{CONFIG}:mode=test')
    config.stages.s3_moe.upcycle_mode = mode
    config.stages.s3_moe.experts_from = experts_from
    typed = experiment.from_config_dict(config)
    if error is None:
        validate.validate_stages(typed)
    else:
        with pytest.raises(ValueError, match=error):
            validate.validate_stages(typed)
