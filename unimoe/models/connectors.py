"""Connectors from encoder features to LLM embeddings.

`MLPProjector` is Uni-MoE's `mlp2x_gelu` vision projector. `QueryConnector` is its speech aligner:
a Whisper decoder fed with learned query embeddings instead of tokens, cross-attending to the
encoder output, then a linear projection. Its layers keep HF `WhisperDecoder` names
(`embed_positions`, `layers/<i>/{self_attn, self_attn_layer_norm, encoder_attn,
encoder_attn_layer_norm, fc1, fc2, final_layer_norm}`, `layer_norm`), so a pretrained Whisper
decoder loads into it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from unimoe.models.audio import LAYER_NORM_EPS, gelu
from unimoe.models.vision import Attention


class MLPProjector(nnx.Module):
    """Linear -> GELU -> Linear: [B, N, in_dim] -> [B, N, out_dim]."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        in_dim: int
        out_dim: int
        hidden_dim: int = 0  # 0 means out_dim, as Uni-MoE's mlp2x_gelu

        def __post_init__(self):
            for name in ("in_dim", "out_dim"):
                if getattr(self, name) <= 0:
                    raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
            if self.hidden_dim < 0:
                raise ValueError(
                    f"hidden_dim must be >= 0 (0 means out_dim), got {self.hidden_dim}"
                )

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        hidden_dim = cfg.hidden_dim or cfg.out_dim
        self.fc1 = nnx.Linear(cfg.in_dim, hidden_dim, rngs=rngs)
        self.fc2 = nnx.Linear(hidden_dim, cfg.out_dim, rngs=rngs)

    def __call__(self, x_bnd: jax.Array) -> jax.Array:
        if x_bnd.shape[-1] != self.cfg.in_dim:
            raise ValueError(
                f"x_bnd's last axis must be in_dim ({self.cfg.in_dim}), got {x_bnd.shape}"
            )
        return self.fc2(gelu(self.fc1(x_bnd)))


class QueryDecoderLayer(nnx.Module):
    """Whisper decoder block: causal self-attention, cross-attention, GELU MLP, all pre-LN."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
        attn_cfg = Attention.Config(width, num_heads, key_bias=False)
        self.self_attn = Attention(attn_cfg, rngs=rngs)
        self.self_attn_layer_norm = nnx.LayerNorm(width, epsilon=LAYER_NORM_EPS, rngs=rngs)
        self.encoder_attn = Attention(attn_cfg, rngs=rngs)
        self.encoder_attn_layer_norm = nnx.LayerNorm(width, epsilon=LAYER_NORM_EPS, rngs=rngs)
        self.fc1 = nnx.Linear(width, mlp_dim, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_dim, width, rngs=rngs)
        self.final_layer_norm = nnx.LayerNorm(width, epsilon=LAYER_NORM_EPS, rngs=rngs)

    def __call__(
        self,
        x_bqd: jax.Array,
        enc_bsd: jax.Array,
        causal_qq: jax.Array,
        enc_mask_b1s: jax.Array | None,
    ) -> jax.Array:
        x_bqd = x_bqd + self.self_attn(self.self_attn_layer_norm(x_bqd), mask_bqs=causal_qq)
        x_bqd = x_bqd + self.encoder_attn(
            self.encoder_attn_layer_norm(x_bqd), enc_bsd, mask_bqs=enc_mask_b1s
        )
        return x_bqd + self.fc2(gelu(self.fc1(self.final_layer_norm(x_bqd))))


class QueryConnector(nnx.Module):
    """Learned queries read the encoder output: [B, S, enc_dim] -> [B, num_queries, out_dim]."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        enc_dim: int
        out_dim: int
        num_queries: int = 8
        width: int = 64
        depth: int = 1
        num_heads: int = 4
        mlp_dim: int = 128

        def __post_init__(self):
            for field in dataclasses.fields(self):
                if getattr(self, field.name) <= 0:
                    raise ValueError(
                        f"{field.name} must be positive, got {getattr(self, field.name)}"
                    )
            if self.width % self.num_heads:
                raise ValueError(
                    f"width ({self.width}) must be divisible by num_heads ({self.num_heads})"
                )

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.query_tokens = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (cfg.num_queries, cfg.width))
        )
        self.embed_positions = nnx.Embed(
            cfg.num_queries, cfg.width, embedding_init=nnx.initializers.normal(0.02), rngs=rngs
        )
        self.enc_proj = (
            nnx.Linear(cfg.enc_dim, cfg.width, rngs=rngs) if cfg.enc_dim != cfg.width else None
        )
        self.layers = nnx.List(
            [
                QueryDecoderLayer(cfg.width, cfg.num_heads, cfg.mlp_dim, rngs=rngs)
                for _ in range(cfg.depth)
            ]
        )
        self.layer_norm = nnx.LayerNorm(cfg.width, epsilon=LAYER_NORM_EPS, rngs=rngs)
        self.out_proj = nnx.Linear(cfg.width, cfg.out_dim, rngs=rngs)

    def __call__(self, enc_bsd: jax.Array, enc_mask_bs: jax.Array | None = None) -> jax.Array:
        """`enc_mask_bs` (bool [B, S]) is True on encoder positions the queries may read."""
        if enc_bsd.ndim != 3 or enc_bsd.shape[2] != self.cfg.enc_dim:
            raise ValueError(
                f"enc_bsd must have shape [B, S, {self.cfg.enc_dim}] (enc_dim), got {enc_bsd.shape}"
            )
        if enc_mask_bs is not None and enc_mask_bs.shape != enc_bsd.shape[:2]:
            raise ValueError(
                f"enc_mask_bs must have shape {enc_bsd.shape[:2]}, got {enc_mask_bs.shape}"
            )
        if self.enc_proj is not None:
            enc_bsd = self.enc_proj(enc_bsd)
        batch = enc_bsd.shape[0]
        queries_qd = self.query_tokens[...] + self.embed_positions.embedding[...]
        x_bqd = jnp.broadcast_to(queries_qd, (batch, *queries_qd.shape)).astype(enc_bsd.dtype)
        causal_qq = jnp.tril(jnp.ones((self.cfg.num_queries, self.cfg.num_queries), bool))
        enc_mask_b1s = None if enc_mask_bs is None else enc_mask_bs[:, None, :].astype(bool)
        for layer in self.layers:
            x_bqd = layer(x_bqd, enc_bsd, causal_qq, enc_mask_b1s)
        return self.out_proj(self.layer_norm(x_bqd))
