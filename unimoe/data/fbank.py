"""Kaldi filterbanks and BEATs' audio features (Uni-MoE-audio's sound tower), in numpy.

`kaldi_fbank` is `torchaudio.compliance.kaldi.fbank` with the options BEATs calls it with
(Kaldi's defaults: no dither, DC offset removed per frame, pre-emphasis 0.97, Povey window, FFT
size rounded up to a power of two, `snip_edges` framing, power spectrum, mel banks from 20 Hz to
Nyquist on Kaldi's 1127 ln(1 + f / 700) scale, natural log floored at float32's epsilon).

`beats_features` is the reference's audio preprocessing (`Uni_MoE_audio/train/data.py` with
`BEATs.py`'s processor): chunks of exactly `chunk_samples`, the last padded by repeating its final
sample, each chunk's filterbank of the waveform x 2^15, normalised as BEATs was trained, and the
padding mask as BEATs derives it from the padded samples (`frame_padding_mask`).
"""

from __future__ import annotations

import functools

import numpy as np

SAMPLE_RATE = 16000
# BEATs' fbank statistics (`BEATs.preprocess`): features are (fbank - mean) / (2 * std).
BEATS_FBANK_MEAN = 15.41663
BEATS_FBANK_STD = 6.55582
# BEATs' processor scales [-1, 1] samples to the int16 range before Kaldi's filterbank.
BEATS_WAVE_SCALE = 2.0**15
# Kaldi floors mel energies at float32's epsilon before the log (dither-free input can be 0).
_LOG_FLOOR = float(np.finfo(np.float32).eps)
_PREEMPHASIS = 0.97
_POVEY_POWER = 0.85
_LOW_FREQ_HZ = 20.0
# Frames per block of a long input: the per-block intermediates stay ~45 MB at any length.
_BLOCK_FRAMES = 4096


def window_samples(
    sample_rate: int = SAMPLE_RATE, frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0
) -> tuple[int, int]:
    """(window, shift) in samples, truncated as torchaudio computes them."""
    window = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    if window < 2 or shift < 1:
        raise ValueError(
            f"frame_length_ms={frame_length_ms} / frame_shift_ms={frame_shift_ms} at "
            f"{sample_rate} Hz give a {window}-sample window and a {shift}-sample shift; "
            "need >= 2 and >= 1"
        )
    return window, shift


def num_frames(num_samples: int, window: int = 400, shift: int = 160) -> int:
    """Kaldi's frame count with `snip_edges`: only frames that fit whole (0 below one window)."""
    return 0 if num_samples < window else 1 + (num_samples - window) // shift


