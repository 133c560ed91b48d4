"""Beam search and beam sampling with a KV cache, as Hugging Face `generate(num_beams=K)` does them.

Each prompt keeps K live hypotheses and up to K finished ones. A step scores every live beam's
continuations by summed log-probability (the log-softmax of the logits, then -inf for suppressed
ids and, before `min_new_tokens`, for stop ids; when sampling, the warpers of `SamplingConfig` on
top), and takes M = max(2, 1 + number of stop ids) * K candidates over all beams x vocabulary: the
M best (beam search) or M drawn without replacement from the softmax of the summed scores (beam
sampling, by the Gumbel top-k trick, then sorted by score). The K best candidates that did not end
become the live beams; a candidate among the first K that ends (a stop id, or the last of
`max_new_tokens`) joins the finished set with score sum / length ** length_penalty (length: new
tokens, the stop id included), and the K best finished ones stay. A prompt closes once its best
live beam, normalised at the current length, cannot beat its worst finished hypothesis
(`early_stopping=False`); the loop ends when every prompt has closed. This follows transformers
5.x `_beam_search`, tested token for token against it (`tests/eval/test_beam.py`).

transformers 4.31 (the official Uni-MoE environment) differs: it normalises by the prompt length
plus the new tokens without the stop id, applies temperature to the summed scores, and at the
last step also keeps live beams ranked below K. At temperature 1 (Clotho's protocol) only the
length differs.

The prompt is prefilled once per prompt and its cache copied to its K beams; each step gathers
the cache rows of the chosen parents (`kv_cache.KVCache` is batch-major). Draws at step n for a
prompt use key fold_in(fold_in(key(seed), n), row id), as `generate`, so a prompt's answer does
not depend on its batch.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimoe.eval import generate as gen
from unimoe.models import kv_cache
from unimoe.models.llm import DecoderLM

# Hugging Face's additive penalty that keeps a candidate out of a top-k (kept, not -inf, so the
# same ties break the same way).
_OUT = -1.0e9


class _Beams(NamedTuple):
    """The search state of B prompts x K beams after `n` new tokens."""

    n: jax.Array  # int32 scalar: tokens generated so far
    live_bkn: jax.Array  # int32 live hypotheses, pad after position n - 1
    live_score_bk: jax.Array  # float32 summed log-probs, best first
    done_bkn: jax.Array  # int32 finished hypotheses, best first
    done_score_bk: jax.Array  # float32 length-normalised scores
    is_done_bk: jax.Array  # bool: the slot holds a finished hypothesis
    open_b: jax.Array  # bool: a live beam may still beat the worst finished one
    go: jax.Array  # bool scalar: some prompt is open and some candidate went on


def _init(batch: int, num_beams: int, max_new_tokens: int, pad_id: int) -> _Beams:
    tokens_bkn = jnp.full((batch, num_beams, max_new_tokens), pad_id, jnp.int32)
    # Only beam 0 is live at first (all beams share the prompt), so its continuations are not
    # repeated K times.
    live_score_bk = jnp.zeros((batch, num_beams)).at[:, 1:].set(_OUT)
    return _Beams(
        n=jnp.int32(0),
        live_bkn=tokens_bkn,
        live_score_bk=live_score_bk,
        done_bkn=tokens_bkn,
        done_score_bk=jnp.full((batch, num_beams), _OUT),
        is_done_bk=jnp.zeros((batch, num_beams), bool),
        open_b=jnp.ones((batch,), bool),
        go=jnp.bool_(True),
    )


def _log_probs(logits_bv, n, knobs, *, stop_ids, suppress_ids, greedy):
    """Hugging Face's beam scores of the next token: log-softmax, then the processors."""
    log_probs_bv = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
    vocab_v = jnp.arange(log_probs_bv.shape[-1])
    stop_v = jnp.isin(vocab_v, jnp.asarray(stop_ids, int))
    too_early = n < knobs['min_new_tokens']
    banned_v = jnp.isin(vocab_v, jnp.asarray(suppress_ids, int)) | (stop_v & too_early)
    log_probs_bv = jnp.where(banned_v, -jnp.inf, log_probs_bv)
    if greedy:
        return log_probs_bv
    return gen.warp_logits(
        log_probs_bv,
        temperature=knobs['temperature'],
        top_p=knobs['top_p'],
        top_k=knobs['top_k'],
        min_keep=max(2, len(stop_ids) + 1),
    )


