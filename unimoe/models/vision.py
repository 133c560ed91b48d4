"""CLIP-style ViT image encoder.

Parameter names and nesting mirror Hugging Face's `CLIPVisionModel` (with the
`vision_model.embeddings` and `vision_model.encoder` prefixes flattened away), so CLIP safetensors
map onto it 1:1:
`patch_embedding`, `class_embedding`, `position_embedding`, `pre_layrnorm` (sic, as in HF),
`layers/<i>/{layer_norm1, self_attn/{q,k,v,out}_proj, layer_norm2, mlp/{fc1,fc2}}`,
`post_layernorm`. Linear kernels are [in, out] and conv kernels [kh, kw, in, out] (HF's transposed).

`Attention` here is the HF-layout multi-head attention shared by the audio encoder and connectors.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

_NUM_CHANNELS = 3  # RGB, as CLIP


class Attention(nnx.Module):
    """Multi-head attention with HF's separate `q_proj`/`k_proj`/`v_proj`/`out_proj` linears."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        width: int
        num_heads: int
        key_bias: bool = True  # Whisper's k_proj has no bias; CLIP's has one

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        if cfg.width % cfg.num_heads:
            raise ValueError(
                f"width ({cfg.width}) must be divisible by num_heads ({cfg.num_heads})"
            )
        self.cfg = cfg
        self.q_proj = nnx.Linear(cfg.width, cfg.width, rngs=rngs)
        self.k_proj = nnx.Linear(cfg.width, cfg.width, use_bias=cfg.key_bias, rngs=rngs)
        self.v_proj = nnx.Linear(cfg.width, cfg.width, rngs=rngs)
        self.out_proj = nnx.Linear(cfg.width, cfg.width, rngs=rngs)

    def __call__(
        self,
        x_bqd: jax.Array,
        context_bsd: jax.Array | None = None,
        mask_bqs: jax.Array | None = None,
    ) -> jax.Array:
        """Attends from `x_bqd` to `context_bsd` (self-attention when None).

        `mask_bqs` is boolean, broadcastable to [B, Q, S], True where a query may attend a key.
        """
        if context_bsd is None:
            context_bsd = x_bqd
        batch, num_queries, _ = x_bqd.shape
        num_keys = context_bsd.shape[1]
        head_dim = self.cfg.width // self.cfg.num_heads
        q_bqhk = self.q_proj(x_bqd).reshape(batch, num_queries, self.cfg.num_heads, head_dim)
        k_bshk = self.k_proj(context_bsd).reshape(batch, num_keys, self.cfg.num_heads, head_dim)
        v_bshk = self.v_proj(context_bsd).reshape(batch, num_keys, self.cfg.num_heads, head_dim)
        logits_bhqs = jnp.einsum("bqhk,bshk->bhqs", q_bqhk * head_dim**-0.5, k_bshk)
        if mask_bqs is not None:
            mask_bhqs = jnp.broadcast_to(mask_bqs, (batch, num_queries, num_keys))[:, None]
            logits_bhqs = jnp.where(mask_bhqs, logits_bhqs, jnp.finfo(logits_bhqs.dtype).min)
        probs_bhqs = jax.nn.softmax(logits_bhqs, axis=-1)
        out_bqhk = jnp.einsum("bhqs,bshk->bqhk", probs_bhqs, v_bshk)
        return self.out_proj(out_bqhk.reshape(batch, num_queries, self.cfg.width))


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's GELU approximation."""
    return x * jax.nn.sigmoid(1.702 * x)


