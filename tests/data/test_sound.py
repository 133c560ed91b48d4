"""Audio routed to the sound tower (BEATs features, `unimoe.data.sound`) in the built-in and JSON
pipelines: the slots, the `<audio>` expansion, the rows left alone, bad input and `check`."""

import dataclasses
import io
import json
import math

import numpy as np
import pytest

from tests.data import real_corpus
from unimoe.data import check, fbank, formats, json_builder, json_pipeline, pipeline, preprocess
from unimoe.data import sound, tasks
from unimoe.data.tokenizer import PretrainedTokenizer

ROUTED = ("audio_caption", "audio_qa")
# Odd sizes: 1-s chunks of 16001 samples (98 Kaldi frames), 3 of them hold a 3-s built-in clip.
SOUND = dict(sound_chunk_samples=16001, sound_mel_bins=23, max_sound_chunks=3, n_sound_tokens=5)


@pytest.fixture(scope="module")
def builtin_cfg(builtin_test_data):
    return pipeline.DataConfig(
        data_dir=builtin_test_data,
        builder_config="test",
        seq_len=151,
        batch_size=6,
        image_size=32,
        num_frames=3,
        audio_frames=29,
        num_mel_bins=7,
        n_image_tokens=5,
        n_video_tokens=3,
        n_audio_tokens=7,
        seed=1,
    )


@pytest.fixture(scope="module")
def builtin_tok(builtin_test_data):
    from unimoe.data import builtin

    return builtin.load_or_train_tokenizer(f"{builtin_test_data}/tokenizer.json")


def _stored_audio(cfg, record_id: str) -> np.ndarray:
    from unimoe.data import builtin

    builder = builtin.UnimoeBuiltin(
        config=cfg.builder_config, data_dir=cfg.data_dir, file_format="array_record"
    )
    source = builder.as_data_source(split="eval")
    ids = [source[i]["id"].decode() for i in range(len(source))]
    return source[ids.index(record_id)]["audio"]


def test_builtin_sound_tasks_fill_the_sound_slots_and_leave_other_rows_alone(
    builtin_cfg, builtin_tok
):
    routed_cfg = dataclasses.replace(builtin_cfg, sound_tasks=ROUTED, **SOUND)
    selected = ["audio_qa", "speech_qa", "image_qa"]
    plain = pipeline.load_eval_examples(builtin_cfg, builtin_tok, selected)
    routed = pipeline.load_eval_examples(routed_cfg, builtin_tok, selected)
    frames = fbank.num_frames(16001)
    assert frames == 98 and len(plain) == len(routed) == 24
    for before, after in zip(plain, routed):
        assert set(after) == set(before) | set(sound.KEYS)
        assert after["sound_fbank"].shape == (3, 98, 23)
        assert after["sound_frame_mask"].shape == (3, 98)
        if after["task"] not in ROUTED:  # bit for bit as without routing, empty sound slots
            for key in before:
                np.testing.assert_array_equal(after[key], before[key], err_msg=key)
            assert not after["has_sound"] and not after["sound_chunk_mask"].any()
            assert not after["sound_fbank"].any() and not after["sound_frame_mask"].any()
            continue
        assert after["has_sound"] and not after["has_audio"] and not after["audio_mel"].any()
        # The stored int16 clip, read as the reference reads a 16-bit file (/ 2^15).
        wave = _stored_audio(builtin_cfg, after["id"]) / np.float32(2**15)
        features, mask = fbank.beats_features(
            wave, chunk_samples=16001, max_chunks=3, num_mel_bins=23
        )
        chunks = math.ceil(len(wave) / 16001)
        np.testing.assert_array_equal(after["sound_chunk_mask"], np.arange(3) < chunks)
        np.testing.assert_array_equal(after["sound_fbank"][:chunks], features)
        np.testing.assert_array_equal(after["sound_frame_mask"][:chunks], mask)
        assert mask[-1].any() and not after["sound_frame_mask"][chunks:].any()
        placeholders = int((after["tokens"] == builtin_tok.audio_id).sum())
        assert placeholders == 5 * chunks and (before["tokens"] == builtin_tok.audio_id).sum() == 7
        # The text around the placeholders is the same.
        texts = [
            ex["tokens"][ex["attn_mask"] & (ex["tokens"] != builtin_tok.audio_id)]
            for ex in (before, after)
        ]
        np.testing.assert_array_equal(*texts)


