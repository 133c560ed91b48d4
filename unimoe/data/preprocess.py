"""Decoding and preprocessing of real media files, as the reference models expect them (Uni-MoE's
processors: CLIP image processor, Whisper feature extractor, uniform video frame sampling).

- images: CLIP's transform (shortest side resized with bicubic, centre crop, /255, CLIP mean/std),
  optionally after Uni-MoE's pad-to-square with the mean colour (`image_aspect='pad'`);
- speech: any file PyAV (FFmpeg) decodes, averaged to mono, resampled to 16 kHz, cut into chunks
  of `frames_per_chunk * 160` samples (30 s for Whisper's 3000 frames), each chunk a Whisper log-mel;
- video: `num_frames` frames at evenly spaced positions, from a list of frame images or a file.

Audio and video files are read from a stream (a file, a zip member, or bytes) and never held whole:
audio past the caller's limit is refused from its header or after decoding up to that limit
(`AudioTooLongError`), and a video keeps only the frames it samples.
Decoding failures raise `MediaError` naming the file; callers add the record and field.
"""

from __future__ import annotations

import io
import math
import wave
from typing import BinaryIO

import av
import numpy as np
from PIL import Image

from unimoe.data import media

IMAGE_ASPECTS = ("square", "pad")
WHISPER_HOP = 160


class MediaError(ValueError):
    """A media file that cannot be decoded (truncated, empty, not an image / audio / video)."""


class AudioTooLongError(MediaError):
    """Audio longer than the caller's `max_samples`, with its length when the file's header says."""

    def __init__(self, name: str, seconds: float | None, limit_seconds: float):
        length = "longer than" if seconds is None else f"{seconds:.1f} s long, more than"
        super().__init__(f"{name}: {length} the {limit_seconds:.1f} s allowed")


class _PastLimit(Exception):
    """Raised by the audio readers when a file has more samples than asked for."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds


# Audio this far past a limit is too long whatever the resampler does at the ends (it keeps or
# loses at most a few dozen samples); a file within the margin is decoded whole and measured.
_LIMIT_MARGIN_SECONDS = 1.0


def _as_stream(source: bytes | BinaryIO) -> BinaryIO:
    return io.BytesIO(source) if isinstance(source, bytes) else source


def decode_image(data: bytes, name: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB pixels; a truncated or unreadable file raises MediaError."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes now: a truncated file fails here, not later in a worker
            return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"{name}: cannot decode image ({e})") from e


def expand_to_square(image_hwc: np.ndarray) -> np.ndarray:
    """Uni-MoE's `expand2square`: pads to a square of the CLIP mean colour, image centred."""
    height, width, _ = image_hwc.shape
    side = max(height, width)
    background = np.array([int(m * 255) for m in media.CLIP_MEAN], np.uint8)
    out = np.broadcast_to(background, (side, side, 3)).copy()
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = image_hwc
    return out


def clip_transform(image_hwc: np.ndarray, size: int, image_aspect: str = "square") -> np.ndarray:
    """float32 [size, size, 3]: CLIPImageProcessor(shortest_edge=size, crop size x size) on uint8 RGB.

    'square' is the reference scripts' setting (no padding: the crop cuts the long side);
    'pad' first pads to a square so the whole image stays visible.
    """
    if image_aspect not in IMAGE_ASPECTS:
        raise ValueError(f"image_aspect must be one of {IMAGE_ASPECTS}, got {image_aspect!r}")
    if image_aspect == "pad":
        image_hwc = expand_to_square(image_hwc)
    height, width, _ = image_hwc.shape
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)  # truncation, as transformers' resize-size rule
    new_hw = (new_long, size) if height > width else (size, new_long)
    resized = Image.fromarray(image_hwc).resize(new_hw[::-1], Image.Resampling.BICUBIC)
    pixels = np.asarray(resized)
    top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
    return media.normalize_image(pixels[top : top + size, left : left + size])


# FFmpeg's stream probing reads up to 5 MB by default, which costs ~50 ms per short WAV; the
# header (and one frame of a compressed stream) is enough: the rate is read off decoded frames.
_AUDIO_PROBE_OPTIONS = {"probesize": "32768"}
# Container metadata (titles, tags) is never used; undecodable bytes in it must not fail a file
# whose media decode fine (PyAV's default 'strict' raises UnicodeDecodeError).
_METADATA_ERRORS = "replace"


def _frame_limit(max_seconds: float | None, rate: int) -> int | None:
    return None if max_seconds is None else math.ceil(max_seconds * rate)