def _candidates(total_bm, key, row_ids_b, *, count, greedy):
    """(scores, flat indices) of `count` candidates per row, best score first."""
    if greedy:
        return jax.lax.top_k(total_bm, count)
    # Gumbel top-k: the order of perturbed scores is a draw without replacement, as
    # torch.multinomial(softmax(total), count) makes it.
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, row_ids_b)
    gumbel_bm = jax.vmap(lambda k: jax.random.gumbel(k, total_bm.shape[1:]))(keys)
    _, index_bc = jax.lax.top_k(total_bm + gumbel_bm, count)
    score_bc = jnp.take_along_axis(total_bm, index_bc, axis=1)
    order_bc = jnp.argsort(-score_bc, axis=1, stable=True)
    return (
        jnp.take_along_axis(score_bc, order_bc, axis=1),
        jnp.take_along_axis(index_bc, order_bc, axis=1),
    )


def _gather(x_bk, index_bj):
    """x[b, index[b, j]] for an array with trailing axes."""
    index = index_bj.reshape(index_bj.shape + (1,) * (x_bk.ndim - 2))
    return jnp.take_along_axis(x_bk, index, axis=1)


def _step(beams, log_probs_bkv, key, knobs, *, stop_ids, max_new_tokens, greedy):
    """One beam step -> (the new state, each new live beam's parent as a flat row of B * K)."""
    batch, num_beams, vocab = log_probs_bkv.shape
    count = max(2, 1 + len(stop_ids)) * num_beams
    n = beams.n
    total_bm = (log_probs_bkv + beams.live_score_bk[:, :, None]).reshape(batch, -1)
    score_bc, index_bc = _candidates(total_bm, key, knobs['row_ids'], count=count, greedy=greedy)
    parent_bc = index_bc // vocab
    token_bc = (index_bc % vocab).astype(jnp.int32)
    seq_bcn = _gather(beams.live_bkn, parent_bc).at[:, :, n].set(token_bc)
    ends_bc = jnp.isin(token_bc, jnp.asarray(stop_ids, jnp.int32)) | (n + 1 >= max_new_tokens)
    # Live: the K best candidates that go on.
    live_bc = score_bc + ends_bc.astype(jnp.float32) * _OUT
    live_score_bk, live_bk = jax.lax.top_k(live_bc, num_beams)
    # Finished: candidates among the first K that end, while the prompt is open.
    norm = (n + 1).astype(jnp.float32) ** knobs['length_penalty']
    ended_bc = ends_bc & (jnp.arange(count) < num_beams)
    final_bc = score_bc / norm
    final_bc += (~beams.open_b[:, None]).astype(jnp.float32) * _OUT
    final_bc += (~ended_bc).astype(jnp.float32) * _OUT
    merged_score = jnp.concatenate([beams.done_score_bk, final_bc], axis=1)
    done_score_bk, keep_bk = jax.lax.top_k(merged_score, num_beams)
    is_done_bk = _gather(jnp.concatenate([beams.is_done_bk, ended_bc], axis=1), keep_bk)
    # Can the best live beam, at today's length, still beat the worst finished hypothesis?
    worst_bk = jnp.where(is_done_bk, done_score_bk.min(axis=1, keepdims=True), _OUT)
    open_b = beams.open_b & jnp.any(live_score_bk[:, :1] / norm > worst_bk, axis=1)
    new = _Beams(
        n=n + 1,
        live_bkn=_gather(seq_bcn, live_bk),
        live_score_bk=live_score_bk,
        done_bkn=_gather(jnp.concatenate([beams.done_bkn, seq_bcn], axis=1), keep_bk),
        done_score_bk=done_score_bk,
        is_done_bk=is_done_bk,
        open_b=open_b,
        go=jnp.any(open_b) & ~jnp.all(ends_bc),
    )
    parent_bk = _gather(parent_bc, live_bk) + jnp.arange(batch)[:, None] * num_beams
    return new, parent_bk.reshape(-1)


