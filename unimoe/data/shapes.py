"""The shapes of a pipeline's batches, which the model expects: one declaration for the built-in
and the Uni-MoE JSON pipelines (`pipeline.DataConfig`, `json_pipeline.JsonDataConfig` extend it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchShapes:
    """Sequence length, global batch size and media shapes. Defaults are Uni-MoE's preprocessing
    (CLIP ViT-L/14 at 336 px: 576 tokens; Whisper: 80 mel bins, 30-s chunks of 3000 frames, 50
    tokens each; BEATs + Q-Former: 50 tokens per chunk); a run takes its own from `config.data`
    (`from_config_data`)."""

    seq_len: int
    batch_size: int  # global: each of `shard_count` hosts gets batch_size / shard_count rows
    image_size: int = 336
    num_frames: int = 8
    num_mel_bins: int = 80
    audio_frames: int = 3000  # per chunk: 3000 frames * 10 ms = 30 s
    n_image_tokens: int = 576
    n_video_tokens: int = 576
    n_audio_tokens: int = 50  # per chunk
    n_sound_tokens: int = 50  # per BEATs chunk (the sound Q-Former's queries; `unimoe.data.sound`)

    def __post_init__(self):
        for field in dataclasses.fields(BatchShapes):
            value = getattr(self, field.name)
            if value < 1:
                raise ValueError(f"{type(self).__name__}.{field.name} must be >= 1, got {value}")


def from_config_data(data: Mapping[str, Any]) -> dict[str, int]:
    """The media shapes and sequence length of `config.data` (not the batch size: each stage has
    its own), as keyword arguments of a `BatchShapes` subclass. A field `config.data` leaves out
    takes its default, as the built-in pipeline's `DataConfig` does, so both pipelines agree."""
    return {
        field.name: field.default
        if field.name not in data and field.default is not dataclasses.MISSING
        else data[field.name]
        for field in dataclasses.fields(BatchShapes)
        if field.name != 'batch_size'
    }