def _read_pcm_wav(
    source: bytes | BinaryIO, max_seconds: float | None = None
) -> tuple[np.ndarray, int] | None:
    """Mono samples (channel mean) and rate of a 16-bit PCM WAV (stdlib `wave`), else None.

    The common case of speech corpora, read without FFmpeg's per-file setup (~10 ms). A file
    whose header declares more than `max_seconds` raises `_PastLimit` after reading at most one
    frame past the limit (a truncated file may have fewer frames than its header says).
    """
    stream = _as_stream(source)
    header = stream.read(12)  # b"RIFF", size, b"WAVE"
    if header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        return None
    stream.seek(0)
    try:
        with wave.open(stream) as w:
            if w.getsampwidth() != 2 or w.getcomptype() != "NONE":
                return None
            channels, rate, declared = w.getnchannels(), w.getframerate(), w.getnframes()
            if rate <= 0:
                return None  # FFmpeg reports it
            limit = _frame_limit(max_seconds, rate)
            wanted = declared if limit is None else min(declared, limit + 1)
            frames = w.readframes(wanted)
    except (wave.Error, EOFError, RuntimeError):  # RuntimeError: a chunk size past the end
        return None  # let FFmpeg try, and report
    if len(frames) != wanted * 2 * channels:
        return None  # a truncated file: FFmpeg decodes the whole frames there are, or reports
    if wanted < declared:
        raise _PastLimit(declared / rate)
    pcm = np.frombuffer(frames, "<i2")
    # Channel sum by strided slices: numpy's mean over a length-2 inner axis costs ~1 ms a clip.
    mono = pcm[0::channels].astype(np.float64)
    for channel in range(1, channels):
        mono += pcm[channel::channels]
    return mono / (channels * 32768.0), rate


def _decode_with_ffmpeg(
    source: bytes | BinaryIO, name: str, max_seconds: float | None = None
) -> tuple[np.ndarray, int | None]:
    """Mono samples (channel mean) and rate of any audio FFmpeg decodes; past `max_seconds` it
    stops decoding and raises `_PastLimit`."""
    chunks, rate, count = [np.zeros(0)], None, 0
    try:
        with av.open(
            _as_stream(source),
            mode="r",
            options=_AUDIO_PROBE_OPTIONS,
            metadata_errors=_METADATA_ERRORS,
        ) as container:
            if not container.streams.audio:
                raise MediaError(f"{name}: no audio stream")
            for frame in container.decode(container.streams.audio[0]):
                rate = frame.sample_rate
                # [channels, samples] (planar) or [1, samples * channels] (packed).
                samples = frame.to_ndarray()
                if frame.format.is_packed:
                    samples = samples.reshape(-1, len(frame.layout.channels)).T
                if samples.dtype.kind == "i":
                    samples = samples / float(np.iinfo(samples.dtype).max + 1)
                chunks.append(samples.astype(np.float64).mean(axis=0))
                count += len(chunks[-1])
                limit = _frame_limit(max_seconds, rate)
                if limit is not None and count > limit:
                    duration = container.duration  # microseconds, None if unknown
                    raise _PastLimit(None if duration is None else duration / 1e6)
    except av.error.FFmpegError as e:
        raise MediaError(f"{name}: cannot decode audio ({e})") from e
    return np.concatenate(chunks), rate


def decode_audio(
    source: bytes | BinaryIO,
    name: str,
    sample_rate: int = media.SAMPLE_RATE,
    max_samples: int | None = None,
) -> np.ndarray:
    """float32 mono samples at `sample_rate` (channels averaged, as librosa.to_mono).

    16-bit PCM WAVs are read with the stdlib; everything else (and WAVs it rejects) with PyAV.
    Audio more than a second longer than `max_samples` raises `AudioTooLongError`, decided from
    a WAV's header or after decoding up to that length, so memory and time follow the limit, not
    the file; shorter audio is decoded whole (the caller measures it).
    """
    stream = _as_stream(source)
    limit_seconds = None if max_samples is None else max_samples / sample_rate
    max_seconds = None if limit_seconds is None else limit_seconds + _LIMIT_MARGIN_SECONDS
    try:
        decoded = _read_pcm_wav(stream, max_seconds)
        if decoded is None:
            stream.seek(0)
            decoded = _decode_with_ffmpeg(stream, name, max_seconds)
    except _PastLimit as e:
        raise AudioTooLongError(name, e.seconds, limit_seconds) from None
    samples, rate = decoded
    if len(samples) == 0:
        raise MediaError(f"{name}: audio has no samples")
    if rate != sample_rate:
        count = len(samples)
        samples = _resample(samples, rate, sample_rate)
        if len(samples) == 0:
            # FFmpeg's resampler swallows a few dozen samples into its filter delay.
            raise MediaError(
                f"{name}: {count} samples at {rate} Hz are too few to resample to {sample_rate} Hz"
            )
    return samples.astype(np.float32)


