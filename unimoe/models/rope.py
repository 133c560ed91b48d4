"""Rotary position embeddings as Hugging Face computes them: the frequencies, their scaling
(linear, Llama 3) and their application to queries and keys."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as Hugging Face's `rope_parameters` / `rope_scaling`.

    'default': none; 'linear': positions divided by `factor` (Vicuna-16k style); 'llama3': low
    frequencies divided by `factor`, high ones kept, the band between interpolated (Llama 3.1).
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"RopeScaling.rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}"
            )
        if self.factor <= 0:
            raise ValueError(f"RopeScaling.factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and not (
            0 < self.low_freq_factor < self.high_freq_factor and self.original_max_positions > 0
        ):
            raise ValueError(
                "RopeScaling 'llama3' needs 0 < low_freq_factor < high_freq_factor and "
                f"original_max_positions > 0, got {self}"
            )


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling = RopeScaling()) -> jax.Array:
    """Inverse frequencies [head_dim // 2], scaled as HF's `ROPE_INIT_FUNCTIONS`."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        context = scaling.original_max_positions
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(
            wavelen > context / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq
        )
        smooth = (context / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = (wavelen >= context / scaling.high_freq_factor) & (
            wavelen <= context / scaling.low_freq_factor
        )
        return jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(
    positions: int | jax.Array, head_dim: int, theta: float, scaling: RopeScaling = RopeScaling()
) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., head_dim] at integer `positions` (an int T means 0..T-1, giving [T, hd]),
    the two halves repeated as in HF. Decoding passes each row's own positions, [B, 1]."""
    if isinstance(positions, int):
        positions = jnp.arange(positions, dtype=jnp.float32)
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    angles_pf = positions.astype(jnp.float32)[..., None] * inv_freq
    angles_ph = jnp.concatenate([angles_pf, angles_pf], axis=-1)
    return jnp.cos(angles_ph), jnp.sin(angles_ph)


def apply_rope(x_bthd: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF LLaMA convention: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1].

    cos, sin: [T, hd] (every row at the same positions) or [B, T, hd] (per-row positions).
    """
    half = x_bthd.shape[-1] // 2
    rotated = jnp.concatenate([-x_bthd[..., half:], x_bthd[..., :half]], axis=-1)
    cos = cos[..., None, :].astype(x_bthd.dtype)
    sin = sin[..., None, :].astype(x_bthd.dtype)
    return x_bthd * cos + rotated * sin
