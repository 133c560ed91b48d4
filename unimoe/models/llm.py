"""LLaMA-style decoder LM whose FFN is dense SwiGLU or an MoE layer, chosen per layer.

Numerics follow Hugging Face `LlamaForCausalLM` (RMSNorm in float32, RoPE with `rotate_half`,
grouped-query attention with float32 softmax), so converted LLaMA / Vicuna weights give the same
logits. Sequences are right-padded: positions are 0..T-1 and padding keys are masked out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimoe.models import layer_stack
from unimoe.models.rope import RopeScaling, apply_rope, rope_cos_sin
from unimoe.moe.aux_stats import MoEAux
from unimoe.moe.config import MoEConfig
from unimoe.moe.layer import MoELayer
from unimoe.nn.lora import BASE_INIT_STDDEV, Linear, LoRAConfig
from unimoe.nn.norms import RMSNorm
from unimoe.nn.sharding import constrain


def resolve_moe_layers(spec: str | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Which layer indices get an MoE FFN.

    spec: 'none'; 'all' (Uni-MoE 4E speech, 8E); 'every_<n>' = layers i with i % n == 0
    ('every_2' is Uni-MoE's even-layer layout); or explicit indices.
    """
    if isinstance(spec, str):
        if spec == "none":
            return ()
        if spec == "all":
            return tuple(range(num_layers))
        stride = spec.removeprefix("every_")
        if stride != spec and stride.isdigit() and int(stride) > 0:
            return tuple(range(0, num_layers, int(stride)))
        raise ValueError(
            f"moe_layers must be 'none', 'all', 'every_<n>' (n > 0) or a list of ints, got {spec!r}"
        )
    layers = tuple(int(i) for i in spec)
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"moe_layers {bad} out of range for num_layers={num_layers}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"moe_layers has duplicates: {layers}")
    return tuple(sorted(layers))


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Decoder LM shape. Built from plain kwargs: nested `moe` / `lora` may be dicts and
    `moe_layers` a `resolve_moe_layers` spec; both are normalized here.

    dtype: activation (compute) dtype; parameters stay float32, the router and softmaxes run in
    float32 and logits are returned in float32.
    qkv_bias: biases on the q, k and v projections (Qwen2 / Qwen2-MoE); LLaMA has none.
    rope_scaling: a `RopeScaling` (or its kwargs) applied to the RoPE frequencies.
    scan_layers: the layers' parameters stacked and scanned over (`models.layer_stack`).
    remat: what the backward pass recomputes, per layer or scanned block
    (`layer_stack.REMAT_POLICIES`: 'none', 'full', 'dots', 'dots_no_batch', ...).
    vocab_size: 0 only in an experiment's `unimoe.models.unimoe.ModelSpec`, before the tokenizer
    gives it (a model needs > 0).
    """

    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_dim: int
    head_dim: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    moe_layers: tuple[int, ...] = ()
    moe: MoEConfig = MoEConfig()
    lora: LoRAConfig = LoRAConfig()
    tie_embeddings: bool = False
    dtype: str = "float32"
    qkv_bias: bool = False
    rope_scaling: RopeScaling = RopeScaling()
    scan_layers: bool = False
    remat: str = "none"

    def __post_init__(self):
        if self.vocab_size < 0:
            raise ValueError(f"LLMConfig.vocab_size must be > 0, got {self.vocab_size}")
        for name in ("dim", "num_layers", "num_heads", "num_kv_heads", "ffn_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LLMConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LLMConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim < 0 or self.head_dim % 2:
            raise ValueError(f"LLMConfig.head_dim must be even and >= 0, got {self.head_dim}")
        if self.head_dim == 0 and (self.dim % self.num_heads or (self.dim // self.num_heads) % 2):
            raise ValueError(
                f"LLMConfig.head_dim=0 needs dim ({self.dim}) divisible by num_heads "
                f"({self.num_heads}) into an even head size; set head_dim explicitly"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"LLMConfig.dtype must be float32, bfloat16 or float16, got {self.dtype!r}"
            )
        if self.remat not in layer_stack.REMAT_POLICIES:
            raise ValueError(
                f"LLMConfig.remat must be one of {sorted(layer_stack.REMAT_POLICIES)}, "
                f"got {self.remat!r}"
            )
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoEConfig(**self.moe))
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", LoRAConfig(**self.lora))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        object.__setattr__(self, "moe_layers", resolve_moe_layers(self.moe_layers, self.num_layers))

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.dim // self.num_heads

    @property
    def block_period(self) -> int:
        """Layers per scanned block (`layer_stack.block_period`); 1 per layer when unrolled."""
        if not self.scan_layers:
            return 1
        return layer_stack.block_period(self.moe_layers, self.num_layers)


# Query rows per block of `causal_attention`: S=512 then costs 10 of 16 score blocks.
CAUSAL_BLOCK = 128


def causal_attention(
    q_btgrd: jax.Array, k_bsgd: jax.Array, v_bsgd: jax.Array, key_mask_bs: jax.Array
) -> jax.Array:
    """softmax(q k^T / sqrt(d) + causal and key-padding mask) v, scores in float32.

    Axis letters: G kv heads, R query heads per kv head (GQA). Queries go in blocks of
    CAUSAL_BLOCK rows, each against only the keys up to its last row, so the masked upper
    triangle is mostly never computed (as flash attention skips it); the [B, G, R, block, S]
    scores of one block stay small. Masked scores are finfo.min, not -inf, so a row with no
    allowed key (all padding) stays finite.
    """
    seq = q_btgrd.shape[1]
    q_bgrtd = jnp.einsum("btgrd->bgrtd", q_btgrd)
    k_bgsd = jnp.einsum("bsgd->bgsd", k_bsgd)
    v_bgsd = jnp.einsum("bsgd->bgsd", v_bsgd)
    key_mask_bs = key_mask_bs.astype(bool)
    outs = []
    for start in range(0, seq, CAUSAL_BLOCK):
        stop = min(start + CAUSAL_BLOCK, seq)
        causal_ts = np.tril(np.ones((stop - start, stop), bool), k=start)
        allowed_bts = causal_ts[None] & key_mask_bs[:, None, :stop]
        outs.append(
            masked_attention(
                q_bgrtd[:, :, :, start:stop], k_bgsd[:, :, :stop], v_bgsd[:, :, :stop], allowed_bts
            )
        )
    return jnp.einsum("bgrtd->btgrd", jnp.concatenate(outs, axis=3))


def masked_attention(
    q_bgrtd: jax.Array, k_bgsd: jax.Array, v_bgsd: jax.Array, allowed_bts: jax.Array
) -> jax.Array:
    """softmax(q k^T / sqrt(d), disallowed keys at finfo.min) v, scores in float32.

    The attention math of both training (`causal_attention`, per query block) and cached decoding
    (`kv_cache.decode_step`, one query against the cache), so the two cannot drift apart. The
    1/sqrt(d) scale goes on q ([.., d]) rather than on the scores ([.., S]): inside the backward's
    library (YNNPACK) fusion a scalar factor is materialised as a full [B, G, R*T, S] array, 40 MB
    per call of the train_step block, and the block's fwd+bwd ran in 0.94-0.97x the time without
    it (docs/design.md, "Attention backward"). A power-of-two scale (head_dim 64, 256, ...) gives
    the same bits either way.
    """
    return _softmax_attention(
        q_bgrtd * (1.0 / math.sqrt(q_bgrtd.shape[-1])), k_bgsd, v_bgsd, allowed_bts
    )


@jax.custom_vjp
def _softmax_attention(
    q_bgrtd: jax.Array, k_bgsd: jax.Array, v_bgsd: jax.Array, allowed_bts: jax.Array
) -> jax.Array:
    """softmax(q k^T, disallowed keys at finfo.min) v for queries already scaled.

    The backward is written out (`_softmax_attention_bwd`): from the saved probabilities it is
    four matmuls and one fused softmax gradient: the attention block's fwd+bwd in 0.93-0.99x
    (median 0.96x) the time of the autodiff of the same forward on XLA:CPU (docs/design.md,
    "Attention backward").
    """
    return _softmax_attention_fwd(q_bgrtd, k_bgsd, v_bgsd, allowed_bts)[0]


def _softmax_attention_fwd(q_bgrtd, k_bgsd, v_bgsd, allowed_bts):
    # The R query heads of a kv head share its keys, so (R, T) is folded into one row axis: two
    # 4-D batched matmuls, which XLA:CPU runs ~20% faster than the 5-D einsums.
    batch, groups, reps, seq, head_dim = q_bgrtd.shape
    q_bgqd = q_bgrtd.reshape(batch, groups, reps * seq, head_dim)
    scores_bgqs = jnp.einsum("bgqd,bgsd->bgqs", q_bgqd, k_bgsd).astype(jnp.float32)
    scores_bgrts = jnp.where(
        allowed_bts[:, None, None],
        scores_bgqs.reshape(batch, groups, reps, seq, -1),
        jnp.finfo(jnp.float32).min,
    )
    probs_bgqs = (
        jax.nn.softmax(scores_bgrts, axis=-1).astype(v_bgsd.dtype).reshape(scores_bgqs.shape)
    )
    out_bgqd = jnp.einsum("bgqs,bgsd->bgqd", probs_bgqs, v_bgsd)
    return out_bgqd.reshape(q_bgrtd.shape), (q_bgqd, k_bgsd, v_bgsd, probs_bgqs, allowed_bts)


def _softmax_attention_bwd(residuals, d_out_bgrtd):
    q_bgqd, k_bgsd, v_bgsd, probs_bgqs, allowed_bts = residuals
    batch, groups, reps, seq, _ = d_out_bgrtd.shape
    d_out_bgqd = d_out_bgrtd.reshape(q_bgqd.shape)
    d_probs_bgqs = jnp.einsum("bgqd,bgsd->bgqs", d_out_bgqd, v_bgsd).astype(jnp.float32)
    probs_bgqs_f32 = probs_bgqs.astype(jnp.float32)
    # Softmax VJP, p * (dp - sum(dp * p)); a disallowed key's score is the constant finfo.min, so
    # it gets no gradient even in a row with no allowed key (where softmax is uniform, not 0).
    d_scores_bgqs = probs_bgqs_f32 * (
        d_probs_bgqs - jnp.sum(d_probs_bgqs * probs_bgqs_f32, axis=-1, keepdims=True)
    )
    d_scores_bgrts = jnp.where(
        allowed_bts[:, None, None], d_scores_bgqs.reshape(batch, groups, reps, seq, -1), 0.0
    )
    d_scores_bgqs = d_scores_bgrts.reshape(d_probs_bgqs.shape).astype(q_bgqd.dtype)
    d_q_bgqd = jnp.einsum("bgqs,bgsd->bgqd", d_scores_bgqs, k_bgsd)
    d_k_bgsd = jnp.einsum("bgqs,bgqd->bgsd", d_scores_bgqs, q_bgqd)
    d_v_bgsd = jnp.einsum("bgqs,bgqd->bgsd", probs_bgqs, d_out_bgqd)
    return d_q_bgqd.reshape(d_out_bgrtd.shape), d_k_bgsd, d_v_bgsd, None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


class Attention(nnx.Module):
    """Causal grouped-query self-attention with key padding mask; LoRA on q, k, v, o."""

    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.resolved_head_dim
        self.rope_theta = cfg.rope_theta
        self.rope_scaling = cfg.rope_scaling
        q_width = cfg.num_heads * self.head_dim
        kv_width = cfg.num_kv_heads * self.head_dim
        bias = cfg.qkv_bias
        self.q = Linear(cfg.dim, q_width, lora=cfg.lora, use_bias=bias, rngs=rngs)
        self.k = Linear(cfg.dim, kv_width, lora=cfg.lora, use_bias=bias, rngs=rngs)
        self.v = Linear(cfg.dim, kv_width, lora=cfg.lora, use_bias=bias, rngs=rngs)
        self.o = Linear(q_width, cfg.dim, lora=cfg.lora, rngs=rngs)

    def __call__(self, x_btd: jax.Array, attn_mask_bt: jax.Array) -> jax.Array:
        q_btgrd, k_btgd, v_btgd = self.qkv(x_btd, x_btd.shape[1])
        return self.output(causal_attention(q_btgrd, k_btgd, v_btgd, attn_mask_bt))

    def qkv(
        self, x_btd: jax.Array, positions: int | jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Rotated q_btgrd and k_btgd, and v_btgd, at `positions` (see `rope_cos_sin`)."""
        batch, seq, _ = x_btd.shape
        group = self.num_heads // self.num_kv_heads
        q_bthd = self.q(x_btd).reshape(batch, seq, self.num_heads, self.head_dim)
        k_btgd = self.k(x_btd).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        v_btgd = self.v(x_btd).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, self.rope_scaling)
        q_bthd = apply_rope(q_bthd, cos, sin)
        k_btgd = apply_rope(k_btgd, cos, sin)
        # Query head h reads kv head h // group (HF repeat_kv), without materializing copies.
        q_btgrd = q_bthd.reshape(batch, seq, self.num_kv_heads, group, self.head_dim)
        return q_btgrd, k_btgd, v_btgd

    def output(self, out_btgrd: jax.Array) -> jax.Array:
        batch, seq = out_btgrd.shape[:2]
        return self.o(out_btgrd.reshape(batch, seq, self.num_heads * self.head_dim))


