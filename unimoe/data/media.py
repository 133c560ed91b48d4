"""Offline, deterministic media for the built-in multimodal dataset.

Everything here is numpy and draws randomness only from the `np.random.Generator` it is given, so
one seed reproduces a whole dataset. Images are flat-coloured shapes on a dark noisy background,
videos move one shape across the frame, sounds are synthetic tones / chirps / beeps / noise bursts,
and speech comes from the espeak-ng library shipped by the `espeakng-loader` wheel (see `speech`).
Audio features follow Whisper's log-mel recipe so a Whisper-style encoder sees the usual input.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from unimoe.data.speech import SAMPLE_RATE, SpeechSynthesizer

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "COLORS",
    "DIRECTIONS",
    "PITCHES",
    "SAMPLE_RATE",
    "SHAPES",
    "SOUND_KINDS",
    "SceneObject",
    "SpeechSynthesizer",
    "log_mel",
    "normalize_image",
    "place_in_clip",
    "random_objects",
    "render_scene",
    "render_video",
    "synth_sound",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "white": (240, 240, 240),
    "purple": (165, 60, 210),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
SOUND_KINDS: tuple[str, ...] = ("tone", "chirp", "beep", "noise")
PITCHES: tuple[str, ...] = ("low", "high")

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

# Sub-pixel samples per axis: shapes are anti-aliased so a 6-pixel circle still reads as round.
_SUPERSAMPLE = 4
_PIXEL_NOISE_STD = 4.0
_BACKGROUND_LEVELS = (10.0, 35.0)
# Empty pixels kept between an object and the image border or another object.
_EDGE_MARGIN = 1.0
_MIN_SIZE_FRACTION = 1 / 5
_MAX_SIZE_FRACTION = 1 / 3.5
_LAYOUT_TRIES = 20
_POSITION_TRIES = 50

_PITCH_HZ = {"low": 300.0, "high": 2000.0}
_MIN_SOUND_SECONDS = 0.1
_FADE_SECONDS = 0.01
_PULSE_FADE_SECONDS = 0.005

# Whisper's feature extractor constants (16 kHz audio, 25 ms windows, 10 ms hop).
_N_FFT = 400
_HOP = 160
_MEL_MAX_HZ = 8000.0
_LOG_FLOOR = 1e-10
_DYNAMIC_RANGE_LOG10 = 8.0


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One shape in a scene; `x`, `y` are the centre of its bounding box and `size` its side, in pixels.

    `x` runs left to right and `y` top to bottom (image row order). A circle's diameter, a square's
    side and an upward triangle's base and height all equal `size`.
    """

    shape: str
    color: str
    x: float
    y: float
    size: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"SceneObject.shape={self.shape!r} is not one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"SceneObject.color={self.color!r} is not one of {tuple(COLORS)}")
        if not self.size > 0:
            raise ValueError(f"SceneObject.size={self.size} must be positive")


def _check_image_size(image_size: int) -> None:
    if image_size < 8:
        raise ValueError(f"image_size={image_size} must be at least 8 pixels")


def random_objects(rng: np.random.Generator, n: int, image_size: int) -> list[SceneObject]:
    """`n` non-overlapping objects with distinct (shape, color) pairs, each fully inside the image."""
    _check_image_size(image_size)
    n_pairs = len(SHAPES) * len(COLORS)
    if not 1 <= n <= n_pairs:
        raise ValueError(f"n={n} must be between 1 and {n_pairs} (distinct shape/color pairs)")
    color_names = tuple(COLORS)
    pairs = [divmod(int(p), len(color_names)) for p in rng.choice(n_pairs, size=n, replace=False)]
    for _ in range(_LAYOUT_TRIES):
        placed: list[SceneObject] = []
        for shape_ix, color_ix in pairs:
            obj = _place_one(rng, SHAPES[shape_ix], color_names[color_ix], image_size, placed)
            if obj is None:
                break
            placed.append(obj)
        else:
            return placed
    raise ValueError(f"could not place n={n} non-overlapping objects in image_size={image_size}")


