"""Normalisation layers shared by the LM and the encoders."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """HF LlamaRMSNorm: normalize in float32, cast back, then scale."""

    def __init__(self, dim: int, *, eps: float = 1e-5):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        x_f32 = x.astype(jnp.float32)
        mean_sq = jnp.mean(x_f32 * x_f32, axis=-1, keepdims=True)
        normed = (x_f32 * jax.lax.rsqrt(mean_sq + self.eps)).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * normed