class MLP(nnx.Module):
    """Dense SwiGLU FFN down(silu(gate(x)) * up(x)); no bias; LoRA only with `lora.dense_ffn`
    (stage 2 trains it fully)."""

    def __init__(self, dim: int, ffn_dim: int, *, lora: LoRAConfig = LoRAConfig(), rngs: nnx.Rngs):
        self.gate = Linear(dim, ffn_dim, lora=lora, rngs=rngs)
        self.up = Linear(dim, ffn_dim, lora=lora, rngs=rngs)
        self.down = Linear(ffn_dim, dim, lora=lora, rngs=rngs)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x_btd)) * self.up(x_btd))


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)); ffn is MLP or MoELayer."""

    def __init__(self, cfg: LLMConfig, layer_index: int, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        if layer_index in cfg.moe_layers:
            self.ffn = MoELayer(cfg.dim, cfg.moe, ffn_dim=cfg.ffn_dim, lora=cfg.lora, rngs=rngs)
        else:
            lora = cfg.lora if cfg.lora.dense_ffn else LoRAConfig()
            self.ffn = MLP(cfg.dim, cfg.ffn_dim, lora=lora, rngs=rngs)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoELayer)

    def __call__(
        self, x_btd: jax.Array, attn_mask_bt: jax.Array, token_weight_bt: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """Returns (x_btd, aux of the MoE FFN or None for a dense one)."""
        x_btd = x_btd + self.attn(self.attn_norm(x_btd), attn_mask_bt)
        return self.ffn_block(x_btd, attn_mask_bt, token_weight_bt)

    def ffn_block(
        self, x_btd: jax.Array, token_mask_bt: jax.Array, token_weight_bt: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """The second residual half, x + ffn(norm(x)); masked tokens count in no MoE statistic."""
        ffn_in_btd = self.ffn_norm(x_btd)
        if self.is_moe:
            ffn_out_btd, aux = self.ffn(ffn_in_btd, token_mask_bt, token_weight_bt=token_weight_bt)
        else:
            ffn_out_btd, aux = self.ffn(ffn_in_btd), None
        return x_btd + ffn_out_btd, aux


# Logical axes of the residual stream and the logits (`unimoe.parallel.rules`).
ACTIVATION_AXES = ("batch", "seq", "act_embed")
LOGITS_AXES = ("batch", "seq", "act_vocab")


def _pin(x_btd: jax.Array) -> jax.Array:
    return constrain(x_btd, ACTIVATION_AXES)


class DecoderLM(nnx.Module):
    """Token embedding, decoder layers, final RMSNorm and LM head.

    Multimodal callers splice media features into `embed_tokens(tokens)` before `__call__`.
    """

    Config = LLMConfig

    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        if cfg.vocab_size <= 0:  # 0: an experiment's `ModelSpec`, which the tokenizer completes
            raise ValueError(f"LLMConfig.vocab_size must be > 0, got {cfg.vocab_size}")
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.dim,
            embedding_init=nnx.initializers.normal(BASE_INIT_STDDEV),
            rngs=rngs,
        )
        make_layer = lambda index, rngs: DecoderLayer(cfg, index, rngs=rngs)  # noqa: E731
        if cfg.scan_layers:
            # Block layer j is MoE as decoder layer j is: the layout repeats every block.
            period = cfg.block_period
            self.blocks = layer_stack.stacked_blocks(
                make_layer, period, cfg.num_layers // period, rngs
            )
        else:
            self.layers = nnx.List([make_layer(i, rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        # Tied models read the output projection from `embed`; the head stays unadapted in stage 3.
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.dim, cfg.vocab_size, rngs=rngs)

    def embed_tokens(self, tokens_bt: jax.Array) -> jax.Array:
        """int tokens [B, T] -> x_btd in the compute dtype."""
        return self.embed(tokens_bt).astype(self.cfg.dtype)

    def __call__(
        self, x_btd: jax.Array, attn_mask_bt: jax.Array, *, token_weight_bt: jax.Array | None = None
    ) -> tuple[jax.Array, MoEAux]:
        """x_btd (embedded, right-padded) -> (float32 logits_btv, aux).

        `token_weight_bt` weights tokens in the DCMoE balance loss (e.g. answers 10x prompts).
        aux: the MoE layers' `MoEAux` stacked over a leading L_moe axis, its losses summed over it
        (`MoEAux.reduce_layers`); L_moe = 0 without MoE layers, so callers never branch.
        """
        cfg = self.cfg
        if x_btd.ndim != 3 or x_btd.shape[-1] != cfg.dim:
            raise ValueError(f"DecoderLM expects x [B, T, {cfg.dim}], got {x_btd.shape}")
        if attn_mask_bt.shape != x_btd.shape[:2]:
            raise ValueError(
                f"attn_mask must be [B, T]={x_btd.shape[:2]}, got {attn_mask_bt.shape}"
            )
        # Layer boundaries pin the residual stream to the batch sharding (no-op on one device).
        x_btd = constrain(x_btd.astype(cfg.dtype), ACTIVATION_AXES)
        if cfg.scan_layers:
            x_btd, aux = layer_stack.scan_blocks(
                self.blocks, x_btd, attn_mask_bt, token_weight_bt, _pin, cfg.remat
            )
        else:
            x_btd, aux = self._unrolled(x_btd, attn_mask_bt, token_weight_bt)
        logits_btv = self.logits(x_btd)
        if aux is None:
            aux = MoEAux.no_layers(x_btd.shape[0], cfg.moe.num_experts)
        return logits_btv, aux.reduce_layers()

    def _unrolled(
        self, x_btd: jax.Array, attn_mask_bt: jax.Array, token_weight_bt: jax.Array | None
    ) -> tuple[jax.Array, MoEAux | None]:
        call = layer_stack.rematerialised(
            lambda layer, x_btd: layer(x_btd, attn_mask_bt, token_weight_bt),
            self.cfg.remat,
            in_scan=False,
        )
        layer_aux = []
        for layer in self.layers:
            x_btd, aux = call(layer, x_btd)
            x_btd = _pin(x_btd)
            if aux is not None:
                layer_aux.append(aux)
        return x_btd, MoEAux.stack(layer_aux) if layer_aux else None

    def layer_list(self) -> list[DecoderLayer]:
        """The decoder layers in order; scanned, views of the stack that read it (writes to them
        do not reach the model)."""
        if not self.cfg.scan_layers:
            return list(self.layers)
        blocks = layer_stack.block_views(self.blocks)
        return [layer for block in blocks for layer in block.layers]

    def logits(self, x_btd: jax.Array) -> jax.Array:
        """Final norm and LM head on the last layer's output -> float32 logits_btv."""
        x_btd = self.final_norm(x_btd)
        if self.lm_head is None:
            logits_btv = self.embed.attend(x_btd)
        else:
            logits_btv = self.lm_head(x_btd)
        return constrain(logits_btv.astype(jnp.float32), LOGITS_AXES)