def _resample(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """FFmpeg's resampler (libswresample, through PyAV): what Whisper's `load_audio` runs
    (`ffmpeg -ar 16000`), and 1.5x faster here than `speech.resample`'s numpy polyphase sinc."""
    frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(samples, np.float32)[None], format="flt", layout="mono"
    )
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
    frames = resampler.resample(frame) + resampler.resample(None)  # None flushes the filter
    return np.concatenate([np.zeros(0, np.float32)] + [f.to_ndarray()[0] for f in frames])


def num_chunks(num_samples: int, chunk_samples: int) -> int:
    """Chunks of `chunk_samples` covering `num_samples` samples (the last one partial), >= 1."""
    return max(1, -(-num_samples // chunk_samples))


def chunked_log_mel(
    wave: np.ndarray, num_mel_bins: int, frames_per_chunk: int, max_chunks: int, gap: int = 0
) -> np.ndarray:
    """float32 [C, frames_per_chunk, num_mel_bins]: chunks every chunk + `gap` samples, each a
    Whisper log-mel of the chunk's samples.

    The last chunk is zero-padded (as WhisperFeatureExtractor pads to 30 s); chunks past
    `max_chunks` are dropped (the reference caps a file at 20 chunks = 10 minutes; the pipeline
    rejects such records instead). Uni-MoE's speech preprocessing takes 480001 samples per step
    and its extractor keeps the first 480000, dropping one sample per boundary: `gap=1`
    (`JsonDataConfig.audio_chunk_gap`); 0 gives exact consecutive 30-s windows.
    """
    chunk = frames_per_chunk * WHISPER_HOP
    stride = chunk + gap
    count = min(num_chunks(len(wave), stride), max_chunks)
    return np.stack(
        [
            media.log_mel(wave[i * stride : i * stride + chunk], num_mel_bins, frames_per_chunk)
            for i in range(count)
        ]
    )


def sample_frame_indices(num_available: int, num_frames: int) -> np.ndarray:
    """`num_frames` evenly spaced indices, first and last included (repeats when too few)."""
    if num_available < 1:
        raise ValueError("no frames to sample from")
    return np.round(np.linspace(0, num_available - 1, num_frames)).astype(np.int64)


def _sampled_frames(
    stream: BinaryIO, name: str, num_frames: int, total: int | None
) -> tuple[int, dict[int, np.ndarray], int]:
    """(`total`, RGB frames at the indices sampled for `total` frames, frames in the file).

    `total` None takes the count the container declares (0 when it does not say: nothing is
    kept). Only the sampled frames are converted and kept, so memory does not grow with the file.
    """
    stream.seek(0)
    try:
        with av.open(stream, mode="r", metadata_errors=_METADATA_ERRORS) as container:
            if not container.streams.video:
                raise MediaError(f"{name}: no video stream")
            video = container.streams.video[0]
            total = video.frames if total is None else total
            wanted = set(sample_frame_indices(total, num_frames).tolist()) if total > 0 else set()
            kept, count = {}, 0
            for count, frame in enumerate(container.decode(video), 1):
                if count - 1 in wanted:
                    kept[count - 1] = frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as e:
        raise MediaError(f"{name}: cannot decode video ({e})") from e
    return total, kept, count


def decode_video(source: bytes | BinaryIO, name: str, num_frames: int) -> np.ndarray:
    """uint8 [num_frames, H, W, 3] frames of a video file, evenly spaced over its length.

    One decoding pass when the container declares the right frame count (MP4 does), else a
    second one after the first has counted the frames.
    """
    stream = _as_stream(source)
    declared, kept, count = _sampled_frames(stream, name, num_frames, total=None)
    if count == 0:
        raise MediaError(f"{name}: video has no frames")
    if declared != count:  # the container did not say, or said wrong
        _, kept, _ = _sampled_frames(stream, name, num_frames, total=count)
    return np.stack([kept[i] for i in sample_frame_indices(count, num_frames)])
