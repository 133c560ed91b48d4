"""Uni-MoE JSON readers, reference preprocessing (CLIP, Whisper, video) and Vicuna v1 masking."""

import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import transformers

from unimoe.data import formats, preprocess, vicuna
from unimoe.data.tokenizer import PretrainedTokenizer
from unimoe.eval import benchmarks

from tests.data import real_corpus
from tests.data.real_corpus import FIXTURES


def read_records(path) -> list[formats.Record]:
    """Every record of `path`; raises the first RecordError."""
    out = []
    for item in formats.iter_records(path):
        if isinstance(item, formats.RecordError):
            raise item
        out.append(item)
    return out

RECORD_FILES = sorted(p.name for p in FIXTURES.glob("eval_*.json")) + ["train_samples.json"]


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory) -> PretrainedTokenizer:
    path = real_corpus.train_sentencepiece(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    return PretrainedTokenizer(path)


# ----------------------------------------------------------------------------- readers


@pytest.mark.parametrize("name", RECORD_FILES)
def test_reader_parses_every_fixture_record(name):
    raws = json.loads((FIXTURES / name).read_text())
    records = read_records(FIXTURES / name)
    assert len(records) == len(raws) == 25 or name == "train_samples.json"
    for raw, record in zip(raws, records, strict=True):
        text = "".join(t["value"] for t in record.conversations)
        assert text.count("<image>") == len(record.images) <= 1
        assert text.count("<audio>") == len(record.voices)
        assert record.id == str(raw.get("id", raw.get("question_id", f"#{record.index}")))
        for key in ("gt", "answer", "category", "capability", "text"):
            if key in raw:
                assert record.extra[key] == raw[key]


def test_reader_reads_the_training_sample_shapes():
    records = read_records(FIXTURES / "train_samples.json")
    # image + spoken question: the voice has no <audio> tag, so (as in the reference) it is unused.
    assert records[0].images == ("/path/to/file.jpg",) and records[0].voices == ()
    assert records[0].unused_voices == 1
    assert [r.modality_type for r in records] == [1, 2, 2, 6, 3]
    assert len(records[3].video) == 8 and not records[3].is_video_file
    assert len(records[4].voices) == 4 and len(records[4].conversations) == 8


def test_mmbench_gets_an_image_tag_and_annotations_are_read():
    record = read_records(FIXTURES / "eval_mmbench11.json")[0]
    assert record.conversations[0]["value"].startswith("<image>\n")
    assert record.images == ("MMBench1.1/241.jpg",) and record.extra["answer"] == ["B"]
    answers = benchmarks.read_answers_file(FIXTURES / "textvqa_annotations_val.json", "textvqa")
    camera = answers[("003a8ae2ef43b901", "what is the brand of this camera?")]
    assert len(answers) == 25 and len(camera) == 10 and camera[1] == "dakota"


@pytest.mark.parametrize(
    "raw,field,message",
    [
        ([1, 2], "<record>", "JSON object"),
        ({"conversations": []}, "conversations", "non-empty"),
        ({"conversations": [{"from": "gpt", "value": "x"}]}, "conversations[0].from", "'human'"),
        ({"image": 3, "conversations": [{"from": "human", "value": "<image>"}]}, "image", "path"),
        ({"conversations": [{"from": "human", "value": "<video>"}]}, "video", "1 <video>"),
        (
            {"voice": ["a", "b"], "conversations": [{"from": "human", "value": "<audio>"}]},
            "voice",
            "2 voice",
        ),
    ],
)
def test_bad_records_name_file_index_id_and_field(raw, field, message):
    raw = {**raw, "id": "r7"} if isinstance(raw, dict) else raw
    with pytest.raises(formats.RecordError, match=message) as info:
        formats.parse_record(raw, 3, "f.json")
    assert (info.value.file, info.value.index, info.value.field) == ("f.json", 3, field)
    assert str(info.value).startswith("f.json: record 3 (id ")


def test_record_errors_survive_pickling_between_processes():
    error = formats.RecordError("f.json", 4, "r4", "voice[1]", "no such file")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.file, copy.index, copy.record_id, copy.field, copy.message) == (
        "f.json",
        4,
        "r4",
        "voice[1]",
        "no such file",
    )
    assert str(copy) == str(error)


