"""Fuzzing the real-data readers (hypothesis): every input ends in a result of the documented shape
or a documented error naming the file (and record and field), never another exception or a hang.

Fixed budget: derandomized examples (the same inputs every run), a per-example deadline, about
15 s in all. Bugs these found and fixed: invalid UTF-8 in a JSON file raised a bare
UnicodeDecodeError; a WAV with an odd-length or overrunning data chunk raised ValueError /
RuntimeError from the stdlib reader; undecodable container metadata raised UnicodeDecodeError
from PyAV; a clip of a few samples resampled to an empty array (now a MediaError).
"""

import io
import json

import grain
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.data import real_corpus
from unimoe.data import formats, json_pipeline, media, preprocess, vicuna
from unimoe.data.conversation import SequenceTooLongError
from unimoe.data.tokenizer import PretrainedTokenizer

FUZZ = settings(
    max_examples=150,
    deadline=2000,  # ms per example: a decoder stuck on an input fails the test
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
PIECES = list('ab <>/:\n\x00é🙂') + ['<image>', '<audio>', '<video>', '</s>', 'USER:', 'ASSISTANT:']
ODD_TEXT = st.lists(st.sampled_from(PIECES), max_size=24).map(''.join) | st.text(max_size=16)
TURN = st.fixed_dictionaries(
    {'from': st.sampled_from(['human', 'gpt', 'human', 'gpt', 'system']), 'value': ODD_TEXT}
)
MEDIA_NAMES = ['good.jpg', 'truncated.jpg', 'random.jpg', 'missing.jpg']
AUDIO_NAMES = ['good.wav', 'resampled.wav', 'truncated.wav', 'random.wav', 'missing.wav']
RECORDS = st.fixed_dictionaries(
    {'conversations': st.lists(TURN, max_size=4)},
    optional={
        'id': JSON_VALUES,
        'image': st.sampled_from(MEDIA_NAMES) | JSON_VALUES,
        'voice': st.lists(st.sampled_from(AUDIO_NAMES), max_size=2),
        'video': st.lists(st.sampled_from(MEDIA_NAMES), min_size=1, max_size=3) | JSON_VALUES,
    },
)


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


IMAGES = {fmt: _encoded(fmt) for fmt in ('PNG', 'JPEG', 'GIF')}
WAV = real_corpus.wav_bytes(0.25, rate=8000)
VIDEO = real_corpus.video_bytes(4)


def damaged(base: bytes) -> st.SearchStrategy[bytes]:
    """`base` truncated, overwritten in a span, or its header followed by random bytes."""
    cut = st.integers(0, len(base)).map(lambda n: base[:n])
    overwritten = st.tuples(st.integers(0, len(base)), st.binary(min_size=1, max_size=16)).map(
        lambda t: base[: t[0]] + t[1] + base[t[0] + len(t[1]) :]
    )
    headed = st.binary(max_size=64).map(lambda tail: base[:48] + tail)
    return cut | overwritten | headed | st.binary(max_size=128)


@FUZZ
@given(raw=JSON_VALUES | RECORDS)
def test_parse_record_returns_a_record_or_a_record_error(raw):
    try:
        record = formats.parse_record(raw, 7, 'train.json')
    except formats.RecordError as e:
        assert str(e).startswith("train.json: record 7 (id ") and e.field
        return
    assert record.conversations and record.conversations[0]['from'] == 'human'
    text = ''.join(turn['value'] for turn in record.conversations)
    assert text.count(formats.AUDIO_TAG) == len(record.voices)


@FUZZ
@given(data=st.binary(max_size=64) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
def test_a_json_file_is_a_list_or_an_error_naming_it(tmp_path, data):
    path = tmp_path / 'train.json'
    path.write_bytes(data)
    try:
        records = formats.load_json_list(path)
    except ValueError as e:
        assert str(e).startswith(str(path))
        return
    assert isinstance(records, list)


@FUZZ
@given(data=st.sampled_from(sorted(IMAGES)).flatmap(lambda fmt: damaged(IMAGES[fmt])))
def test_a_damaged_image_decodes_to_rgb_or_raises_media_error(data):
    try:
        pixels = preprocess.decode_image(data, 'x.jpg')
    except preprocess.MediaError as e:
        assert str(e).startswith('x.jpg: ')
        return
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert min(pixels.shape[:2]) >= 1


def _check_audio(data: bytes) -> np.ndarray | None:
    try:
        samples = preprocess.decode_audio(data, 'x.wav')
    except preprocess.MediaError as e:
        assert str(e).startswith('x.wav: ')
        return None
    assert samples.dtype == np.float32 and samples.ndim == 1 and len(samples) > 0
    assert np.all(np.isfinite(samples))
    return samples


@FUZZ
@given(data=damaged(WAV))
def test_a_damaged_audio_file_decodes_or_raises_media_error(data):
    _check_audio(data)


@FUZZ
@given(rate=st.integers(1, 200_000), channels=st.integers(1, 3))
def test_any_sample_rate_is_resampled_to_16k(rate, channels):
    data = real_corpus.wav_bytes(0.1, rate=rate, channels=channels)
    samples = _check_audio(data)
    frames = int(0.1 * rate)
    if samples is None:
        # Refused: an empty file, or a few samples FFmpeg's resampler filter swallows whole.
        assert frames <= 100
    else:
        expected = frames * media.SAMPLE_RATE / rate
        # FFmpeg's resampler may keep up to a few input samples in its filter at the end.
        assert abs(len(samples) - expected) <= 2 + expected * 0.01 + 8 * media.SAMPLE_RATE / rate


@FUZZ
@given(data=damaged(VIDEO))
def test_a_damaged_video_decodes_or_raises_media_error(data):
    try:
        frames = preprocess.decode_video(data, 'x.mp4', 4)
    except preprocess.MediaError as e:
        assert str(e).startswith('x.mp4: ')
        return
    assert frames.dtype == np.uint8 and frames.shape[0] == 4 and frames.shape[3] == 3


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory) -> PretrainedTokenizer:
    path = tmp_path_factory.mktemp('fuzz_tokenizer') / 'tokenizer.model'
    return PretrainedTokenizer(real_corpus.train_sentencepiece(path))


@FUZZ
@given(turns=st.lists(ODD_TEXT, min_size=2, max_size=4))
def test_vicuna_examples_of_odd_text_are_consistent_or_refused(tokenizer, turns):
    conversations = [{'from': ('human', 'gpt')[i % 2], 'value': v} for i, v in enumerate(turns)]
    text = ''.join(turns)
    raw = {
        'conversations': conversations,
        'voice': ['a.wav'] * text.count(formats.AUDIO_TAG),
        **({'image': 'a.jpg'} if formats.IMAGE_TAG in text else {}),
        **({'video': 'a.mp4'} if formats.VIDEO_TAG in text else {}),
    }
    try:
        record = formats.parse_record(raw, 0, 'train.json')
        tokens, loss_mask = vicuna.build_example(
            record.conversations,
            tokenizer,
            n_image_tokens=3,
            n_video_tokens=3,
            audio_tokens=[2] * len(record.voices),
            seq_len=96,
        )
    except (formats.RecordError, SequenceTooLongError, vicuna.TemplateMismatchError):
        return
    assert tokens.shape == loss_mask.shape == (96,)
    assert np.all((tokens >= 0) & (tokens < tokenizer.vocab_size))
    # Supervision only on real tokens.
    assert not np.any(loss_mask[tokens == tokenizer.pad_id])


@pytest.fixture(scope='module')
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('fuzz_media')
    (root / 'good.jpg').write_bytes(IMAGES['JPEG'])
    (root / 'truncated.jpg').write_bytes(IMAGES['JPEG'][:200])
    (root / 'random.jpg').write_bytes(np.random.default_rng(1).bytes(300))
    (root / 'good.wav').write_bytes(WAV)
    (root / 'resampled.wav').write_bytes(real_corpus.wav_bytes(0.2, rate=44100, channels=2))
    (root / 'truncated.wav').write_bytes(WAV[:30])
    (root / 'random.wav').write_bytes(np.random.default_rng(2).bytes(300))
    return root


def _builder(tokenizer, media_root, on_error: str = 'raise') -> json_pipeline.ExampleBuilder:
    cfg = json_pipeline.JsonDataConfig(
        data_dir=str(media_root),
        sources=('fuzz',),
        media_root=str(media_root),
        seq_len=128,
        batch_size=1,
        image_size=8,
        num_frames=2,
        num_mel_bins=8,
        audio_frames=40,
        n_image_tokens=3,
        n_video_tokens=3,
        n_audio_tokens=2,
        max_audio_chunks=8,
        on_error=on_error,
    )
    return json_pipeline.ExampleBuilder(cfg, tokenizer)


@FUZZ
@given(raw=ODD_TEXT | RECORDS.map(json.dumps))
def test_the_example_builder_returns_a_batch_row_or_a_record_error(tokenizer, media_root, raw):
    try:
        example = _builder(tokenizer, media_root)(raw, 3, 'unimoe_json/fuzz')
    except formats.RecordError as e:
        assert str(e).startswith('unimoe_json/fuzz: record 3 (id ') and e.field
        return
    assert example['tokens'].shape == (128,) and example['image'].shape == (8, 8, 3)
    assert example['audio_mel'].shape == (8, 40, 8)
    for key in ('image', 'video', 'audio_mel'):
        assert np.all(np.isfinite(example[key]))
    assert int(example['audio_chunk_mask'].sum()) >= int(example['has_audio'])


@settings(FUZZ, max_examples=30)
@given(records=st.lists(RECORDS.map(json.dumps), min_size=1, max_size=6))
@pytest.mark.parametrize('on_error', json_pipeline.ON_ERROR)
def test_the_pipeline_skips_and_counts_or_raises_on_every_bad_record(
    tokenizer, media_root, on_error, records
):
    builder = _builder(tokenizer, media_root, on_error)
    bad = []
    for index, raw in enumerate(records):
        try:
            builder(raw, index, 'unimoe_json/fuzz')
        except formats.RecordError:
            bad.append(index)
    elements = [{'raw': raw.encode(), 'index': i} for i, raw in enumerate(records)]
    examples = grain.MapDataset.source(elements).map(
        json_pipeline._BuildExample(builder, 'unimoe_json/fuzz')
    )
    kept = json_pipeline._SkipBadDataset(examples.to_iter_dataset(), on_error, len(records))
    iterator = iter(kept)
    if on_error == 'raise' and bad:
        with pytest.raises(formats.RecordError, match=f'record {bad[0]} '):
            list(iterator)
        return
    rows = list(iterator)
    assert len(rows) == len(records) - len(bad)
    # Bad records after the last good one have no row to be counted in.
    trailing = sum(1 for i in bad if i > max(set(range(len(records))) - set(bad), default=-1))
    assert sum(int(r['num_skipped']) for r in rows) == len(bad) - trailing
