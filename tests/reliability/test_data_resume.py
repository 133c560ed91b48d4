"""Both data pipelines resume at the saved position through the checkpointer (on disk, as the
trainer saves them), bad-record counts included, with and without worker processes."""

import jax
import numpy as np
import pytest
from absl import flags

from tests.data import real_corpus
from unimoe import checkpoint
from unimoe.data import builtin, json_builder, json_pipeline, pipeline
from unimoe.data.tokenizer import PretrainedTokenizer

STATE = {'step': np.int32(0)}


def _save_then_compare(tmp_path, make_iterator, consumed: int = 3, compared: int = 4) -> None:
    iterator = make_iterator()
    for _ in range(consumed):
        next(iterator)
    with checkpoint.Checkpointer(tmp_path / 'ckpt') as ckpt:
        ckpt.save(consumed, STATE, iterator)
        ckpt.wait()
    expected = [next(iterator) for _ in range(compared)]
    resumed = make_iterator()
    next(resumed)  # a fresh iterator somewhere else: the restore must move it
    with checkpoint.Checkpointer(tmp_path / 'ckpt') as ckpt:
        step, _ = ckpt.restore_latest(jax.eval_shape(lambda: STATE), resumed)
    assert step == consumed
    for want in expected:
        got = next(resumed)
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_the_builtin_loader_resumes_through_the_checkpointer(builtin_test_data, tmp_path):
    cfg = pipeline.DataConfig(
        data_dir=builtin_test_data,
        builder_config='test',
        seq_len=80,
        batch_size=4,
        image_size=32,
        num_frames=4,
        audio_frames=300,
        num_mel_bins=32,
        n_image_tokens=16,
        n_video_tokens=16,
        n_audio_tokens=8,
    )
    tokenizer = builtin.load_or_train_tokenizer(f'{builtin_test_data}/{builtin.TOKENIZER_FILE}')
    tasks = ['image_qa', 'speech_qa', 'text_qa']
    _save_then_compare(
        tmp_path, lambda: iter(pipeline.make_train_loader(cfg, tokenizer, tasks, 'chat', seed=3))
    )


@pytest.fixture(scope='module')
def dirty_corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp('dirty_corpus')
    train_json = real_corpus.write_corpus(root / 'dirty', with_bad=True)
    json_builder.prepare(root / 'tfds', 'dirty', train_json.parent, train_json.name)
    return {
        'root': root,
        'tokenizer': PretrainedTokenizer(real_corpus.train_sentencepiece(root / 'tok.model')),
    }


@pytest.mark.parametrize('worker_count', [0, 1])
def test_the_json_pipeline_resumes_through_the_checkpointer(dirty_corpus, tmp_path, worker_count):
    if worker_count and not flags.FLAGS.is_parsed():  # grain reads its absl flags in workers
        flags.FLAGS.mark_as_parsed()
    cfg = json_pipeline.JsonDataConfig(
        data_dir=str(dirty_corpus['root'] / 'tfds'),
        sources=('dirty',),
        media_root=str(dirty_corpus['root'] / 'dirty' / 'media'),
        seq_len=400,
        batch_size=2,
        image_size=16,
        num_frames=2,
        num_mel_bins=16,
        audio_frames=200,
        max_audio_chunks=5,
        n_image_tokens=4,
        n_video_tokens=4,
        n_audio_tokens=2,
        on_error='skip',
        worker_count=worker_count,
    )

    def make_iterator():
        return iter(json_pipeline.make_dataset(cfg, dirty_corpus['tokenizer']))

    # 3 + 4 batches of 2 pass the whole epoch, bad records included: their counts must match too.
    _save_then_compare(tmp_path, make_iterator)