def test_media_store_reads_folders_and_zips(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"folder")
    with zipfile.ZipFile(tmp_path / "m.zip", "w") as z:
        z.writestr("a/x.bin", b"zipped")
    assert formats.MediaStore(tmp_path).read("/a/x.bin") == b"folder"
    assert formats.MediaStore(tmp_path / "m.zip").read("/a/x.bin") == b"zipped"
    with pytest.raises(FileNotFoundError, match="m.zip:a/y.bin"):
        formats.MediaStore(tmp_path / "m.zip").read("a/y.bin")
    # A truncated zip is refused as such, not read as a folder where every file is missing.
    (tmp_path / "cut.zip").write_bytes((tmp_path / "m.zip").read_bytes()[:30])
    with pytest.raises(FileNotFoundError, match="cut.zip is a file but not a zip archive"):
        formats.MediaStore(tmp_path / "cut.zip")


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize("hw", [(200, 317), (317, 200), (64, 64), (20, 90)])
@pytest.mark.parametrize("aspect", ["square", "pad"])
def test_clip_transform_matches_clip_image_processor(hw, aspect):
    image = np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}
    )
    source = preprocess.expand_to_square(image) if aspect == "pad" else image
    expected = processor(source, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(preprocess.clip_transform(image, 48, aspect), expected, atol=1e-5)


def test_pad_to_square_uses_the_mean_colour():
    padded = preprocess.expand_to_square(np.zeros((2, 6, 3), np.uint8))
    assert padded.shape == (6, 6, 3)
    np.testing.assert_array_equal(padded[0, 0], [122, 116, 104])  # int(255 * CLIP mean)
    np.testing.assert_array_equal(padded[2:4], 0)


def test_truncated_jpeg_is_a_media_error(tmp_path):
    real_corpus.write_jpeg(tmp_path / "x.jpg", np.random.default_rng(0))
    data = (tmp_path / "x.jpg").read_bytes()
    assert preprocess.decode_image(data, "x.jpg").shape == (48, 64, 3)
    with pytest.raises(preprocess.MediaError, match="x.jpg: cannot decode image"):
        preprocess.decode_image(data[:200], "x.jpg")


# ----------------------------------------------------------------------------- speech


def test_chunked_log_mel_matches_whisper_feature_extractor_per_30s_chunk():
    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * 65.5)) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 300 * t * (1 + t / 100)) + 0.02 * rng.standard_normal(len(t))
    mels = preprocess.chunked_log_mel(wave.astype(np.float32), 80, 3000, max_chunks=20)
    assert mels.shape == (3, 3000, 80)  # 65.5 s -> 30 + 30 + 5.5 (zero-padded)
    extractor = transformers.WhisperFeatureExtractor(feature_size=80)
    for i in range(3):
        chunk = wave[i * 480000 : (i + 1) * 480000].astype(np.float32)
        expected = extractor(chunk, sampling_rate=16000, return_tensors="np")["input_features"][0].T
        assert np.abs(mels[i] - expected).max() <= 1e-4
    assert preprocess.chunked_log_mel(wave, 80, 3000, max_chunks=2).shape[0] == 2


def test_a_one_sample_gap_chunks_as_uni_moes_speech_preprocessing():
    """Uni-MoE's eval.py / data.py: while more than 480000 samples are left, feed the next 480001
    to WhisperFeatureExtractor (which keeps 30 s) and move on by 480001; then the rest."""
    wave = np.random.default_rng(1).standard_normal(2 * 480001 + 7).astype(np.float32) * 0.1
    extractor = transformers.WhisperFeatureExtractor(feature_size=80)
    official, rest = [], wave
    while len(rest) > 0:
        chunk, rest = (rest[:480001], rest[480001:]) if len(rest) > 480000 else (rest, rest[:0])
        official.append(extractor(chunk, sampling_rate=16000, return_tensors="np")["input_features"][0].T)
    mels = preprocess.chunked_log_mel(wave, 80, 3000, max_chunks=20, gap=1)
    assert mels.shape[0] == len(official) == 3
    np.testing.assert_allclose(mels, np.stack(official), atol=1e-4)
    # Without the gap the windows start one sample earlier each: not the same features.
    assert np.abs(preprocess.chunked_log_mel(wave, 80, 3000, max_chunks=20)[1] - official[1]).max() > 1e-3


def test_decode_audio_downmixes_and_resamples_to_16k():
    data = real_corpus.wav_bytes(1.5, rate=44100, channels=2, freq=440.0)
    wave = preprocess.decode_audio(data, "s.wav")
    assert wave.shape == (24000,) and wave.dtype == np.float32
    expected = 0.4 * np.sin(2 * np.pi * 440 * np.arange(24000) / 16000)
    assert np.abs(wave - expected)[400:-400].max() < 2e-3
    with pytest.raises(preprocess.MediaError, match="e.wav: audio has no samples"):
        preprocess.decode_audio(real_corpus.wav_bytes(0.0), "e.wav")
    with pytest.raises(preprocess.MediaError, match="n.wav"):
        preprocess.decode_audio(b"not audio at all", "n.wav")


def test_pcm_wav_fast_path_matches_ffmpeg_decoding():
    data = real_corpus.wav_bytes(0.7, rate=22050, channels=2, freq=300.0)
    mono, rate = preprocess._read_pcm_wav(data)
    ffmpeg_mono, ffmpeg_rate = preprocess._decode_with_ffmpeg(data, "s.wav")
    assert rate == ffmpeg_rate == 22050 and mono.shape == (int(0.7 * 22050),)
    np.testing.assert_allclose(mono, ffmpeg_mono, atol=1e-12)
    assert preprocess._read_pcm_wav(b"ID3" + data[3:]) is None  # not RIFF: FFmpeg's job


# ----------------------------------------------------------------------------- video