@functools.lru_cache(maxsize=8)
def _mel_banks_km(num_mel_bins: int, fft_size: int, sample_rate: int) -> np.ndarray:
    """[fft_size // 2 + 1, num_mel_bins] triangles, linear in mel, from 20 Hz to Nyquist; the
    Nyquist bin gets no weight (Kaldi's banks span fft_size / 2 bins)."""
    def mel(hz):
        return 1127.0 * np.log1p(np.asarray(hz, np.float64) / 700.0)

    low, high = mel(_LOW_FREQ_HZ), mel(sample_rate / 2)
    edges = low + np.arange(num_mel_bins + 2) * (high - low) / (num_mel_bins + 1)
    bin_mel = mel(np.arange(fft_size // 2) * sample_rate / fft_size)[:, None]
    left, centre, right = edges[None, :-2], edges[None, 1:-1], edges[None, 2:]
    rising = (bin_mel - left) / (centre - left)
    falling = (right - bin_mel) / (right - centre)
    banks = np.maximum(0.0, np.minimum(rising, falling))
    return np.concatenate([banks, np.zeros((1, num_mel_bins))])


@functools.lru_cache(maxsize=8)
def _povey_window(window: int) -> np.ndarray:
    """A symmetric Hann window raised to 0.85 (zero at both ends)."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(window) / (window - 1))) ** _POVEY_POWER


def _log_mel_block(frames_fn: np.ndarray, fft_size: int, banks_km: np.ndarray) -> np.ndarray:
    """Log mel energies [F, M] of raw frames [F, N] (float64, a fresh array: edited in place)."""
    frames_fn -= frames_fn.mean(axis=1, keepdims=True)
    # Pre-emphasis x[j] - 0.97 x[j-1]. Kaldi's first sample is its own predecessor, but the
    # Povey window is 0 there, so it is left as it is.
    frames_fn[:, 1:] -= _PREEMPHASIS * frames_fn[:, :-1].copy()
    frames_fn *= _povey_window(frames_fn.shape[1])
    spectrum = np.fft.rfft(frames_fn, n=fft_size, axis=1)
    power_fk = spectrum.real**2 + spectrum.imag**2
    return np.log(np.maximum(power_fk @ banks_km, _LOG_FLOOR))


def kaldi_fbank(
    wave: np.ndarray,
    *,
    num_mel_bins: int = 128,
    sample_rate: int = SAMPLE_RATE,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
) -> np.ndarray:
    """float32 [frames, num_mel_bins] Kaldi log filterbank of a 1-D waveform (values as given:
    BEATs passes samples x 2^15).

    A waveform shorter than one window has no whole frame and gives a [0, num_mel_bins] array,
    as Kaldi does (torchaudio raises instead). A long waveform is processed `_BLOCK_FRAMES`
    frames at a time, so memory beyond the input and output does not grow with its length.
    """
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise ValueError(f"wave must be 1-D, got shape {wave.shape}")
    if num_mel_bins < 4:  # Kaldi's and torchaudio's least
        raise ValueError(f"num_mel_bins={num_mel_bins} must be >= 4")
    window, shift = window_samples(sample_rate, frame_length_ms, frame_shift_ms)
    fft_size = 1 << (window - 1).bit_length()
    banks_km = _mel_banks_km(num_mel_bins, fft_size, sample_rate)
    count = num_frames(len(wave), window, shift)
    out = np.empty((count, num_mel_bins), np.float32)
    if count == 0:
        return out
    frames_fn = np.lib.stride_tricks.sliding_window_view(wave, window)[::shift]
    for start in range(0, count, _BLOCK_FRAMES):
        block = frames_fn[start : start + _BLOCK_FRAMES].astype(np.float64)
        out[start : start + len(block)] = _log_mel_block(block, fft_size, banks_km)
    return out


def frame_padding_mask(num_real: int, chunk_samples: int, frames: int) -> np.ndarray:
    """bool [frames]: True on the frames BEATs treats as padding, for a chunk whose first
    `num_real` of `chunk_samples` samples are real.

    BEATs (`forward_padding_mask`) drops the last `chunk_samples % frames` samples of the
    sample mask, views the rest as `frames` groups of `chunk_samples // frames` consecutive
    samples (160 for 30-s chunks; 161 for 3-s ones, not the 160-sample hop), and marks a frame
    padded when its whole group is. With the padding a suffix, that is group start >= num_real.
    """
    group = chunk_samples // frames
    return np.arange(frames) * group >= num_real


def beats_features(
    wave: np.ndarray,
    *,
    chunk_samples: int = 480000,
    max_chunks: int = 20,
    num_mel_bins: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """(fbank float32 [C, F, M] normalised as BEATs, padding_mask bool [C, F], True on padding)
    of a 16-kHz waveform in [-1, 1].

    C = ceil(len / chunk_samples) chunks, at most `max_chunks` (the reference's `trunclen`: later
    audio is dropped, as the reference does; the pipelines refuse such records instead). Every
    chunk has exactly `chunk_samples` samples: the last is padded by repeating its final sample
    (`padding_mask` marks the frames made of that padding only). F = Kaldi's frame count of a
    chunk (2998 for 30 s).
    """
    wave = np.asarray(wave, np.float32)
    if wave.ndim != 1 or len(wave) == 0:
        raise ValueError(f"wave must be 1-D with at least one sample, got shape {wave.shape}")
    if max_chunks < 1:
        raise ValueError(f"max_chunks={max_chunks} must be >= 1")
    window, shift = window_samples()
    frames = num_frames(chunk_samples, window, shift)
    if frames == 0:
        raise ValueError(
            f"chunk_samples={chunk_samples} is shorter than one {window}-sample window"
        )
    count = min(-(-len(wave) // chunk_samples), max_chunks)
    features = np.empty((count, frames, num_mel_bins), np.float32)
    mask = np.zeros((count, frames), bool)
    for c in range(count):
        chunk = wave[c * chunk_samples : (c + 1) * chunk_samples]
        if len(chunk) < chunk_samples:
            mask[c] = frame_padding_mask(len(chunk), chunk_samples, frames)
            chunk = np.concatenate([chunk, np.full(chunk_samples - len(chunk), chunk[-1])])
        features[c] = kaldi_fbank(chunk * np.float32(BEATS_WAVE_SCALE), num_mel_bins=num_mel_bins)
    features -= BEATS_FBANK_MEAN
    features /= 2 * BEATS_FBANK_STD
    return features, mask