def beam_decode(
    lm: DecoderLM,
    x_btd: jax.Array,
    prompt_len_b: jax.Array,
    key: jax.Array,
    knobs: Mapping[str, jax.Array],
    *,
    num_beams: int,
    max_new_tokens: int,
    stop_ids: tuple[int, ...],
    pad_id: int,
    greedy: bool,
    suppress_ids: tuple[int, ...] = (),
) -> tuple[jax.Array, jax.Array]:
    """(each prompt's best finished hypothesis int32 [B, max_new_tokens], pad after its stop id;
    the prompt's next-token logits float32 [B, V]). knobs: as `generate.decode`, plus traced
    'min_new_tokens' and 'length_penalty'."""
    first_logits_bv, cache = kv_cache.prefill(
        lm, x_btd, prompt_len_b, max_len=x_btd.shape[1] + max_new_tokens - 1
    )
    batch, vocab = first_logits_bv.shape
    if vocab < max(2, 1 + len(stop_ids)):
        raise ValueError(
            f'beam_decode: {len(stop_ids)} stop ids need a vocabulary over {len(stop_ids)} '
            f'tokens (and at least 2), got {vocab}; pass fewer stop ids'
        )
    to_beams = functools.partial(jnp.repeat, repeats=num_beams, axis=0)
    cache = jax.tree.map(to_beams, cache)
    process = functools.partial(
        _log_probs,
        knobs=knobs,
        stop_ids=stop_ids,
        suppress_ids=suppress_ids,
        greedy=greedy,
    )
    step = functools.partial(
        _step,
        knobs=knobs,
        stop_ids=stop_ids,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
    )

    def advance(beams, logits_bv, cache):
        log_probs_bkv = process(logits_bv, beams.n).reshape(batch, num_beams, vocab)
        beams, parent_r = step(beams, log_probs_bkv, jax.random.fold_in(key, beams.n))
        return beams, jax.tree.map(lambda x: x[parent_r], cache)

    def body(carry):
        beams, cache = carry
        tokens_r = beams.live_bkn[:, :, beams.n - 1].reshape(-1)
        logits_bv, cache = kv_cache.decode_step(lm, lm.embed_tokens(tokens_r[:, None])[:, 0], cache)
        return advance(beams, logits_bv, cache)

    beams = _init(batch, num_beams, max_new_tokens, pad_id)
    carry = advance(beams, to_beams(first_logits_bv), cache)
    beams, _ = jax.lax.while_loop(lambda carry: carry[0].go, body, carry)
    return beams.done_bkn[:, 0], first_logits_bv.astype(jnp.float32)


@functools.partial(
    jax.jit,
    static_argnames=(
        'graphdef', 'num_beams', 'max_new_tokens', 'stop_ids', 'pad_id', 'greedy', 'suppress_ids'
    ),
)
def _beam_bucketed(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    inputs: Mapping[str, jax.Array],
    key: jax.Array,
    knobs: Mapping[str, jax.Array],
    **static: Any,
) -> tuple[jax.Array, jax.Array]:
    lm, x_btd = gen.embed_prompts(graphdef, state, inputs)
    return beam_decode(lm, x_btd, inputs['prompt_len'], key, knobs, **static)


def beam_generate(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    batch: Mapping[str, Any],
    *,
    num_beams: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    pad_id: int,
    stop_ids: Collection[int] = (),
    sampling: gen.SamplingConfig = gen.SamplingConfig(),
    length_penalty: float = 1.0,
    row_ids: Sequence[int] | None = None,
    suppress_ids: Collection[int] = (),
    with_first_logits: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Each prompt's best hypothesis int32 [B, max_new_tokens] under beam search (greedy
    `sampling`) or beam sampling (module docstring); with `with_first_logits` also the prompt's
    next-token logits float32 [B, V].

    batch, pad_id, stop_ids, row_ids, suppress_ids: as `generate.generate` (a hypothesis ends at
    its first stop id, included, and is `pad_id` after it). No stop id comes before
    `min_new_tokens` new tokens. length_penalty: finished scores are divided by length ** it.
    """
    if num_beams < 1:
        raise ValueError(f'beam_generate: num_beams must be >= 1, got {num_beams}')
    if min_new_tokens < 0:
        raise ValueError(f'beam_generate: min_new_tokens must be >= 0, got {min_new_tokens}')
    inputs, knobs, num_rows = gen.bucket_batch(
        batch, max_new_tokens=max_new_tokens, pad_id=pad_id, sampling=sampling, row_ids=row_ids
    )
    knobs.update(
        min_new_tokens=np.int32(min_new_tokens), length_penalty=np.float32(length_penalty)
    )
    out, first_logits = _beam_bucketed(
        graphdef,
        state,
        inputs,
        jax.random.key(sampling.seed),
        knobs,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        stop_ids=gen.sorted_ids(stop_ids),
        pad_id=pad_id,
        greedy=sampling.greedy,
        suppress_ids=gen.sorted_ids(suppress_ids),
    )
    out = np.asarray(out)[:num_rows]
    return (out, np.asarray(first_logits)[:num_rows]) if with_first_logits else out
