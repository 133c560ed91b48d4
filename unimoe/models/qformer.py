"""BLIP-2 Q-Former connector: Uni-MoE-audio's aligner from BEATs features to LLM embeddings.

Learned query tokens go through a BERT-style, post-LN Q-Former (self-attention over the queries,
cross-attention to the encoder output on every `cross_attention_every`-th layer starting at layer
0, a GELU FFN), then a linear projector to the LM width. Parameter names mirror Hugging Face's
`Blip2QFormerModel` 1:1 (`layernorm`, `encoder/layer/<i>/{attention, crossattention}/{attention/
{query,key,value}, output/{dense,LayerNorm}}`, `intermediate_query/dense`,
`output_query/{dense,LayerNorm}`), plus Uni-MoE's `query_tokens` [1, Q, width] and `projector`, so
weight converters are plain name maps (`unimoe.convert.qformer_names`). Linear kernels are
[in, out] (HF's transposed).

Only the query path exists: queries never meet text here, so BLIP-2's text FFN
(`intermediate`/`output`, present only with `use_qformer_text_input`) has no place.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from unimoe.models.audio import gelu

# BERT's (and so BLIP-2's) initialiser scale, `initializer_range`.
_INIT_STD = 0.02
_POSITIVE_FIELDS = (
    "enc_dim", "out_dim", "num_queries", "width", "depth", "num_heads", "mlp_dim",
    "cross_attention_every",
)


def _linear(in_dim: int, out_dim: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_dim, out_dim, kernel_init=nnx.initializers.normal(_INIT_STD), rngs=rngs)


def _dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
    """A dropout holding an RNG stream only when it drops something: at rate 0 the connector
    carries no RNG state (a frozen, dropout-free connector is Params only)."""
    return nnx.Dropout(rate, rngs=rngs if rate > 0 else None)


class QFormerMultiHeadAttention(nnx.Module):
    """Multi-head attention with HF's `query`/`key`/`value` linears; keys and values come from
    `kv_dim`-wide inputs (the encoder's, for cross-attention). No output projection: that is the
    `dense` of `QFormerOutput`."""

    def __init__(
        self, width: int, kv_dim: int, num_heads: int, dropout_rate: float, *, rngs: nnx.Rngs
    ):
        self.num_heads = num_heads
        self.query = _linear(width, width, rngs)
        self.key = _linear(kv_dim, width, rngs)
        self.value = _linear(kv_dim, width, rngs)
        self.dropout = _dropout(dropout_rate, rngs)

    def __call__(
        self, x_bqd: jax.Array, context_bsd: jax.Array, mask_b1s: jax.Array | None
    ) -> jax.Array:
        batch, num_queries, width = x_bqd.shape
        num_keys = context_bsd.shape[1]
        head_dim = width // self.num_heads
        q_bqhk = self.query(x_bqd).reshape(batch, num_queries, self.num_heads, head_dim)
        k_bshk = self.key(context_bsd).reshape(batch, num_keys, self.num_heads, head_dim)
        v_bshk = self.value(context_bsd).reshape(batch, num_keys, self.num_heads, head_dim)
        logits_bhqs = jnp.einsum("bqhk,bshk->bhqs", q_bqhk * head_dim**-0.5, k_bshk)
        if mask_b1s is not None:
            logits_bhqs = jnp.where(
                mask_b1s[:, None], logits_bhqs, jnp.finfo(logits_bhqs.dtype).min
            )
        probs_bhqs = self.dropout(jax.nn.softmax(logits_bhqs, axis=-1))
        out_bqhk = jnp.einsum("bhqs,bshk->bqhk", probs_bhqs, v_bshk)
        return out_bqhk.reshape(batch, num_queries, width)


class QFormerOutput(nnx.Module):
    """dense -> dropout -> LayerNorm(+ residual): HF's `Blip2QFormerSelfOutput` (after attention)
    and `Blip2QFormerOutput` (after the FFN), which differ only in `in_dim`."""

    def __init__(self, in_dim: int, cfg: QFormerConnector.Config, *, rngs: nnx.Rngs):
        self.dense = _linear(in_dim, cfg.width, rngs)
        # HF's attribute name, capitalised as there, so the weight maps stay 1:1. Two-pass
        # variance: an eps of 1e-12 leaves no floor under E[x^2] - E[x]^2's cancellation.
        self.LayerNorm = nnx.LayerNorm(
            cfg.width, epsilon=cfg.layer_norm_eps, use_fast_variance=False, rngs=rngs
        )
        self.dropout = _dropout(cfg.dropout_rate, rngs)

    def __call__(self, h_bqf: jax.Array, residual_bqd: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dropout(self.dense(h_bqf)) + residual_bqd)


class QFormerAttention(nnx.Module):
    """Attention then its post-LN residual output: HF's `Blip2QFormerAttention`."""

    def __init__(self, kv_dim: int, cfg: QFormerConnector.Config, *, rngs: nnx.Rngs):
        self.attention = QFormerMultiHeadAttention(
            cfg.width, kv_dim, cfg.num_heads, cfg.attention_dropout_rate, rngs=rngs
        )
        self.output = QFormerOutput(cfg.width, cfg, rngs=rngs)

    def __call__(
        self, x_bqd: jax.Array, context_bsd: jax.Array, mask_b1s: jax.Array | None = None
    ) -> jax.Array:
        return self.output(self.attention(x_bqd, context_bsd, mask_b1s), x_bqd)


class QFormerIntermediate(nnx.Module):
    def __init__(self, cfg: QFormerConnector.Config, *, rngs: nnx.Rngs):
        self.dense = _linear(cfg.width, cfg.mlp_dim, rngs)

    def __call__(self, x_bqd: jax.Array) -> jax.Array:
        return gelu(self.dense(x_bqd))


class QFormerLayer(nnx.Module):
    """Self-attention over the queries, cross-attention to the encoder (on the layers that have
    it), then the query FFN; each sub-block post-LN, as BERT."""

    def __init__(self, cfg: QFormerConnector.Config, *, has_cross: bool, rngs: nnx.Rngs):
        self.attention = QFormerAttention(cfg.width, cfg, rngs=rngs)
        self.crossattention = QFormerAttention(cfg.enc_dim, cfg, rngs=rngs) if has_cross else None
        self.intermediate_query = QFormerIntermediate(cfg, rngs=rngs)
        self.output_query = QFormerOutput(cfg.mlp_dim, cfg, rngs=rngs)

    def __call__(
        self, x_bqd: jax.Array, enc_bsd: jax.Array, enc_mask_b1s: jax.Array | None
    ) -> jax.Array:
        x_bqd = self.attention(x_bqd, x_bqd)
        if self.crossattention is not None:
            x_bqd = self.crossattention(x_bqd, enc_bsd, enc_mask_b1s)
        return self.output_query(self.intermediate_query(x_bqd), x_bqd)


class QFormerEncoder(nnx.Module):
    """Holds the layers as `layer/<i>`, HF's `encoder.layer.<i>`."""

    def __init__(self, cfg: QFormerConnector.Config, *, rngs: nnx.Rngs):
        self.layer = nnx.List(
            [
                QFormerLayer(cfg, has_cross=i % cfg.cross_attention_every == 0, rngs=rngs)
                for i in range(cfg.depth)
            ]
        )

    def __call__(
        self, x_bqd: jax.Array, enc_bsd: jax.Array, enc_mask_b1s: jax.Array | None
    ) -> jax.Array:
        for layer in self.layer:
            x_bqd = layer(x_bqd, enc_bsd, enc_mask_b1s)
        return x_bqd


class QFormerConnector(nnx.Module):
    """Learned queries read the encoder output: [B, S, enc_dim] -> [B, num_queries, out_dim].

    Dropout (BLIP-2's 0.1 by default) is active unless the module is viewed with
    `deterministic=True`, as at evaluation; Uni-MoE trains with it on, even where the Q-Former
    is frozen.
    """

    @dataclasses.dataclass(frozen=True)
    class Config:
        enc_dim: int  # BLIP-2's encoder_hidden_size: the width of the features cross-attended
        out_dim: int  # the LM width the projector maps to
        num_queries: int = 50
        width: int = 768
        depth: int = 12
        num_heads: int = 12
        mlp_dim: int = 3072
        # Layer i cross-attends iff i % cross_attention_every == 0 (BLIP-2's
        # cross_attention_frequency).
        cross_attention_every: int = 2
        layer_norm_eps: float = 1e-12
        dropout_rate: float = 0.1  # hidden_dropout_prob
        attention_dropout_rate: float = 0.1  # attention_probs_dropout_prob

        def __post_init__(self):
            for name in _POSITIVE_FIELDS:
                value = getattr(self, name)
                if value <= 0:
                    raise ValueError(
                        f"QFormerConnector.Config.{name} must be positive, got {value}"
                    )
            if self.width % self.num_heads:
                raise ValueError(
                    f"QFormerConnector.Config.width ({self.width}) must be divisible by "
                    f"num_heads ({self.num_heads})"
                )
            if not self.layer_norm_eps > 0:
                raise ValueError(
                    f"QFormerConnector.Config.layer_norm_eps must be > 0, got {self.layer_norm_eps}"
                )
            for name in ("dropout_rate", "attention_dropout_rate"):
                if not 0.0 <= getattr(self, name) < 1.0:
                    raise ValueError(
                        f"QFormerConnector.Config.{name} must be in [0, 1), "
                        f"got {getattr(self, name)}"
                    )

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # Uni-MoE and HF start the queries at zero and always load trained ones; identical
        # queries would stay identical under training from scratch, so they are drawn here.
        self.query_tokens = nnx.Param(
            nnx.initializers.normal(_INIT_STD)(rngs.params(), (1, cfg.num_queries, cfg.width))
        )
        self.layernorm = nnx.LayerNorm(
            cfg.width, epsilon=cfg.layer_norm_eps, use_fast_variance=False, rngs=rngs
        )
        self.dropout = _dropout(cfg.dropout_rate, rngs)
        self.encoder = QFormerEncoder(cfg, rngs=rngs)
        self.projector = nnx.Linear(cfg.width, cfg.out_dim, rngs=rngs)

    def __call__(self, enc_bsd: jax.Array, enc_mask_bs: jax.Array | None = None) -> jax.Array:
        """`enc_mask_bs` (bool [B, S]) is True on encoder positions the queries may read; None
        reads all of them, which is what Uni-MoE does (it passes an all-ones mask to the
        Q-Former even where BEATs' last chunk is padded)."""
        if enc_bsd.ndim != 3 or enc_bsd.shape[2] != self.cfg.enc_dim:
            raise ValueError(
                f"enc_bsd must have shape [B, S, {self.cfg.enc_dim}] (enc_dim), "
                f"got {enc_bsd.shape}"
            )
        if enc_mask_bs is not None and enc_mask_bs.shape != enc_bsd.shape[:2]:
            raise ValueError(
                f"enc_mask_bs must have shape {enc_bsd.shape[:2]} (enc_bsd's [B, S]), "
                f"got {enc_mask_bs.shape}"
            )
        batch = enc_bsd.shape[0]
        queries_1qd = self.query_tokens[...].astype(enc_bsd.dtype)
        x_bqd = jnp.broadcast_to(queries_1qd, (batch, *queries_1qd.shape[1:]))
        # HF's embeddings for query-only input: the queries themselves, layer-normed.
        x_bqd = self.dropout(self.layernorm(x_bqd))
        enc_mask_b1s = None if enc_mask_bs is None else enc_mask_bs[:, None, :].astype(bool)
        return self.projector(self.encoder(x_bqd, enc_bsd, enc_mask_b1s))
