"""Long media are refused or sampled without being read whole: memory follows the audio chunk
limit (`max_audio_chunks` chunks of 30 s), not the file (docs/design.md, "Real data")."""

import contextlib
import io
import json
import tracemalloc
import zipfile

import av
import numpy as np
import pytest

from tests.data import real_corpus
from unimoe.data import check, formats, json_pipeline, preprocess

RATE = 16000


@contextlib.contextmanager
def _tracing_memory():
    """`tracemalloc`, tracing (numpy's buffers included) until the block ends."""
    tracemalloc.start()
    try:
        yield tracemalloc
    finally:
        tracemalloc.stop()


def _config(media_root, **overrides) -> json_pipeline.JsonDataConfig:
    """Default audio shapes (30-s chunks); small image and video slots, which take memory too."""
    return json_pipeline.JsonDataConfig(
        data_dir="",
        media_root=str(media_root),
        seq_len=2048,
        batch_size=1,
        image_size=16,
        num_frames=2,
        **overrides,
    )


def _allowed_bytes(cfg: json_pipeline.JsonDataConfig) -> int:
    """float64 samples of the audio `cfg`'s chunk limit allows in a record."""
    return cfg.max_audio_chunks * cfg.audio_frames * preprocess.WHISPER_HOP * 8


def test_check_refuses_a_two_hour_wav_from_its_header(tmp_path):
    real_corpus.silent_wav(tmp_path / "long.wav", 2 * 3600)  # 230 MB as written
    (tmp_path / "data.json").write_text(json.dumps([real_corpus.voice_record("/long.wav")]))
    cfg = _config(tmp_path)
    with _tracing_memory() as memory:
        total, errors = check.check_file(
            str(tmp_path / "data.json"), read_media=True, tokenizer=None, cfg=cfg
        )
        peak = memory.get_traced_memory()[1]
    assert total == 1 and len(errors) == 1
    error = errors[0]
    assert (error.index, error.record_id, error.field) == (0, "long", "voice[0]")
    assert "long.wav: 7200.0 s long, more than the 120.0 s allowed by max_audio_chunks=4" in (
        error.message
    )
    assert peak < _allowed_bytes(cfg)  # the file is 15x that


@pytest.mark.parametrize("sample_width", [2, 1])  # 16-bit: stdlib reader; 8-bit: FFmpeg's
def test_a_zipped_wav_past_the_chunks_left_is_refused_while_streaming(tmp_path, sample_width):
    real_corpus.silent_wav(tmp_path / "long.wav", 10 * 60, sample_width)
    with zipfile.ZipFile(tmp_path / "media.zip", "w") as z:  # stored, as media zips are
        z.write(tmp_path / "long.wav", "speech/long.wav")
    cfg = _config(tmp_path / "media.zip", max_audio_chunks=1)
    builder = json_pipeline.ExampleBuilder(cfg, tokenizer=None)
    record = json.dumps(real_corpus.voice_record("/speech/long.wav"))
    with _tracing_memory() as memory:
        with pytest.raises(formats.RecordError, match="more than the 30.0 s allowed") as info:
            builder(record, 3, "d.json")
        peak = memory.get_traced_memory()[1]
    assert (info.value.index, info.value.field) == (3, "voice[0]")
    assert peak < 2 * _allowed_bytes(cfg) < (tmp_path / "long.wav").stat().st_size


def test_audio_within_the_margin_is_decoded_whole_and_measured(tmp_path):
    """Past the limit by less than the margin, the count of chunks decides, as before streaming."""
    data = real_corpus.wav_bytes(2.5, rate=22050)
    wave_16k = preprocess.decode_audio(io.BytesIO(data), "a.wav", max_samples=2 * RATE)
    assert len(wave_16k) == int(2.5 * 22050) * RATE // 22050
    with pytest.raises(preprocess.AudioTooLongError, match="a.wav: 2.5 s long, more than the 1"):
        preprocess.decode_audio(io.BytesIO(data), "a.wav", max_samples=RATE)


def _all_frames_sampled(data: bytes, num_frames: int) -> np.ndarray:
    """What `decode_video` returned when it held every frame: the reference to match."""
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack([frames[i] for i in preprocess.sample_frame_indices(len(frames), num_frames)])


@pytest.mark.parametrize("container_format, declared", [("mp4", 15), ("matroska", 0)])
def test_video_frames_are_sampled_while_decoding(container_format, declared):
    data = real_corpus.video_bytes(15, container_format=container_format)
    with av.open(io.BytesIO(data)) as container:
        assert container.streams.video[0].frames == declared  # 0: counted by a first pass
    frames = preprocess.decode_video(io.BytesIO(data), "c.mkv", 4)
    np.testing.assert_array_equal(frames, _all_frames_sampled(data, 4))


def test_check_cli_applies_max_audio_chunks(tmp_path, capsys):
    (tmp_path / "talk.wav").write_bytes(real_corpus.wav_bytes(45.0, rate=RATE))
    (tmp_path / "data.json").write_text(json.dumps([real_corpus.voice_record("/talk.wav")]))
    args = ["check", str(tmp_path / "data.json"), "--media-root", str(tmp_path)]
    assert check.main(args) == 0  # 2 chunks of the default 4
    capsys.readouterr()
    assert check.main([*args, "--max-audio-chunks", "1"]) == 1
    assert capsys.readouterr().out.splitlines()[0] == (
        f"record 0 (id long): voice[0]: {tmp_path}/talk.wav: 45.0 s long, more than the 30.0 s "
        "allowed by max_audio_chunks=1 (3000-frame chunks, 1 left for this file)"
    )