def test_builtin_train_batches_carry_the_sound_keys_only_when_routing(builtin_cfg, builtin_tok):
    tasks_all = list(tasks.TASKS)
    plain = next(iter(pipeline.make_train_loader(builtin_cfg, builtin_tok, tasks_all, "chat")))
    assert not set(sound.KEYS) & set(plain)
    routed_cfg = dataclasses.replace(builtin_cfg, sound_tasks=ROUTED, **SOUND)
    loader = pipeline.make_train_loader(routed_cfg, builtin_tok, ["audio_caption"], "chat")
    batch = next(iter(loader))
    assert batch["sound_fbank"].dtype == np.float32
    assert batch["sound_fbank"].shape == (6, 3, 98, 23)
    assert batch["sound_frame_mask"].shape == (6, 3, 98)
    assert batch["sound_chunk_mask"].shape == (6, 3)
    assert batch["has_sound"].all() and not batch["has_audio"].any()
    chunks = batch["sound_chunk_mask"].sum(axis=1)
    placeholders = (batch["tokens"] == builtin_tok.audio_id).sum(axis=1)
    np.testing.assert_array_equal(placeholders, 5 * chunks)
    # The tiny defaults: a built-in 3-s clip is one 48000-sample chunk of 298 frames x 32 bins.
    default_cfg = dataclasses.replace(builtin_cfg, sound_tasks=ROUTED)
    batch = next(iter(pipeline.make_train_loader(default_cfg, builtin_tok, list(ROUTED), "chat")))
    assert batch["sound_fbank"].shape == (6, 1, 298, 32) and batch["sound_chunk_mask"].all()


def test_builtin_sound_settings_are_checked(builtin_cfg, builtin_tok):
    with pytest.raises(ValueError, match=r"sound_tasks: \['text_qa'\] have no audio"):
        dataclasses.replace(builtin_cfg, sound_tasks=("text_qa",))
    with pytest.raises(ValueError, match=r"DataConfig.sound_chunk_samples=399 must be >= 400"):
        dataclasses.replace(builtin_cfg, sound_chunk_samples=399)
    with pytest.raises(ValueError, match=r"DataConfig.max_sound_chunks=0 must be >= 1"):
        dataclasses.replace(builtin_cfg, max_sound_chunks=0)
    short = dataclasses.replace(
        builtin_cfg, sound_tasks=ROUTED, sound_chunk_samples=16000, max_sound_chunks=2
    )
    with pytest.raises(ValueError, match=r"hold 32000 samples, fewer than the stored clips' 48000"):
        pipeline.make_train_loader(short, builtin_tok, ["audio_qa"], "chat")


# ---- JSON pipeline ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Sources 'clean' (Whisper) and 'sounds', 'dirty_sounds' (the same records, routed)."""
    root = tmp_path_factory.mktemp("sound_corpus")
    clean = real_corpus.write_corpus(root / "clean")
    dirty = real_corpus.write_corpus(root / "dirty", with_bad=True)
    data_dir = root / "tfds"
    json_builder.prepare(data_dir, "clean", clean.parent, clean.name)
    json_builder.prepare(data_dir, "sounds", clean.parent, clean.name)
    json_builder.prepare(data_dir, "dirty_sounds", dirty.parent, dirty.name)
    tokenizer = PretrainedTokenizer(real_corpus.train_sentencepiece(root / "tokenizer.model"))
    return {"root": root, "data_dir": str(data_dir), "json": clean, "tokenizer": tokenizer}


def _json_config(corpus, **overrides) -> json_pipeline.JsonDataConfig:
    values = dict(
        data_dir=corpus["data_dir"],
        sources=("clean", "sounds"),
        media_root=str(corpus["root"] / "dirty" / "media"),
        seq_len=512,
        batch_size=2,
        image_size=16,
        num_frames=4,
        num_mel_bins=16,
        audio_frames=200,
        max_audio_chunks=5,
        n_image_tokens=3,
        n_video_tokens=3,
        n_audio_tokens=2,
        sound_chunk_samples=16001,
        sound_mel_bins=19,
        max_sound_chunks=8,  # the 3-file record: 2 + 1 + 5 one-second chunks
        n_sound_tokens=3,
    )
    return json_pipeline.JsonDataConfig(**{**values, **overrides})