def _place_one(
    rng: np.random.Generator, shape: str, color: str, image_size: int, placed: list[SceneObject]
) -> SceneObject | None:
    for _ in range(_POSITION_TRIES):
        size = rng.uniform(image_size * _MIN_SIZE_FRACTION, image_size * _MAX_SIZE_FRACTION)
        reach = size / 2 + _EDGE_MARGIN
        x, y = rng.uniform(reach, image_size - reach, size=2)
        # Bounding boxes (plus margin) must be disjoint along at least one axis.
        if all(
            abs(x - o.x) >= (size + o.size) / 2 + _EDGE_MARGIN
            or abs(y - o.y) >= (size + o.size) / 2 + _EDGE_MARGIN
            for o in placed
        ):
            return SceneObject(shape=shape, color=color, x=float(x), y=float(y), size=float(size))
    return None


def _coverage_hw(obj: SceneObject, image_size: int) -> np.ndarray:
    """Fraction of each pixel covered by `obj`, from a regular sub-pixel grid."""
    fine = image_size * _SUPERSAMPLE
    centres = (np.arange(fine) + 0.5) / _SUPERSAMPLE
    dx = centres[None, :] - obj.x
    dy = centres[:, None] - obj.y
    half = obj.size / 2
    if obj.shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif obj.shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # upward triangle: apex at the top of the box, base along its bottom edge
        inside = (dy >= -half) & (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    return inside.reshape(image_size, _SUPERSAMPLE, image_size, _SUPERSAMPLE).mean(axis=(1, 3))


def _background_hwc(image_size: int, level: float) -> np.ndarray:
    return np.full((image_size, image_size, 3), level, np.float64)


def _paint(canvas_hwc: np.ndarray, obj: SceneObject) -> None:
    alpha_hw1 = _coverage_hw(obj, canvas_hwc.shape[0])[..., None]
    canvas_hwc *= 1.0 - alpha_hw1
    canvas_hwc += alpha_hw1 * np.array(COLORS[obj.color], np.float64)


def _add_noise_to_uint8(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = canvas + rng.normal(0.0, _PIXEL_NOISE_STD, canvas.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def render_scene(
    objects: list[SceneObject], image_size: int, rng: np.random.Generator
) -> np.ndarray:
    """uint8 [H, W, 3] image of `objects` on a dark background with mild per-pixel noise."""
    _check_image_size(image_size)
    canvas_hwc = _background_hwc(image_size, rng.uniform(*_BACKGROUND_LEVELS))
    for obj in objects:
        _paint(canvas_hwc, obj)
    return _add_noise_to_uint8(canvas_hwc, rng)


def render_video(
    obj: SceneObject, direction: str, num_frames: int, image_size: int, rng: np.random.Generator
) -> np.ndarray:
    """uint8 [F, H, W, 3] clip of `obj` moving at constant speed in `direction`.

    Only `obj`'s shape, colour, size and cross-axis coordinate are used (`y` for left/right, `x` for
    up/down, clamped inside the frame); the start and the travelled distance (60-100% of the free
    span) are drawn from `rng`. "up" means towards row 0.
    """
    _check_image_size(image_size)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is not one of {DIRECTIONS}")
    if num_frames < 2:
        raise ValueError(f"num_frames={num_frames} must be at least 2 to show motion")
    reach = obj.size / 2 + _EDGE_MARGIN
    low, high = reach, image_size - reach
    if high - low < image_size / 4:
        raise ValueError(
            f"obj.size={obj.size} leaves too little room to move in image_size={image_size}"
        )
    travel = rng.uniform(0.6, 1.0) * (high - low)
    start = rng.uniform(low, high - travel)
    along_f = start + travel * np.linspace(0.0, 1.0, num_frames)
    if direction in ("left", "up"):
        along_f = along_f[::-1]
    horizontal = direction in ("left", "right")
    cross = float(np.clip(obj.y if horizontal else obj.x, low, high))
    level = rng.uniform(*_BACKGROUND_LEVELS)
    frames = []
    for along in along_f:
        x, y = (along, cross) if horizontal else (cross, along)
        canvas_hwc = _background_hwc(image_size, level)
        _paint(canvas_hwc, dataclasses.replace(obj, x=float(x), y=float(y)))
        frames.append(_add_noise_to_uint8(canvas_hwc, rng))
    return np.stack(frames)


def _fade_envelope(num_samples: int, fade_samples: int) -> np.ndarray:
    """Raised-cosine ramps at both ends, so clips start and stop without clicks."""
    envelope = np.ones(num_samples)
    ramp_len = min(fade_samples, num_samples // 2)
    if ramp_len > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp_len) + 0.5) / ramp_len)
        envelope[:ramp_len] = ramp
        envelope[num_samples - ramp_len :] = ramp[::-1]
    return envelope


def synth_sound(kind: str, pitch: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """float32 mono sound event at SAMPLE_RATE, at most `seconds` long (80-100% of it).

    The centre frequency is ~300 Hz ("low") or ~2 kHz ("high") with +-10% jitter; a chirp sweeps
    up from centre/sqrt(2) to centre*sqrt(2) and a noise burst is limited to that band, so every
    kind keeps its energy on its own side of 1 kHz. Peak amplitude is 0.5-0.9.
    """
    if kind not in SOUND_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {SOUND_KINDS}")
    if pitch not in PITCHES:
        raise ValueError(f"pitch={pitch!r} is not one of {PITCHES}")
    if not seconds >= _MIN_SOUND_SECONDS:
        raise ValueError(f"seconds={seconds} must be at least {_MIN_SOUND_SECONDS}")
    num_samples = int(round(seconds * rng.uniform(0.8, 1.0) * SAMPLE_RATE))
    t = np.arange(num_samples) / SAMPLE_RATE
    centre_hz = _PITCH_HZ[pitch] * rng.uniform(0.9, 1.1)
    phase = rng.uniform(0.0, 2 * np.pi)
    if kind == "tone":
        wave = np.sin(2 * np.pi * centre_hz * t + phase)
    elif kind == "chirp":
        start_hz, stop_hz = centre_hz / np.sqrt(2), centre_hz * np.sqrt(2)
        duration = num_samples / SAMPLE_RATE
        wave = np.sin(
            2 * np.pi * (start_hz * t + (stop_hz - start_hz) * t**2 / (2 * duration)) + phase
        )
    elif kind == "beep":
        num_pulses = int(rng.integers(3, 6))
        period = num_samples / num_pulses
        pulse_len = int(period * rng.uniform(0.4, 0.6))
        gate = np.zeros(num_samples)
        pulse_env = _fade_envelope(pulse_len, int(_PULSE_FADE_SECONDS * SAMPLE_RATE))
        for k in range(num_pulses):
            begin = int(k * period)
            gate[begin : begin + pulse_len] = pulse_env
        wave = gate * np.sin(2 * np.pi * centre_hz * t + phase)
    else:  # noise: white noise with everything outside the chirp's band removed
        spectrum = np.fft.rfft(rng.standard_normal(num_samples))
        freqs = np.fft.rfftfreq(num_samples, 1 / SAMPLE_RATE)
        spectrum[(freqs < centre_hz / np.sqrt(2)) | (freqs > centre_hz * np.sqrt(2))] = 0
        wave = np.fft.irfft(spectrum, num_samples)
    wave = wave * _fade_envelope(num_samples, int(_FADE_SECONDS * SAMPLE_RATE))
    wave *= rng.uniform(0.5, 0.9) / np.max(np.abs(wave))
    return wave.astype(np.float32)


def place_in_clip(
    wave: np.ndarray, num_samples: int, rng: np.random.Generator, noise_level: float = 0.005
) -> tuple[np.ndarray, int]:
    """Put `wave` at a random offset of a silent clip, like a recording zero-padded to a fixed length.

    The wave gets a random gain in [0.5, 1.0] and the recorded part (from 0 to the end of the wave)
    gets white noise of std `noise_level`; the rest stays exactly zero. Returns the float32 clip
    [num_samples] and the number of valid (recorded) samples, i.e. where the wave ends.
    """
    wave = np.asarray(wave, np.float64)
    if wave.ndim != 1:
        raise ValueError(f"wave must be 1-D, got shape {wave.shape}")
    if len(wave) > num_samples:
        raise ValueError(f"wave length {len(wave)} exceeds num_samples={num_samples}")
    offset = int(rng.integers(0, num_samples - len(wave) + 1))
    valid = offset + len(wave)
    gain = rng.uniform(0.5, 1.0)
    clip = np.zeros(num_samples)
    clip[:valid] = noise_level * rng.standard_normal(valid)
    clip[offset:valid] += gain * wave
    return np.clip(clip, -1.0, 1.0).astype(np.float32), valid


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above (as librosa / Whisper)."""
    hz = np.asarray(hz, np.float64)
    linear = 3.0 * hz / 200.0
    log_step = 27.0 / np.log(6.4)
    return np.where(hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1e-12) / 1000.0) * log_step, linear)


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    log_step = np.log(6.4) / 27.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(log_step * (mel - 15.0)), 200.0 * mel / 3.0)


@functools.lru_cache(maxsize=8)
def _mel_filters_fm(num_mel_bins: int) -> np.ndarray:
    """[n_fft//2 + 1, num_mel_bins] triangular filters, area-normalised (Slaney)."""
    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, _N_FFT // 2 + 1)
    edges_hz = _mel_to_hz_slaney(np.linspace(0.0, _hz_to_mel_slaney(_MEL_MAX_HZ), num_mel_bins + 2))
    widths_hz = np.diff(edges_hz)
    offsets = edges_hz[None, :] - fft_hz[:, None]
    rising = -offsets[:, :-2] / widths_hz[:-1]
    falling = offsets[:, 2:] / widths_hz[1:]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    return filters * (2.0 / (edges_hz[2:] - edges_hz[:-2]))


def log_mel(wave: np.ndarray, num_mel_bins: int, num_frames: int) -> np.ndarray:
    """float32 [num_frames, num_mel_bins] Whisper log-mel of `wave` (16 kHz) padded/trimmed to num_frames*160."""
    wave = np.asarray(wave, np.float64)
    if wave.ndim != 1:
        raise ValueError(f"wave must be 1-D, got shape {wave.shape}")
    if num_mel_bins < 1:
        raise ValueError(f"num_mel_bins={num_mel_bins} must be positive")
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be positive")
    num_samples = num_frames * _HOP
    fitted = np.zeros(num_samples)
    fitted[: min(len(wave), num_samples)] = wave[:num_samples]
    padded = np.pad(fitted, _N_FFT // 2, mode="reflect")
    # A centred STFT gives num_frames + 1 frames; Whisper drops the last one.
    frames_fn = np.lib.stride_tricks.sliding_window_view(padded, _N_FFT)[::_HOP][:num_frames]
    periodic_hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(_N_FFT) / _N_FFT)
    power_fk = np.abs(np.fft.rfft(frames_fn * periodic_hann, axis=-1)) ** 2
    log_spec = np.log10(np.maximum(power_fk @ _mel_filters_fm(num_mel_bins), _LOG_FLOOR))
    log_spec = np.maximum(log_spec, log_spec.max() - _DYNAMIC_RANGE_LOG10)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def normalize_image(images_uint8: np.ndarray) -> np.ndarray:
    """float32 CLIP-normalised pixels, (x / 255 - mean) / std per channel; any leading dims."""
    images_uint8 = np.asarray(images_uint8)
    if images_uint8.dtype != np.uint8:
        raise ValueError(f"images_uint8 must have dtype uint8, got {images_uint8.dtype}")
    if images_uint8.ndim < 1 or images_uint8.shape[-1] != 3:
        raise ValueError(f"images_uint8 must end in 3 channels, got shape {images_uint8.shape}")
    return ((images_uint8.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32)
