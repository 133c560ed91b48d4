"""The experiment config is typed once where it enters: command-line values reach the model as
typed fields, and a bad field is named by its config path."""

import dataclasses

import pytest
from absl import flags
from ml_collections import config_flags

from tests.tiny_model import TokenizerInfo
from unimoe import config as config_lib, experiment, factory
from unimoe.moe.layer import MoELayer
from unimoe.train import trainer


def _from_command_line(*overrides: str) -> experiment.ExperimentConfig:
    argv = ['main', '--config=configs/unimoe_tiny.py:mode=test', *overrides]
    values = flags.FlagValues()
    # As `unimoe.main` defines it.
    config_flags.DEFINE_config_file('config', None, '', values, lock_config=True, sys_argv=argv)
    values(argv)
    return experiment.from_config_dict(values.config)


def _tiny():
    return config_lib.load_config('configs/unimoe_tiny.py:mode=test')


def test_moe_overrides_reach_the_layers_of_the_built_model():
    typed = _from_command_line('--config.model.moe.top_k=1', '--config.model.moe.kernel_impl=xla')
    assert (typed.model.llm.moe.top_k, typed.model.llm.moe.kernel_impl) == (1, 'xla')
    stage = typed.stage('s3_moe')
    model = factory.build_model(
        typed.model, TokenizerInfo(vocab_size=512), moe=True, lora_rank=stage.lora_rank, seed=0,
        abstract=True,
    )  # fmt: skip
    layers = [layer.ffn for layer in model.llm.layers]
    assert len(layers) == 3 and all(isinstance(ffn, MoELayer) for ffn in layers)
    assert {(ffn.cfg.top_k, ffn.cfg.kernel_impl) for ffn in layers} == {(1, 'xla')}
    # A dense stage of the same experiment has no MoE layer.
    dense = factory.build_model(
        typed.model, TokenizerInfo(vocab_size=512), moe=False, lora_rank=0, seed=0, abstract=True
    )
    assert not any(isinstance(layer.ffn, MoELayer) for layer in dense.llm.layers)


def test_sections_become_their_owners_typed_configs():
    typed = experiment.from_config_dict(_tiny())
    assert typed.stage_order[0] == 's0_llm' and typed.stage_order[-1] == 's3_moe'
    assert typed.model.llm.vocab_size == 0 and typed.model.moe_layers == (0, 1, 2)
    assert typed.data.seq_len == 80 and typed.data.n_audio_tokens == 8
    assert typed.mesh is None and typed.json_data is None and typed.tokenizer == ''
    assert typed.sharding_rules['batch'] == ('data', 'fsdp', 'expert')
    assert dataclasses.is_dataclass(typed.eval) and typed.eval.stages[-1] == 's3_moe'


def test_json_data_takes_the_data_shapes_and_each_stage_its_sources():
    config = _tiny()
    config.json_data = dict(data_dir='tfds', media_root=None, on_error='skip')
    config.stages.s3_moe.json_sources = 'a,b'
    typed = experiment.from_config_dict(config)
    assert typed.json_data.sources == () and typed.json_data.seq_len == 80
    stage = trainer.json_data_config(typed, typed.stage('s3_moe'), seed=3)
    assert (stage.sources, stage.on_error, stage.batch_size, stage.seed) == (('a', 'b'), 'skip', 32, 3)
    assert stage.n_image_tokens == typed.data.n_image_tokens


@pytest.mark.parametrize(
    'section, field, value, message',
    [
        ('model.llm', 'dim', 0, r'^config.model.llm.dim must be > 0, got 0'),
        ('model.moe', 'top_k', 0, r'^config.model.moe.top_k must be in \[1,'),
        ('model.vision', 'widht', 8, r"^config.model.vision: .*unexpected keyword argument 'widht'"),
        ('data', 'seq_len', 0, r'^config.data.seq_len must be >= 1, got 0'),
        ('data', 'n_audio_tokens', 5, r'^config.data.n_audio_tokens=5, but the model emits 8 audio'),
        ('data', 'seq_len', 'long', r"^config.data.seq_len='long' must be of type int"),
    ],
)
def test_a_bad_field_is_named_by_its_config_path(section, field, value, message):
    raw = _tiny().to_dict()  # as a config file may write it: no ConfigDict type checks
    node = raw
    for key in section.split('.'):
        node = node[key]
    node[field] = value
    with pytest.raises(ValueError, match=message):
        experiment.from_config_dict(raw)


def test_unknown_and_missing_sections_are_refused():
    config = _tiny()
    config.log_evry = 5
    with pytest.raises(ValueError, match=r"^config has unknown fields \['log_evry'\]"):
        experiment.from_config_dict(config)
    raw = _tiny().to_dict()
    del raw['data']
    with pytest.raises(ValueError, match=r'^config.data is missing'):
        experiment.from_config_dict(raw)
    raw = dict(_tiny().to_dict(), mesh=dict(data='two'))
    with pytest.raises(ValueError, match=r'^config.mesh sizes must be integers'):
        experiment.from_config_dict(raw)
