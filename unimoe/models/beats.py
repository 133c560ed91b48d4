"""BEATs audio encoder (Uni-MoE-audio's non-speech tower: BEATs_iter3+ AS2M, frozen).

Input is BEATs' normalised Kaldi filterbank [B, F, M] (M = 128 mel bins; `unimoe/data/fbank.py`
makes it from the waveform) and, optionally, the frame-level padding mask; output is the last
encoder layer's features [B, S, encoder_embed_dim] with the token-level padding mask. This is what
Uni-MoE's `BEATsAudioTower` returns (`extract_features(fbank, padding_mask)[0]`); the predictor
head of fine-tuned checkpoints is not part of it.

Parameter names mirror the official state_dict 1:1: `patch_embedding`, `layer_norm`,
`post_extract_proj` (only when embed_dim != encoder_embed_dim), `encoder/pos_conv/{weight_g,
weight_v, bias}` (the weight-normed positional conv, stored as its two factors),
`encoder/layers/<i>/{self_attn/{q,k,v,out}_proj, self_attn/grep_linear, self_attn/grep_a,
self_attn_layer_norm, fc1, fc2, final_layer_norm}`, `encoder/layers/0/self_attn/
relative_attention_bias` (BEATs shares layer 0's table with every layer), `encoder/layer_norm`.
Linear kernels are [in, out]; conv kernels [k..., in, out] (torch's transposed).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# torch's nn.LayerNorm default, which BEATs keeps.
LAYER_NORM_EPS = 1e-5

# BEATs' `get_activation_fn` names (fairseq's); 'glu' (a gated fc1 with other parameters) is the
# one it has that no released checkpoint uses, and is not supported.
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_accurate": lambda x: jax.nn.gelu(x, approximate=True),
    "tanh": jnp.tanh,
    "linear": lambda x: x,
}


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """BEATs' bidirectional T5-style bucket of each (query, key) pair: int32 [length, length].

    Half the buckets per direction; within one, distances below a quarter of `num_buckets` get
    their own bucket and longer ones share log-spaced buckets up to `max_distance`. The log is
    taken in float32, as BEATs does, so that the truncation lands on the same bucket.
    """
    relative_tt = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    max_exact = half // 2
    buckets_tt = (relative_tt > 0).astype(np.int64) * half
    distance_tt = np.abs(relative_tt)
    # Distances below max_exact take the other branch; 1 keeps the log finite there.
    ratio_tt = np.maximum(distance_tt, 1).astype(np.float32) / np.float32(max_exact)
    scale = np.float32(math.log(max_distance / max_exact))
    log_bucket_tt = np.log(ratio_tt) / scale * np.float32(half - max_exact)
    large_tt = np.minimum(max_exact + log_bucket_tt.astype(np.int64), half - 1)
    buckets_tt += np.where(distance_tt < max_exact, distance_tt, large_tt)
    return buckets_tt.astype(np.int32)


def token_padding_mask(padding_mask_bf: jax.Array, num_tokens: int) -> jax.Array:
    """BEATs' frame -> token padding mask [B, S]: the frames, their tail cut to a multiple of S,
    split in S consecutive runs in frame order, a token padded when its whole run is.

    The runs follow frame order, not the patch grid (tokens are time-major over patches of 16
    frames x 16 bins), so this is BEATs' own approximation; it is reproduced as is.
    """
    batch, num_frames = padding_mask_bf.shape
    if num_frames < num_tokens:
        raise ValueError(
            f"padding_mask_bf has {num_frames} frames, fewer than the {num_tokens} tokens; "
            "BEATs cannot map it onto tokens"
        )
    usable = num_frames - num_frames % num_tokens
    return padding_mask_bf[:, :usable].reshape(batch, num_tokens, -1).all(axis=-1)


class PosConv(nnx.Module):
    """BEATs' convolutional position embedding: a grouped Conv1d with weight norm over the kernel
    axis (torch's `weight_norm(dim=2)`), "same" padding (an even kernel drops the last frame), GELU.

    weight_g [k, 1, 1] and weight_v [k, in / groups, out] are the weight norm's two factors as the
    checkpoint stores them (transposed like any conv kernel), so the conversion is a map.
    """

    def __init__(self, width: int, kernel_size: int, groups: int, *, rngs: nnx.Rngs):
        self.kernel_size, self.groups = kernel_size, groups
        init = nnx.initializers.normal(math.sqrt(4 / (kernel_size * width)))
        v_kio = init(rngs.params(), (kernel_size, width // groups, width))
        self.weight_v = nnx.Param(v_kio)
        # torch's weight_norm starts g at |v|, so the initial kernel is v itself.
        self.weight_g = nnx.Param(jnp.sqrt(jnp.sum(v_kio * v_kio, axis=(1, 2), keepdims=True)))
        self.bias = nnx.Param(jnp.zeros((width,)))

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        v_kio = self.weight_v[...].astype(jnp.float32)
        norm_k11 = jnp.sqrt(jnp.sum(v_kio * v_kio, axis=(1, 2), keepdims=True))
        kernel_kio = (self.weight_g[...] * v_kio / norm_k11).astype(x_btd.dtype)
        pad = self.kernel_size // 2
        y_btd = jax.lax.conv_general_dilated(
            x_btd,
            kernel_kio,
            window_strides=(1,),
            padding=((pad, pad),),
            dimension_numbers=("NWC", "WIO", "NWC"),
            feature_group_count=self.groups,
        )
        y_btd = y_btd[:, : x_btd.shape[1]] + self.bias[...].astype(x_btd.dtype)
        return jax.nn.gelu(y_btd, approximate=False)


class SelfAttention(nnx.Module):
    """BEATs' MultiheadAttention as self-attention, with its relative position bias.

    Layer 0 holds the bucket table (`relative_attention_bias`, [num_buckets, heads]); the encoder
    computes the bias from it once and every layer adds it, each re-gated per query by its own
    `grep_linear` / `grep_a` when gru_rel_pos is on (BEATs' gated relative position bias).
    BEATs' query scaling by 1/32 and max-subtraction (for fp16) cancel in the softmax; the
    logits here are float32 instead.
    """

    def __init__(self, cfg: BEATs.Config, *, has_relative_bias: bool, rngs: nnx.Rngs):
        self.cfg = cfg
        width, heads = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.q_proj = nnx.Linear(width, width, rngs=rngs)
        self.k_proj = nnx.Linear(width, width, rngs=rngs)
        self.v_proj = nnx.Linear(width, width, rngs=rngs)
        self.out_proj = nnx.Linear(width, width, rngs=rngs)
        self.relative_attention_bias = (
            nnx.Embed(cfg.num_buckets, heads, rngs=rngs) if has_relative_bias else None
        )
        # BEATs builds the gate whenever gru_rel_pos is set; it acts only on a relative bias.
        self.grep_linear = nnx.Linear(width // heads, 8, rngs=rngs) if cfg.gru_rel_pos else None
        self.grep_a = nnx.Param(jnp.ones((1, heads, 1, 1))) if cfg.gru_rel_pos else None

    def position_bias(self, length: int) -> jax.Array:
        """The bias of each head for each (query, key) pair: [H, T, T]."""
        buckets_tt = relative_position_buckets(length, self.cfg.num_buckets, self.cfg.max_distance)
        return self.relative_attention_bias.embedding[...][buckets_tt].transpose(2, 0, 1)

    def _gate(self, q_bthk: jax.Array) -> jax.Array:
        """gru_rel_pos' per-query scale of the bias, [B, H, T, 1]: gate_a * (gate_b * grep_a - 1)
        + 2 with two sigmoid gates of the unscaled query (2 at gate_a = 0, 1 + gate_b * grep_a
        at gate_a = 1)."""
        batch, length, heads, _ = q_bthk.shape
        logits_bth24 = self.grep_linear(q_bthk).reshape(batch, length, heads, 2, 4)
        gates_bth2 = jax.nn.sigmoid(logits_bth24.sum(axis=-1).astype(jnp.float32))
        gate_a_bth, gate_b_bth = gates_bth2[..., 0], gates_bth2[..., 1]
        grep_a_h = self.grep_a[...].reshape(heads).astype(jnp.float32)
        gate_bth = gate_a_bth * (gate_b_bth * grep_a_h - 1.0) + 2.0
        return gate_bth.transpose(0, 2, 1)[..., None]

    def __call__(
        self,
        x_btd: jax.Array,
        padding_bt: jax.Array | None,
        position_bias_hts: jax.Array | None,
    ) -> jax.Array:
        batch, length, width = x_btd.shape
        heads = self.cfg.encoder_attention_heads
        head_dim = width // heads
        q_bthk = self.q_proj(x_btd).reshape(batch, length, heads, head_dim)
        k_bshk = self.k_proj(x_btd).reshape(batch, length, heads, head_dim)
        v_bshk = self.v_proj(x_btd).reshape(batch, length, heads, head_dim)
        logits_bhts = jnp.einsum("bthk,bshk->bhts", q_bthk * head_dim**-0.5, k_bshk)
        logits_bhts = logits_bhts.astype(jnp.float32)
        if padding_bt is not None:
            # -inf as BEATs: a row with every key padded is NaN there too.
            logits_bhts = jnp.where(padding_bt[:, None, None, :], -jnp.inf, logits_bhts)
        if position_bias_hts is not None:
            bias_bhts = position_bias_hts.astype(jnp.float32)[None]
            if self.grep_linear is not None:
                bias_bhts = self._gate(q_bthk) * bias_bhts
            logits_bhts = logits_bhts + bias_bhts
        probs_bhts = jax.nn.softmax(logits_bhts, axis=-1).astype(x_btd.dtype)
        out_bthk = jnp.einsum("bhts,bshk->bthk", probs_bhts, v_bshk)
        return self.out_proj(out_bthk.reshape(batch, length, width))


class EncoderLayer(nnx.Module):
    """BEATs' TransformerSentenceEncoderLayer: post-LN (with DeepNorm's residual scale
    (2 * layers) ** 0.25 when deep_norm), or pre-LN when layer_norm_first."""

    def __init__(self, cfg: BEATs.Config, *, has_relative_bias: bool, rngs: nnx.Rngs):
        self.cfg = cfg
        width, ffn = cfg.encoder_embed_dim, cfg.encoder_ffn_embed_dim
        self.self_attn = SelfAttention(cfg, has_relative_bias=has_relative_bias, rngs=rngs)
        self.self_attn_layer_norm = nnx.LayerNorm(width, epsilon=LAYER_NORM_EPS, rngs=rngs)
        self.fc1 = nnx.Linear(width, ffn, rngs=rngs)
        self.fc2 = nnx.Linear(ffn, width, rngs=rngs)
        self.final_layer_norm = nnx.LayerNorm(width, epsilon=LAYER_NORM_EPS, rngs=rngs)

    def _ffn(self, x_btd: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.cfg.activation_fn](self.fc1(x_btd)))

    def __call__(
        self,
        x_btd: jax.Array,
        padding_bt: jax.Array | None,
        position_bias_hts: jax.Array | None,
    ) -> jax.Array:
        if self.cfg.layer_norm_first:
            normed_btd = self.self_attn_layer_norm(x_btd)
            x_btd = x_btd + self.self_attn(normed_btd, padding_bt, position_bias_hts)
            return x_btd + self._ffn(self.final_layer_norm(x_btd))
        alpha = (2 * self.cfg.encoder_layers) ** 0.25 if self.cfg.deep_norm else 1.0
        attended_btd = self.self_attn(x_btd, padding_bt, position_bias_hts)
        x_btd = self.self_attn_layer_norm(x_btd * alpha + attended_btd)
        return self.final_layer_norm(x_btd * alpha + self._ffn(x_btd))


class Encoder(nnx.Module):
    """BEATs' TransformerEncoder: padded tokens zeroed, + pos_conv, layer_norm (before the layers,
    or after them when layer_norm_first), the layers sharing layer 0's relative position bias."""

    def __init__(self, cfg: BEATs.Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        width = cfg.encoder_embed_dim
        self.pos_conv = PosConv(width, cfg.conv_pos, cfg.conv_pos_groups, rngs=rngs)
        self.layers = nnx.List(
            [
                EncoderLayer(
                    cfg, has_relative_bias=cfg.relative_position_embedding and i == 0, rngs=rngs
                )
                for i in range(cfg.encoder_layers)
            ]
        )
        self.layer_norm = nnx.LayerNorm(width, epsilon=LAYER_NORM_EPS, rngs=rngs)

    def __call__(self, x_btd: jax.Array, padding_bt: jax.Array | None) -> jax.Array:
        if padding_bt is not None:
            x_btd = jnp.where(padding_bt[..., None], 0, x_btd)
        x_btd = x_btd + self.pos_conv(x_btd)
        if not self.cfg.layer_norm_first:
            x_btd = self.layer_norm(x_btd)
        position_bias_hts = None
        if self.cfg.relative_position_embedding:
            position_bias_hts = self.layers[0].self_attn.position_bias(x_btd.shape[1])
        for layer in self.layers:
            x_btd = layer(x_btd, padding_bt, position_bias_hts)
        if self.cfg.layer_norm_first:
            x_btd = self.layer_norm(x_btd)
        return x_btd


class BEATs(nnx.Module):
    """BEATs: normalised fbank [B, F, M] -> (features [B, S, encoder_embed_dim], token padding
    mask [B, S] or None), S = (F // patch) * (M // patch); no dropout (a frozen tower)."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        """BEATs' `BEATsConfig` fields that shape the inference model, with its defaults; the
        training-only ones (dropouts, layerdrop, layer-wise gradient decay, predictor) are left
        out. BEATs' own input_patch_size default is -1 (none: every checkpoint sets it); 16 is
        the released checkpoints' value. num_mel_bins is BEATs' fixed fbank size (128)."""

        input_patch_size: int = 16
        embed_dim: int = 512
        conv_bias: bool = False
        encoder_layers: int = 12
        encoder_embed_dim: int = 768
        encoder_ffn_embed_dim: int = 3072
        encoder_attention_heads: int = 12
        activation_fn: str = "gelu"
        layer_norm_first: bool = False
        deep_norm: bool = False
        conv_pos: int = 128
        conv_pos_groups: int = 16
        relative_position_embedding: bool = False
        num_buckets: int = 320
        max_distance: int = 1280
        gru_rel_pos: bool = False
        num_mel_bins: int = 128

        def __post_init__(self):
            for field in dataclasses.fields(self):
                value = getattr(self, field.name)
                is_int = isinstance(value, int) and not isinstance(value, bool)
                if field.type == "int" and (not is_int or value <= 0):
                    raise ValueError(f"{field.name} must be a positive integer, got {value!r}")
                if field.type == "bool" and not isinstance(value, bool):
                    raise ValueError(f"{field.name} must be true or false, got {value!r}")
            if self.activation_fn not in ACTIVATIONS:
                raise ValueError(
                    f"activation_fn {self.activation_fn!r} is not supported; one of "
                    f"{sorted(ACTIVATIONS)}"
                )
            self._check_divisors()
            if self.deep_norm and self.layer_norm_first:
                raise ValueError("deep_norm and layer_norm_first exclude each other (as in BEATs)")
            if self.num_mel_bins < self.input_patch_size:
                raise ValueError(
                    f"num_mel_bins ({self.num_mel_bins}) must be at least input_patch_size "
                    f"({self.input_patch_size})"
                )
            if self.relative_position_embedding:
                self._check_buckets()

        def _check_divisors(self):
            width = self.encoder_embed_dim
            for name in ("encoder_attention_heads", "conv_pos_groups"):
                if width % getattr(self, name):
                    raise ValueError(
                        f"encoder_embed_dim ({width}) must be divisible by {name} "
                        f"({getattr(self, name)})"
                    )

        def _check_buckets(self):
            max_exact = self.num_buckets // 4
            if max_exact < 1 or self.max_distance <= max_exact:
                raise ValueError(
                    f"num_buckets ({self.num_buckets}) must be at least 4 and max_distance "
                    f"({self.max_distance}) above num_buckets // 4 for the log-spaced buckets"
                )

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        patch = (cfg.input_patch_size, cfg.input_patch_size)
        self.patch_embedding = nnx.Conv(
            1,
            cfg.embed_dim,
            kernel_size=patch,
            strides=patch,
            padding="VALID",
            use_bias=cfg.conv_bias,
            rngs=rngs,
        )
        self.layer_norm = nnx.LayerNorm(cfg.embed_dim, epsilon=LAYER_NORM_EPS, rngs=rngs)
        self.post_extract_proj = (
            nnx.Linear(cfg.embed_dim, cfg.encoder_embed_dim, rngs=rngs)
            if cfg.embed_dim != cfg.encoder_embed_dim
            else None
        )
        self.encoder = Encoder(cfg, rngs=rngs)

    def num_tokens(self, num_frames: int) -> int:
        """S for F frames: one token per whole patch of the [F, M] image, time-major."""
        patch = self.cfg.input_patch_size
        return (num_frames // patch) * (self.cfg.num_mel_bins // patch)

    def _check(self, fbank_bfm: jax.Array, padding_mask_bf: jax.Array | None) -> None:
        mel, patch = self.cfg.num_mel_bins, self.cfg.input_patch_size
        if fbank_bfm.ndim != 3 or fbank_bfm.shape[2] != mel:
            raise ValueError(f"fbank_bfm must have shape [B, F, {mel}], got {fbank_bfm.shape}")
        if fbank_bfm.shape[1] < patch:
            raise ValueError(
                f"fbank_bfm has {fbank_bfm.shape[1]} frames, fewer than one patch ({patch}): "
                "the clip is too short for BEATs"
            )
        if padding_mask_bf is not None and padding_mask_bf.shape != fbank_bfm.shape[:2]:
            raise ValueError(
                f"padding_mask_bf must have shape [B, F] = {fbank_bfm.shape[:2]}, got "
                f"{padding_mask_bf.shape}"
            )

    def __call__(
        self, fbank_bfm: jax.Array, padding_mask_bf: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        """Features of the last layer and the token padding mask (True = padding), as BEATs'
        `extract_features`; padding_mask_bf is True on padded frames."""
        self._check(fbank_bfm, padding_mask_bf)
        batch, num_frames, _ = fbank_bfm.shape
        padding_bs = None
        if padding_mask_bf is not None:
            num_tokens = self.num_tokens(num_frames)
            padding_bs = token_padding_mask(padding_mask_bf.astype(bool), num_tokens)
        patches_bfmd = self.patch_embedding(fbank_bfm[..., None])
        # Row-major over the patch grid, as BEATs' NCHW reshape(B, C, -1).transpose(1, 2).
        x_bsd = self.layer_norm(patches_bfmd.reshape(batch, -1, self.cfg.embed_dim))
        if self.post_extract_proj is not None:
            x_bsd = self.post_extract_proj(x_bsd)
        return self.encoder(x_bsd, padding_bs), padding_bs
