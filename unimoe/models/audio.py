"""Whisper-style audio encoder.

Parameter names mirror Hugging Face's `WhisperEncoder` 1:1: `conv1`, `conv2`,
`layers/<i>/{self_attn/{q,k,v,out}_proj, self_attn_layer_norm, fc1, fc2, final_layer_norm}`,
`layer_norm`. `embed_positions` is Whisper's fixed sinusoid table, so it is computed, not stored.
Conv kernels are [k, in, out] (HF's [out, in, k] transposed); linear kernels are [in, out].
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from flax import nnx

from unimoe.models.vision import Attention

# torch's nn.LayerNorm default, which Whisper keeps (flax defaults to 1e-6).
LAYER_NORM_EPS = 1e-5


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's position table [length, channels]: sines then cosines over geometric timescales."""
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-log_timescale_increment * np.arange(channels // 2))
    scaled_time = np.arange(length)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled_time), np.cos(scaled_time)], axis=1).astype(np.float32)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as torch's default `nn.GELU` / HF's "gelu"."""
    return jax.nn.gelu(x, approximate=False)


class WhisperEncoderLayer(nnx.Module):
    """Pre-LN transformer block in Whisper's layout (k_proj without bias)."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
        self.self_attn = Attention(Attention.Config(width, num_heads, key_bias=False), rngs=rngs)
        self.self_attn_layer_norm = nnx.LayerNorm(width, epsilon=LAYER_NORM_EPS, rngs=rngs)
        self.fc1 = nnx.Linear(width, mlp_dim, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_dim, width, rngs=rngs)
        self.final_layer_norm = nnx.LayerNorm(width, epsilon=LAYER_NORM_EPS, rngs=rngs)

    def __call__(self, x_bsd: jax.Array) -> jax.Array:
        x_bsd = x_bsd + self.self_attn(self.self_attn_layer_norm(x_bsd))
        return x_bsd + self.fc2(gelu(self.fc1(self.final_layer_norm(x_bsd))))


class AudioEncoder(nnx.Module):
    """Whisper encoder: log-mel [B, A, M] -> features [B, ceil(A / 2), width]."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        num_mel_bins: int = 32
        max_frames: int = 300  # mel frames; Whisper's max_source_positions is max_frames // 2
        width: int = 64
        depth: int = 2
        num_heads: int = 4
        mlp_dim: int = 128

        def __post_init__(self):
            for name in ("num_mel_bins", "max_frames", "width", "depth", "num_heads", "mlp_dim"):
                if getattr(self, name) <= 0:
                    raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
            if self.max_frames % 2:
                raise ValueError(f"max_frames ({self.max_frames}) must be even (conv2 halves it)")
            if self.width % 2 or self.width < 4:
                raise ValueError(f"width ({self.width}) must be even and >= 4 for sinusoids")
            if self.width % self.num_heads:
                raise ValueError(
                    f"width ({self.width}) must be divisible by num_heads ({self.num_heads})"
                )

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.conv1 = nnx.Conv(
            cfg.num_mel_bins, cfg.width, kernel_size=(3,), padding=((1, 1),), rngs=rngs
        )
        self.conv2 = nnx.Conv(
            cfg.width, cfg.width, kernel_size=(3,), strides=(2,), padding=((1, 1),), rngs=rngs
        )
        self.layers = nnx.List(
            [
                WhisperEncoderLayer(cfg.width, cfg.num_heads, cfg.mlp_dim, rngs=rngs)
                for _ in range(cfg.depth)
            ]
        )
        self.layer_norm = nnx.LayerNorm(cfg.width, epsilon=LAYER_NORM_EPS, rngs=rngs)

    def __call__(self, mel_bam: jax.Array) -> jax.Array:
        """Encodes up to `max_frames` mel frames; features [B, ceil(A / 2), width]."""
        if mel_bam.ndim != 3 or mel_bam.shape[2] != self.cfg.num_mel_bins:
            raise ValueError(
                f"mel_bam must have shape [B, A, {self.cfg.num_mel_bins}], got {mel_bam.shape}"
            )
        num_frames = mel_bam.shape[1]
        if num_frames > self.cfg.max_frames:
            raise ValueError(
                f"mel_bam has {num_frames} frames, more than max_frames ({self.cfg.max_frames})"
            )
        x_bsd = gelu(self.conv2(gelu(self.conv1(mel_bam))))
        # Shorter inputs take the first positions, so they match a zero-padded full-length
        # input only up to attention; Whisper itself always pads to max_frames.
        x_bsd = x_bsd + sinusoids(x_bsd.shape[1], self.cfg.width)
        for layer in self.layers:
            x_bsd = layer(x_bsd)
        return self.layer_norm(x_bsd)

    def pooled(self, mel_bam: jax.Array) -> jax.Array:
        """Mean of the features over positions: [B, width]."""
        return self(mel_bam).mean(axis=1)