def _voice_waves(corpus, record: formats.Record) -> list[np.ndarray]:
    media = corpus["root"] / "dirty" / "media"
    return [
        preprocess.decode_audio(io.BytesIO((media / p.lstrip("/")).read_bytes()), p)
        for p in record.voices
    ]


def test_a_sound_source_gets_beats_features_and_a_whisper_source_is_unchanged(corpus):
    tok, raws = corpus["tokenizer"], json.loads(corpus["json"].read_text())
    plain_cfg = _json_config(corpus, sources=("clean",))
    cfg = _json_config(corpus, sound_sources=("sounds",))
    plain = json_pipeline.ExampleBuilder(plain_cfg, tok, source="clean")
    whisper = json_pipeline.ExampleBuilder(cfg, tok, source="clean")
    beats = json_pipeline.ExampleBuilder(cfg, tok, source="sounds")
    modalities = []
    for index, raw in enumerate(raws):
        text = json.dumps(raw)
        before, kept, routed = (b(text, index, "f.json") for b in (plain, whisper, beats))
        assert set(kept) == set(routed) == set(before) | set(sound.KEYS)
        for key in before:  # the Whisper source: bit for bit, plus empty sound slots
            np.testing.assert_array_equal(kept[key], before[key], err_msg=key)
        assert not kept["has_sound"] and not kept["sound_chunk_mask"].any()
        record = formats.parse_record(raw, index, "f.json")
        modalities.append(tasks.MODALITIES[routed["modality"]])
        assert routed["has_sound"] == bool(record.voices) and not routed["has_audio"]
        assert not routed["audio_mel"].any() and not routed["audio_chunk_mask"].any()
        per_file = [
            fbank.beats_features(w, chunk_samples=16001, max_chunks=8, num_mel_bins=19)
            for w in _voice_waves(corpus, record)
        ]
        counts = [math.ceil(len(w) / 16001) for w in _voice_waves(corpus, record)]
        assert [len(f) for f, _ in per_file] == counts
        total = sum(counts)
        np.testing.assert_array_equal(routed["sound_chunk_mask"], np.arange(8) < total)
        if per_file:
            features = np.concatenate([f for f, _ in per_file])
            np.testing.assert_array_equal(routed["sound_fbank"][:total], features)
            masks = np.concatenate([m for _, m in per_file])
            np.testing.assert_array_equal(routed["sound_frame_mask"][:total], masks)
        assert (routed["tokens"] == tok.audio_id).sum() == 3 * total
        assert (before["tokens"] == tok.audio_id).sum() == 2 * before["audio_chunk_mask"].sum()
    # Voice-only records of a sound source are "audio"; with an image or video as before.
    assert modalities == ["image", "audio", "audio", "video", "image_speech", "video", "text"]
    unread = json_pipeline.ExampleBuilder(cfg, None, read_media=False, source="sounds")
    flags = [unread(json.dumps(raw), i, "f.json") for i, raw in enumerate(raws)]
    assert [(bool(f["has_sound"]), bool(f["has_audio"])) for f in flags] == [
        (bool(raw.get("voice")) and "<audio>" in json.dumps(raw), False) for raw in raws
    ]


def test_mixed_sources_batch_with_the_same_keys(corpus):
    cfg = _json_config(corpus, sound_sources=("sounds",), weights=(0.5, 0.5))
    it = iter(json_pipeline.make_dataset(cfg, corpus["tokenizer"]))
    batches = [next(it) for _ in range(6)]
    frames = fbank.num_frames(16001)
    for batch in batches:
        assert batch["sound_fbank"].shape == (2, 8, frames, 19)
        assert batch["sound_frame_mask"].shape == (2, 8, frames)
        assert batch["sound_chunk_mask"].shape == (2, 8) and batch["has_sound"].shape == (2,)
        assert not (batch["has_sound"] & batch["has_audio"]).any()
    assert any(b["has_sound"].any() for b in batches) and any(b["has_audio"].any() for b in batches)
    plain = next(iter(json_pipeline.make_dataset(_json_config(corpus), corpus["tokenizer"])))
    assert not set(sound.KEYS) & set(plain)


