"""KV-cached inference for `DecoderLM`: a prefill over right-padded prompts, then one-token steps.

Layout: prompts stay right-padded, as everywhere else in unimoe. Row b's prompt fills positions
0..prompt_len[b]-1 and its n-th generated token sits at position prompt_len[b] + n, so RoPE sees
each token's true position and the cache holds every row contiguously from 0. A row's cached
length (`KVCache.length_b`) is its next write position; a decode step writes the new key/value
there and attends to cache positions <= it. Prompt padding fills the cache past a row's length
with keys that are masked until the row's own tokens overwrite them.

Every layer runs the modules of `llm.py` (the same q/k/v projections, `masked_attention` and
`DecoderLayer.ffn_block`), so cached decoding computes what `DecoderLM.__call__` computes on the
whole sequence; the MoE FFN routes every decoded token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from unimoe.models.llm import DecoderLM, causal_attention, masked_attention


class KVCache(NamedTuple):
    """Per layer k, v [B, kv_heads, max_len, head_dim] (the layout `masked_attention` reads, so a
    step transposes nothing), and length_b int32 [B]: positions filled per row."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    length_b: jax.Array

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def _to_cache(x_btgd: jax.Array, max_len: int) -> jax.Array:
    x_bgtd = jnp.einsum("btgd->bgtd", x_btgd)
    return jnp.pad(x_bgtd, ((0, 0), (0, 0), (0, max_len - x_bgtd.shape[2]), (0, 0)))


def prefill(
    lm: DecoderLM, x_btd: jax.Array, prompt_len_b: jax.Array, *, max_len: int
) -> tuple[jax.Array, KVCache]:
    """Runs the right-padded prompt embeddings x_btd through the LM.

    Returns (float32 logits_bv at each row's last prompt position, the cache of max_len positions
    holding the prompt's keys and values). Padding positions (>= prompt_len) are masked as keys and
    count in no MoE statistic or capacity, exactly as in `DecoderLM.__call__`.
    """
    batch, seq, _ = x_btd.shape
    if max_len < seq:
        raise ValueError(f"prefill: max_len={max_len} is shorter than the prompt buffer ({seq})")
    prompt_len_b = jnp.asarray(prompt_len_b, jnp.int32)
    mask_bt = jnp.arange(seq)[None, :] < prompt_len_b[:, None]
    x_btd = x_btd.astype(lm.cfg.dtype)
    keys, values = [], []
    for layer in lm.layer_list():
        q_btgrd, k_btgd, v_btgd = layer.attn.qkv(layer.attn_norm(x_btd), seq)
        x_btd = x_btd + layer.attn.output(causal_attention(q_btgrd, k_btgd, v_btgd, mask_bt))
        x_btd, _ = layer.ffn_block(x_btd, mask_bt)
        keys.append(_to_cache(k_btgd, max_len))
        values.append(_to_cache(v_btgd, max_len))
    last_bd = x_btd[jnp.arange(batch), prompt_len_b - 1]
    logits_bv = lm.logits(last_bd[:, None])[:, 0]
    return logits_bv, KVCache(tuple(keys), tuple(values), prompt_len_b)


def decode_step(lm: DecoderLM, x_bd: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One new token per row (embedded, x_bd) at position cache.length_b -> (logits_bv, cache).

    The caller keeps length_b < max_len (a write past the end would be dropped by the scatter).
    """
    batch = x_bd.shape[0]
    pos_b = cache.length_b
    rows_b = jnp.arange(batch)
    # Row b's query sees its cache up to and including its own new position.
    allowed_b1s = (jnp.arange(cache.max_len)[None, :] <= pos_b[:, None])[:, None, :]
    token_mask_b1 = jnp.ones((batch, 1), bool)
    x_b1d = x_bd[:, None].astype(lm.cfg.dtype)
    keys, values = [], []
    for layer, k_bgsd, v_bgsd in zip(lm.layer_list(), cache.k, cache.v):
        q_b1grd, k_b1gd, v_b1gd = layer.attn.qkv(layer.attn_norm(x_b1d), pos_b[:, None])
        k_bgsd = k_bgsd.at[rows_b, :, pos_b].set(k_b1gd[:, 0])
        v_bgsd = v_bgsd.at[rows_b, :, pos_b].set(v_b1gd[:, 0])
        out_bgr1d = masked_attention(
            jnp.einsum("btgrd->bgrtd", q_b1grd), k_bgsd, v_bgsd, allowed_b1s
        )
        x_b1d = x_b1d + layer.attn.output(jnp.einsum("bgrtd->btgrd", out_bgr1d))
        x_b1d, _ = layer.ffn_block(x_b1d, token_mask_b1)
        keys.append(k_bgsd)
        values.append(v_bgsd)
    logits_bv = lm.logits(x_b1d)[:, 0]
    return logits_bv, KVCache(tuple(keys), tuple(values), pos_b + 1)
