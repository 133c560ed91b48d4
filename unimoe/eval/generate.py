"""Greedy decoding over a fixed-shape token buffer (no KV cache: each step reruns the model)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

LogitsFn = Callable[[jax.Array], jax.Array]


def greedy_generate(
    logits_fn: LogitsFn,
    tokens_bt: jax.Array,
    prompt_len_b: jax.Array,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
) -> jax.Array:
    """Appends up to `max_new_tokens` argmax tokens to each row's prompt; returns int32 [B, N].

    `logits_fn(tokens_bt) -> logits_btv` must be causal (logits at t depend on tokens <= t only),
    so the tokens after a row's current position do not matter. Row b's prompt is
    `tokens_bt[b, :prompt_len_b[b]]`; its n-th new token is read from the logits at position
    `prompt_len_b[b] + n - 1` and written into the buffer at `prompt_len_b[b] + n`. A row's output
    includes its `eos_id` and is `pad_id` after it. Jittable; `max_new_tokens`, `eos_id` and
    `pad_id` are static.
    """
    if tokens_bt.ndim != 2:
        raise ValueError(f'greedy_generate: tokens_bt must be [B, T], got shape {tokens_bt.shape}')
    batch, seq_len = tokens_bt.shape
    if prompt_len_b.shape != (batch,):
        raise ValueError(
            f'greedy_generate: prompt_len_b must have shape ({batch},), got {prompt_len_b.shape}'
        )
    if max_new_tokens < 1:
        raise ValueError(f'greedy_generate: max_new_tokens must be >= 1, got {max_new_tokens}')
    if not isinstance(prompt_len_b, jax.core.Tracer):
        prompt_len = np.asarray(prompt_len_b)
        if prompt_len.min() < 1 or prompt_len.max() + max_new_tokens > seq_len:
            raise ValueError(
                f'greedy_generate: every prompt_len must be >= 1 and max(prompt_len) + max_new_tokens '
                f'<= T; got prompt_len in [{prompt_len.min()}, {prompt_len.max()}], '
                f'max_new_tokens={max_new_tokens}, T={seq_len}'
            )

    tokens_bt = jnp.asarray(tokens_bt, jnp.int32)
    prompt_len_b = jnp.asarray(prompt_len_b, jnp.int32)
    rows_b = jnp.arange(batch)

    def decode_step(n, carry):
        tokens_bt, done_b, new_bn = carry
        write_pos_b = prompt_len_b + n
        logits_bv = logits_fn(tokens_bt)[rows_b, write_pos_b - 1]
        next_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
        next_b = jnp.where(done_b, pad_id, next_b)
        return (
            tokens_bt.at[rows_b, write_pos_b].set(next_b),
            done_b | (next_b == eos_id),
            new_bn.at[:, n].set(next_b),
        )

    def step_or_skip(n, carry):
        # Once every row has emitted eos, the remaining iterations skip the model call.
        return jax.lax.cond(jnp.all(carry[1]), lambda n, c: c, decode_step, n, carry)

    init = (
        tokens_bt,
        jnp.zeros((batch,), bool),
        jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
    )
    _, _, new_bn = jax.lax.fori_loop(0, max_new_tokens, step_or_skip, init)
    return new_bn
