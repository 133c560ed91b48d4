"""The sound tower's batch slots, shared by the built-in and the JSON pipelines.

Audio a pipeline routes to the sound tower (Uni-MoE-audio's BEATs + Q-Former) instead of Whisper
becomes BEATs features (`fbank.beats_features`) in fixed-shape slots:

- `sound_fbank` float32 [C, F, M]: C = `max_sound_chunks` chunks of F = Kaldi frames of
  `sound_chunk_samples` (2998 for 30 s), M = `sound_mel_bins`; zeros past the row's chunks;
- `sound_frame_mask` bool [C, F]: True on padding frames, as BEATs' `padding_mask`; all False on
  absent chunks, so a static-shape encoder that runs them anyway never sees a fully masked chunk;
- `sound_chunk_mask` bool [C]: True on the row's chunks (every chunk of every routed file, in
  order);
- `has_sound` bool []: the row has routed audio (its `has_audio` is then False).

A config that routes audio has the fields `sound_chunk_samples`, `sound_mel_bins` and
`max_sound_chunks`; its pipeline adds these slots to every row (zeros and False where the row's
audio is not routed), and only then: a config routing nothing gives the batches it always gave.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unimoe.data import fbank

KEYS: tuple[str, ...] = ("sound_fbank", "sound_frame_mask", "sound_chunk_mask", "has_sound")


def check_fields(cfg: Any) -> None:
    """Raises ValueError naming the first sound field of `cfg` out of range."""
    owner = type(cfg).__name__
    window, _ = fbank.window_samples()
    least = {"sound_chunk_samples": window, "sound_mel_bins": 4, "max_sound_chunks": 1}
    reasons = {
        "sound_chunk_samples": f"one {window}-sample Kaldi window at {fbank.SAMPLE_RATE} Hz",
        "sound_mel_bins": "Kaldi's least mel bank",
        "max_sound_chunks": "one chunk",
    }
    for name, minimum in least.items():
        value = getattr(cfg, name)
        if value < minimum:
            raise ValueError(f"{owner}.{name}={value} must be >= {minimum} ({reasons[name]})")


def frames_per_chunk(cfg: Any) -> int:
    """F: the Kaldi frames of one `sound_chunk_samples` chunk (2998 for 480000 samples)."""
    return fbank.num_frames(cfg.sound_chunk_samples)


def empty_slots(cfg: Any) -> dict[str, np.ndarray]:
    """The slots of a row without routed audio."""
    chunks, frames = cfg.max_sound_chunks, frames_per_chunk(cfg)
    return {
        "sound_fbank": np.zeros((chunks, frames, cfg.sound_mel_bins), np.float32),
        "sound_frame_mask": np.zeros((chunks, frames), bool),
        "sound_chunk_mask": np.zeros((chunks,), bool),
        "has_sound": np.bool_(False),
    }


def fill(slots: dict[str, np.ndarray], per_file: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Puts `beats_features` results of a row's routed files, in order, into its `slots`."""
    features = np.concatenate([f for f, _ in per_file])
    masks = np.concatenate([m for _, m in per_file])
    count = len(features)
    slots["sound_fbank"][:count] = features
    slots["sound_frame_mask"][:count] = masks
    slots["sound_chunk_mask"][:count] = True
    slots["has_sound"] = np.bool_(True)


def features(wave: np.ndarray, cfg: Any, max_chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """`fbank.beats_features` of a 16-kHz waveform with `cfg`'s chunk size and mel bins."""
    return fbank.beats_features(
        wave,
        chunk_samples=cfg.sound_chunk_samples,
        max_chunks=max_chunks,
        num_mel_bins=cfg.sound_mel_bins,
    )