def test_bad_sound_records_are_raised_or_skipped_and_counted(corpus):
    cfg = _json_config(
        corpus, sources=("dirty_sounds",), sound_sources=("dirty_sounds",), batch_size=1
    )
    raising = dataclasses.replace(cfg, on_error="raise")
    it = iter(json_pipeline.make_dataset(raising, corpus["tokenizer"]))
    with pytest.raises(formats.RecordError) as info:
        for _ in range(3 * 13):
            next(it)
    kind, field = real_corpus.BAD_RECORDS[info.value.index - 7]
    assert (info.value.record_id, info.value.field) == (kind, field)
    skipping = dataclasses.replace(cfg, on_error="skip", seq_len=400)
    it = iter(json_pipeline.make_dataset(skipping, corpus["tokenizer"]))
    kept = skipped = 0
    while kept + skipped < 2 * 13:  # two epochs of 7 good and 6 bad records
        batch = next(it)
        kept, skipped = kept + 1, skipped + int(batch["num_skipped"].sum())
    assert skipped == 2 * len(real_corpus.BAD_RECORDS)


def test_sound_media_errors_name_file_record_and_field(tmp_path):
    (tmp_path / "empty.wav").write_bytes(real_corpus.wav_bytes(0.0))
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage" * 3)
    (tmp_path / "ok.wav").write_bytes(real_corpus.wav_bytes(2.5, rate=16000))
    cfg = json_pipeline.JsonDataConfig(
        data_dir="",
        media_root=str(tmp_path),
        seq_len=256,
        batch_size=1,
        sources=("s",),
        sound_sources=("s",),
        sound_chunk_samples=16000,
        max_sound_chunks=2,
    )
    builder = json_pipeline.ExampleBuilder(cfg, tokenizer=None, source="s")
    cases = {
        "/empty.wav": "audio has no samples",
        "/corrupt.wav": "cannot decode audio",
        "/ok.wav": "3 audio chunks of 16000 samples, more than max_sound_chunks=2",
    }
    for path, message in cases.items():
        with pytest.raises(formats.RecordError, match=message) as info:
            builder(json.dumps(real_corpus.voice_record(path)), 4, "d.json")
        assert (info.value.file, info.value.index, info.value.record_id) == ("d.json", 4, "long")
        assert info.value.field == ("voice" if path == "/ok.wav" else "voice[0]")


def test_check_refuses_a_two_hour_sound_file_from_its_header(tmp_path, capsys):
    real_corpus.silent_wav(tmp_path / "long.wav", 2 * 3600)
    (tmp_path / "talk.wav").write_bytes(real_corpus.wav_bytes(30.5, rate=16000))
    records = [real_corpus.voice_record("/long.wav"), real_corpus.voice_record("/talk.wav")]
    (tmp_path / "data.json").write_text(json.dumps(records))
    args = ["check", str(tmp_path / "data.json"), "--media-root", str(tmp_path), "--sound"]
    assert check.main(args) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("record 0 (id long): voice[0]: ") and lines[0].endswith(
        "long.wav: 7200.0 s long, more than the 600.0 s allowed by max_sound_chunks=20 "
        "(480000-sample chunks, 20 left for this file)"
    )
    assert lines[-1] == "2 records, 1 ok, 1 errors"
    # 30.5 s: within the 1-s margin of one chunk, so decoded and counted (2 chunks).
    assert check.main([*args, "--max-sound-chunks", "1"]) == 1
    out = capsys.readouterr().out
    assert "2 audio chunks of 480000 samples, more than max_sound_chunks=1" in out
    with pytest.raises(SystemExit) as exit_info:
        check.main([*args, "--sound-chunk-samples", "399"])
    assert exit_info.value.code == 2
    assert "--sound-chunk-samples must be >= 400 (got 399)" in capsys.readouterr().err
