"""Config validation before anything is built: one test per message, each naming what to change."""

import pathlib

import jax
import ml_collections
import pytest

from unimoe import config as config_lib
from unimoe.config import ConfigError
from unimoe.train import validate

CONFIGS = pathlib.Path(__file__).parent.parent.parent / 'configs'


def _tiny() -> ml_collections.ConfigDict:
    return config_lib.load_config(f'{CONFIGS}/unimoe_tiny.py:mode=test')


def test_the_shipped_tiny_config_passes():
    validate.validate_experiment(_tiny())


def test_top_k_larger_than_the_number_of_experts():
    config = _tiny()
    config.model.moe.top_k = 5
    with pytest.raises(
        ValueError, match=r'config.model.moe.top_k must be in \[1, num_experts \+ num_null_experts=4\], got 5'
    ):
        validate.validate_experiment(config)


def test_an_invalid_moe_config_is_named_as_a_config_field():
    config = _tiny()
    config.model.moe.router = 'nearest'
    with pytest.raises(ValueError, match=r'^config.model.moe.router must be one of'):
        validate.validate_experiment(config)


def test_experts_not_divisible_by_the_expert_parallel_degree():
    config = _tiny()
    config.mesh = dict(data=1, expert=8)
    with pytest.raises(
        ValueError, match=r'num_experts=4 is not divisible by .*config.mesh.expert=8'
    ):
        validate.validate_experiment(config)


def test_mesh_size_must_match_the_devices():
    config = _tiny()
    config.mesh = dict(data=2, expert=2)  # tests/conftest.py sets 8 devices
    with pytest.raises(ValueError, match=r'has 4 devices, but JAX sees 8'):
        validate.validate_experiment(config)


def test_stage_batch_must_split_over_the_batch_axes():
    config = _tiny()
    config.mesh = dict(data=-1, expert=4)
    config.stages.s0_llm.batch_size = 12
    with pytest.raises(ValueError, match=r"stage 's0_llm': batch_size=12 .* 8 batch shards"):
        validate.validate_experiment(config)


def test_expert_parallelism_needs_the_tokens_split_over_expert():
    config = _tiny()
    config.mesh = dict(data=2, expert=4)
    config.sharding_rules = dict(batch=('data',))
    with pytest.raises(
        ValueError, match=r"sharding_rules.batch=\('data',\) \(and .seq=\(\)\) keeps the tokens"
    ):
        validate.validate_experiment(config)
    config.model.moe.expert_parallel = 'off'
    validate.validate_experiment(config)
    # The MoE layer's token axes are the batch then the sequence rule's (nn.sharding.token_axes).
    config.model.moe.expert_parallel = 'auto'
    config.sharding_rules = dict(batch=('data',), seq=('expert',))
    validate.validate_experiment(config)


def test_several_processes_need_a_mesh(monkeypatch):
    # Without config.mesh a run trains on its process's first device: with two processes that
    # would be two unrelated models.
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    with pytest.raises(ValueError, match=r'2 processes but no config.mesh'):
        validate.validate_experiment(_tiny())


def test_a_fitting_mesh_passes():
    config = _tiny()
    config.mesh = dict(data=2, expert=4)
    validate.validate_experiment(config)


def test_missing_pretrained_checkpoint(tmp_path):
    config = _tiny()
    config.pretrained = dict(llm=str(tmp_path / 'vicuna'))
    with pytest.raises(
        ConfigError, match=r'config.pretrained.llm=.*vicuna.* not a converted'
    ):
        validate.validate_experiment(config)


def _json_stage_config(tmp_path) -> ml_collections.ConfigDict:
    config = _tiny()
    tokenizer = tmp_path / 'tokenizer.model'
    tokenizer.write_text('')
    config.tokenizer = str(tokenizer)
    config.json_data = dict(data_dir=str(tmp_path / 'tfds'), media_root=str(tmp_path))
    stage = ml_collections.ConfigDict(dict(config.stages.s0_llm))
    stage.update(mode='chat', json_sources='llava', tasks='')
    config.stages = ml_collections.ConfigDict({'s_json': stage})
    config.stage_order = 's_json'
    config.eval.stages = ''
    return config


def test_missing_tokenizer_file(tmp_path):
    config = _json_stage_config(tmp_path)
    config.tokenizer = str(tmp_path / 'vicuna.model')
    with pytest.raises(ConfigError, match=r'config.tokenizer=.*vicuna.model.*does not exist'):
        validate.validate_experiment(config)


def test_json_sources_not_prepared(tmp_path):
    with pytest.raises(ConfigError, match=r"json_sources 'llava', which is not prepared"):
        validate.validate_experiment(_json_stage_config(tmp_path))


def test_missing_media_root(tmp_path):
    config = _json_stage_config(tmp_path)
    config.json_data.media_root = str(tmp_path / 'media')
    with pytest.raises(ConfigError, match=r'config.json_data.media_root=.*media.*not exist'):
        validate.validate_experiment(config)


def test_a_stage_whose_frozen_encoder_nothing_initialises():
    config = _tiny()
    # s1_align trains the connectors only; without s0_vision the ViT would stay random.
    config.stages.s1_align.init_from = 's0_llm,s0_audio,s0_sound'
    with pytest.raises(
        ValueError,
        match=r"stage 's1_align' \(chat\) runs vision frozen .* config.pretrained.\{vision\}, "
        r"or add to init_from stages that train vision",
    ):
        validate.validate_experiment(config)


def test_a_stage_without_sources_needs_pretrained_weights():
    config = config_lib.load_config(f'{CONFIGS}/unimoe_paper_4e.py')
    with pytest.raises(ValueError, match=r"stage 's1_align' \(chat\) runs audio, ffn, llm, vision"):
        validate.validate_experiment(config)


def test_an_unknown_nonfinite_policy():
    config = _tiny()
    config.nonfinite = 'ignore'
    with pytest.raises(ValueError, match=r"config.nonfinite='ignore' must be one of"):
        validate.validate_experiment(config)


def test_the_sound_tower_and_its_data_disagree_on_mel_bins():
    config = _tiny()
    config.data.sound_mel_bins = 16
    with pytest.raises(
        ConfigError,
        match=r"config.data.sound_mel_bins=16, but config.model.sound.num_mel_bins=32: BEATs reads",
    ):
        validate.validate_experiment(config)
    config.data.sound_tasks = ('audio_qa',)  # s0_sound's audio_caption now goes to Whisper
    config.data.sound_mel_bins = 32
    with pytest.raises(
        ConfigError,
        match=r"config.stages.s0_sound: mode='classify_sound': tasks \['audio_caption'\] are not "
        r"in DataConfig.sound_tasks=\['audio_qa'\]",
    ):
        validate.validate_experiment(config)
