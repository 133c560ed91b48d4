"""A stage trains on Uni-MoE JSON data: skipped bad records reach the metrics, or stop the run."""

import json
import pathlib

import ml_collections
import numpy as np
import pytest

from tests.data import real_corpus
from unimoe import config as config_lib, experiment
from unimoe import run
from unimoe.data import formats, json_builder
from unimoe.train import metrics, validate

CONFIG = pathlib.Path(__file__).parent.parent.parent / 'configs' / 'unimoe_tiny.py'


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp('json_stage')
    train_json = real_corpus.write_corpus(root / 'dirty', with_bad=True)
    json_builder.prepare(root / 'tfds', 'dirty', train_json.parent, train_json.name)
    return {
        'root': root,
        'num_good': len(json.loads(train_json.read_text())) - len(real_corpus.BAD_RECORDS),
        'tokenizer': str(real_corpus.train_sentencepiece(root / 'tokenizer.model')),
    }


def json_config(corpus: dict, on_error: str, steps: int) -> ml_collections.ConfigDict:
    config = config_lib.load_config(f'{CONFIG}:mode=test')
    config.tokenizer = corpus['tokenizer']
    config.data.seq_len = 512  # the reference system prompt and 5 audio chunks of 8 tokens
    config.json_data = dict(
        data_dir=str(corpus['root'] / 'tfds'),
        media_root=str(corpus['root'] / 'dirty' / 'media'),
        on_error=on_error,
        max_audio_chunks=5,
    )
    stage = ml_collections.ConfigDict(dict(config.stages.s0_llm))
    stage.update(mode='chat', json_sources='dirty', steps=steps, batch_size=2, tasks='')
    config.stages = ml_collections.ConfigDict({'s_json': stage})
    config.stage_order = 's_json'
    config.eval.stages = ''
    config.log_every = 1
    return config


def test_skipped_records_are_counted_in_the_training_metrics(corpus, tmp_path):
    # Enough rows to pass the first epoch: every bad record of it has been skipped by then.
    steps = corpus['num_good'] // 2 + 1
    config = json_config(corpus, 'skip', steps)
    run.run_experiment(config, str(tmp_path / 'run'))
    logged = metrics.read_metrics(tmp_path / 'run' / 's_json')
    assert [row['step'] for row in logged] == list(range(1, steps + 1))
    assert all(np.isfinite(row['loss']) for row in logged)
    skipped = [row['skipped_records'] for row in logged]
    assert skipped == sorted(skipped) and skipped[-1] >= len(real_corpus.BAD_RECORDS)


def test_a_bad_record_stops_the_stage_naming_it(corpus, tmp_path):
    config = json_config(corpus, 'raise', corpus['num_good'] // 2 + 1)
    with pytest.raises(formats.RecordError, match='unimoe_json/dirty'):
        run.run_experiment(config, str(tmp_path / 'run'))


def test_stages_and_tokenizers_must_agree():
    config = config_lib.load_config(f'{CONFIG}:mode=test')
    config.tokenizer = 'tokenizer.model'
    with pytest.raises(ValueError, match='needs the built-in tokenizer'):
        validate.validate_stages(experiment.from_config_dict(config))