def test_uniform_eight_frames_from_lists_and_files():
    np.testing.assert_array_equal(preprocess.sample_frame_indices(8, 8), np.arange(8))
    np.testing.assert_array_equal(
        preprocess.sample_frame_indices(15, 8), [0, 2, 4, 6, 8, 10, 12, 14]
    )
    np.testing.assert_array_equal(preprocess.sample_frame_indices(3, 4), [0, 1, 1, 2])
    frames = preprocess.decode_video(real_corpus.video_bytes(15), "c.mp4", 8)
    assert frames.shape == (8, 32, 48, 3)
    # Frame i of the clip is grey level 10 + 15 i; lossy coding moves levels by a few units.
    levels = frames.reshape(8, -1).mean(axis=1)
    np.testing.assert_allclose(levels, 10 + 15 * np.array([0, 2, 4, 6, 8, 10, 12, 14]), atol=4)
    with pytest.raises(preprocess.MediaError, match="bad.mp4"):
        preprocess.decode_video(b"\x00" * 100, "bad.mp4", 8)


# ----------------------------------------------------------------------------- text


def test_pretrained_tokenizer_reads_sentencepiece_and_appends_placeholders(sp_tokenizer, tmp_path):
    tok = sp_tokenizer
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert (tok.image_id, tok.video_id, tok.audio_id) == (320, 321, 322) and tok.vocab_size == 323
    ids = tok.encode("What is in the motorcyclist's mouth?")
    assert tok.decode(ids) == "What is in the motorcyclist's mouth?"
    with pytest.raises(FileNotFoundError, match="tokenizer file"):
        PretrainedTokenizer(tmp_path / "none.model")


def test_pretrained_tokenizer_reads_tokenizer_json(tmp_path):
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    backend.train_from_iterator(["a cat and a dog", "USER: ASSISTANT:"], trainer=trainer)
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = PretrainedTokenizer(tmp_path / "tokenizer.json")
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.image_id == backend.get_vocab_size()
    assert tok.decode(tok.encode("a cat and a dog")) == "a cat and a dog"


def test_vicuna_labels_on_multi_turn_speech_conversation(sp_tokenizer):
    tok = sp_tokenizer
    record = read_records(FIXTURES / "train_samples.json")[4]
    answers = [t["value"] for t in record.conversations[1::2]]
    tokens, loss_mask = vicuna.build_example(
        record.conversations,
        tok,
        n_image_tokens=6,
        n_video_tokens=6,
        audio_tokens=[2, 4, 2, 3],
        seq_len=1500,
    )
    text = vicuna.conversation_text(record.conversations, with_last_answer=True)
    assert text.startswith(vicuna.SYSTEM_PROMPT + " USER: <image>\n<audio> ASSISTANT: ")
    assert text.count("</s>USER: <audio> ASSISTANT: ") == 3
    # Placeholders: 6 image tokens, then the k-th <audio> expands to its own length.
    assert (tokens == tok.image_id).sum() == 6 and (tokens == tok.audio_id).sum() == 11
    assert not loss_mask[(tokens == tok.image_id) | (tokens == tok.audio_id)].any()
    # Supervised = each answer and its </s>, nothing else (the reference's preprocess_va).
    supervised = tokens[loss_mask > 0]
    assert (supervised == tok.eos_id).sum() == 4 and supervised[-1] == tok.eos_id
    pieces = np.split(supervised, np.flatnonzero(supervised == tok.eos_id)[:-1] + 1)
    assert [tok.decode(p).strip() for p in pieces] == answers
    assert loss_mask[0] == 0 and not loss_mask[np.flatnonzero(tokens == tok.pad_id)].any()
    prompt = vicuna.build_prompt(
        record.conversations[:3], tok, n_image_tokens=6, n_video_tokens=6, audio_tokens=[2, 4]
    )
    first = tokens[: len(prompt)]
    np.testing.assert_array_equal(prompt[:-1], first[:-1])  # same prefix up to "ASSISTANT:"
    with pytest.raises(vicuna.SequenceTooLongError, match="seq_len=100"):
        vicuna.build_example(
            record.conversations,
            tok,
            n_image_tokens=6,
            n_video_tokens=6,
            audio_tokens=[2, 4, 2, 3],
            seq_len=100,
        )


def test_vicuna_masking_follows_the_reference_round_arithmetic(sp_tokenizer):
    """The -2 of preprocess_va: the instruction's BOS and the trailing space token."""
    tok = sp_tokenizer
    convs = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "cigarette"}]
    text = vicuna.conversation_text(convs, with_last_answer=True)
    ids = vicuna.tokenize(text, tok)
    supervised = vicuna.reference_supervision(text, ids, tok)
    prefix = vicuna.tokenize(text.split("ASSISTANT: ")[0] + "ASSISTANT: ", tok)
    assert prefix[-1] == tok.encode(" ")[-1]  # "ASSISTANT: " ends in a lone space piece
    assert supervised.sum() == len(ids) - (len(prefix) - 1)
    assert io.StringIO(tok.decode([i for i, s in zip(ids, supervised) if s])).read() == "cigarette"
