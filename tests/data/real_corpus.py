"""Writes a small Uni-MoE-format corpus with real media files (JPEG, WAV, MP4, frame lists) for tests.

Good records follow the shapes of the fixture `train_samples.json` (image + spoken question,
audio caption, long speech QA, video frames + audio, multi-turn speech chat, video file);
`BAD_RECORDS` adds one record per kind of bad input, each with the field its error must name.
"""

from __future__ import annotations

import io
import json
import pathlib
import struct
import wave

import av
import numpy as np
import sentencepiece as spm
from PIL import Image

from unimoe.data.conversation import SYSTEM_PROMPT

# (kind, field the error names) of the records `write_corpus(..., with_bad=True)` appends.
FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "unimoe_formats"

BAD_RECORDS = (
    ("truncated_jpeg", "image"),
    ("empty_wav", "voice[0]"),
    ("missing_file", "image"),
    ("bad_record", "conversations"),
    ("tag_count", "voice"),
    ("too_long", "conversations"),
)


def write_jpeg(path: pathlib.Path, rng: np.random.Generator, hw=(48, 64)) -> None:
    pixels = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def wav_bytes(seconds: float, rate: int = 22050, channels: int = 1, freq: float = 440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.4 * np.sin(2 * np.pi * freq * t)
    pcm = (np.repeat(mono[:, None], channels, axis=1) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def silent_wav(path, seconds: float, sample_width: int = 2, rate: int = 16000) -> None:
    """A mono PCM WAV of `seconds` of silence, its samples never written: the file is extended
    to its full size (sparse where the file system allows)."""
    data_bytes = int(seconds * rate) * sample_width
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        *(b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1, 1),  # PCM, mono
        *(rate, rate * sample_width, sample_width, 8 * sample_width, b"data", data_bytes),
    )
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + data_bytes)


def voice_record(*paths: str) -> dict:
    """Record 'long': one `<audio>` tag per voice file."""
    tags = "".join("<audio>\n" for _ in paths)
    return {
        "id": "long",
        "voice": list(paths),
        "conversations": [
            {"from": "human", "value": f"{tags}What is said?"},
            {"from": "gpt", "value": "Nothing."},
        ],
    }


def video_bytes(num_frames: int, hw=(32, 48), container_format: str = "mp4") -> bytes:
    """An MPEG-4 clip whose frame i is uniformly grey level 10 + 15 i (so sampling is checkable)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_format) as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.height, stream.width = hw
        stream.pix_fmt = "yuv420p"
        for i in range(num_frames):
            frame = np.full((*hw, 3), 10 + 15 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def _turns(*values: str) -> list[dict[str, str]]:
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def write_corpus(root: pathlib.Path, *, copies: int = 1, with_bad: bool = False) -> pathlib.Path:
    """Media under `root/media`, records in `root/train.json` (returned)."""
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        write_jpeg(media / f"frame_{i:03d}.jpg", rng)
    write_jpeg(media / "coco.jpg", rng, hw=(60, 40))
    (media / "question.wav").write_bytes(wav_bytes(2.0, 22050, channels=2))
    (media / "caption.wav").write_bytes(wav_bytes(1.0, 16000))
    (media / "article.wav").write_bytes(wav_bytes(4.5, 8000))
    (media / "clip.mp4").write_bytes(video_bytes(12))
    frames = [f"/frame_{i:03d}.jpg" for i in range(8)]
    good = [
        {
            "voice": ["/question.wav"],
            "image": "/coco.jpg",
            "conversations": _turns("What is in the mouth?\n<image>", "cigarette"),
        },
        {
            "voice": ["/caption.wav"],
            "conversations": _turns("<audio>\nGenerate audio caption.", "A machine whines."),
        },
        {
            "voice": ["/article.wav"],
            "conversations": _turns(
                "<audio>\nListen and answer: Switzerland is famous for _ .", "its environment"
            ),
        },
        {
            "video": frames,
            "voice": ["/caption.wav"],
            "conversations": _turns(
                "<audio>\n<video>\nDescribe the video.", "A man dribbles a ball."
            ),
        },
        {
            "image": "/coco.jpg",
            "voice": ["/question.wav", "/caption.wav", "/article.wav"],
            "conversations": _turns(
                "<image>\n<audio>", "A cat and a dog.", "<audio>", "On a bed.", "<audio>", "Yes."
            ),
        },
        {
            "video": ["/clip.mp4"],
            "conversations": _turns("<video>\nWhat happens?", "It gets brighter."),
        },
        {"conversations": _turns("Say hi.", "hi")},
    ]
    records = []
    for c in range(copies):
        records += [{**r, "id": f"good{c}_{i}"} for i, r in enumerate(good)]
    if with_bad:
        (media / "truncated.jpg").write_bytes((media / "coco.jpg").read_bytes()[:200])
        (media / "empty.wav").write_bytes(wav_bytes(0.0))
        records += [
            {
                "id": "truncated_jpeg",
                "image": "/truncated.jpg",
                "conversations": _turns("<image>\nWhat?", "x"),
            },
            {
                "id": "empty_wav",
                "voice": ["/empty.wav"],
                "conversations": _turns("<audio>\nWhat?", "x"),
            },
            {
                "id": "missing_file",
                "image": "/nowhere.jpg",
                "conversations": _turns("<image>\nWhat?", "x"),
            },
            {"id": "bad_record", "conversations": "not a list"},
            {
                "id": "tag_count",
                "voice": ["/caption.wav"],
                "conversations": _turns("<audio>\n<audio>\nWhat?", "x"),
            },
            {"id": "too_long", "conversations": _turns("word " * 400, "x")},
        ]
    path = root / "train.json"
    path.write_text(json.dumps(records))
    return path


def train_sentencepiece(path: pathlib.Path, vocab_size: int = 320) -> pathlib.Path:
    """A tiny LLaMA-like SentencePiece BPE (byte fallback, no whitespace squashing) on the fixtures."""
    fixtures = FIXTURES
    texts = [SYSTEM_PROMPT + " USER: ASSISTANT:"]
    for name in ("train_samples.json", "eval_aokvqa.json", "eval_mmvet.json"):
        for record in json.loads((fixtures / name).read_text()):
            texts += [turn["value"] for turn in record["conversations"]]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts * 2),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path