class CLIPMLP(nnx.Module):
    def __init__(self, width: int, mlp_dim: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(width, mlp_dim, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_dim, width, rngs=rngs)

    def __call__(self, x_bnd: jax.Array) -> jax.Array:
        return self.fc2(quick_gelu(self.fc1(x_bnd)))


class ViTBlock(nnx.Module):
    """Pre-LN transformer block in CLIP's layout."""

    def __init__(self, cfg: ViTEncoder.Config, *, rngs: nnx.Rngs):
        self.layer_norm1 = nnx.LayerNorm(cfg.width, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.self_attn = Attention(Attention.Config(cfg.width, cfg.num_heads), rngs=rngs)
        self.layer_norm2 = nnx.LayerNorm(cfg.width, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.mlp = CLIPMLP(cfg.width, cfg.mlp_dim, rngs=rngs)

    def __call__(self, x_bnd: jax.Array) -> jax.Array:
        x_bnd = x_bnd + self.self_attn(self.layer_norm1(x_bnd))
        return x_bnd + self.mlp(self.layer_norm2(x_bnd))


class ViTEncoder(nnx.Module):
    """CLIP vision tower: NHWC images -> patch features of one hidden layer."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        image_size: int = 32
        patch_size: int = 8
        width: int = 64
        depth: int = 2
        num_heads: int = 4
        mlp_dim: int = 128
        # Index into HF's hidden_states (0 = embeddings after pre_layrnorm, i = after block i);
        # Uni-MoE / LLaVA take the penultimate layer.
        select_layer: int = -2
        layer_norm_eps: float = 1e-5

        def __post_init__(self):
            for name in ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim"):
                if getattr(self, name) <= 0:
                    raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
            if self.image_size % self.patch_size:
                raise ValueError(
                    f"image_size ({self.image_size}) must be divisible by "
                    f"patch_size ({self.patch_size})"
                )
            if not -(self.depth + 1) <= self.select_layer <= self.depth:
                raise ValueError(
                    f"select_layer ({self.select_layer}) must index one of the depth + 1 = "
                    f"{self.depth + 1} hidden states, i.e. lie in "
                    f"[{-(self.depth + 1)}, {self.depth}]"
                )
            if self.width % self.num_heads:
                raise ValueError(
                    f"width ({self.width}) must be divisible by num_heads ({self.num_heads})"
                )

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        patch = (cfg.patch_size, cfg.patch_size)
        self.patch_embedding = nnx.Conv(
            _NUM_CHANNELS,
            cfg.width,
            kernel_size=patch,
            strides=patch,
            padding="VALID",
            use_bias=False,
            rngs=rngs,
        )
        # CLIP's initialisation scales.
        self.class_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.width,)) * cfg.width**-0.5
        )
        self.position_embedding = nnx.Embed(
            self.num_patches + 1,
            cfg.width,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        self.pre_layrnorm = nnx.LayerNorm(cfg.width, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.layers = nnx.List([ViTBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.post_layernorm = nnx.LayerNorm(cfg.width, epsilon=cfg.layer_norm_eps, rngs=rngs)

    @property
    def num_patches(self) -> int:
        return (self.cfg.image_size // self.cfg.patch_size) ** 2

    def _hidden_state(self, images_bhwc: jax.Array, layer: int) -> jax.Array:
        """HF's hidden_states[layer] with the class token first: [B, 1 + num_patches, width]."""
        expected = (self.cfg.image_size, self.cfg.image_size, _NUM_CHANNELS)
        if images_bhwc.ndim != 4 or images_bhwc.shape[1:] != expected:
            raise ValueError(
                f"images_bhwc must have shape [B, {', '.join(map(str, expected))}], "
                f"got {images_bhwc.shape}"
            )
        patches_bhwd = self.patch_embedding(images_bhwc)
        batch = patches_bhwd.shape[0]
        # Row-major flattening of the patch grid matches HF's NCHW flatten(2).
        patches_bnd = patches_bhwd.reshape(batch, self.num_patches, self.cfg.width)
        class_b1d = jnp.broadcast_to(self.class_embedding[...], (batch, 1, self.cfg.width))
        x_bnd = jnp.concatenate([class_b1d.astype(patches_bnd.dtype), patches_bnd], axis=1)
        x_bnd = self.pre_layrnorm(x_bnd + self.position_embedding.embedding[...])
        for block in self.layers[: layer % (self.cfg.depth + 1)]:
            x_bnd = block(x_bnd)
        return x_bnd

    def __call__(self, images_bhwc: jax.Array) -> jax.Array:
        """Patch features of layer `select_layer`, class token dropped: [B, num_patches, width]."""
        return self._hidden_state(images_bhwc, self.cfg.select_layer)[:, 1:]

    def pooled(self, images_bhwc: jax.Array) -> jax.Array:
        """post_layernorm of the last layer's class token (HF `pooler_output`): [B, width]."""
        return self.post_layernorm(self._hidden_state(images_bhwc, self.cfg.depth)[:, 0])
