"""Batched generation with a KV cache: greedy, temperature / top-k / top-p sampling, stop tokens.

`generate` takes a `UniMoE` (media encoded once, spliced into the prompt embeddings) or a bare
`DecoderLM`, as (graphdef, state), and a batch of right-padded prompts of different lengths. The
prompt is prefilled once, then each step decodes one token per row against the cache
(`unimoe.models.kv_cache`). Generated tokens are embedded as text, even a media placeholder id.

Shapes are bucketed so that new batches reuse compiled code: the batch is padded up to a power of
two with copies of its first row, the prompt buffer up to `length_bucket` positions; one
compilation serves every batch of a (batch bucket, length bucket, max_new_tokens, stop ids,
sampling mode) combination. The model runs as at evaluation: `deterministic` (no dropout or
router noise) and `dropless` (a capacity-based MoE layer keeps every token, so no decoded token is
ever dropped).

A row's draws depend on its `row_ids` entry (default: its index in the batch), so an evaluation
that passes each question's index samples the same answer whatever batch the question is in
(batch-size-1 semantics). `suppress_ids` are never generated (the media placeholders: their
vocabulary rows exist only to be replaced by media features).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimoe.models import kv_cache
from unimoe.models.llm import DecoderLM
from unimoe.models.unimoe import UniMoE

# Batch keys the multimodal model reads besides tokens / prompt_len (each optional; the sound
# tower's with `config.model.sound`, `unimoe.data.sound`).
MEDIA_KEYS = (
    'image', 'video', 'audio_mel', 'has_image', 'has_video', 'has_audio', 'sound_fbank',
    'sound_frame_mask', 'has_sound',
)
# Prompt buffers: powers of two from MIN_PROMPT_BUCKET, then multiples of LONG_PROMPT_STEP.
MIN_PROMPT_BUCKET = 16
LONG_PROMPT_STEP = 256


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy (argmax; top_k, top_p and seed unused). Otherwise sample from
    softmax(logits / temperature) restricted, in Hugging Face's order, to the `top_k` most likely
    tokens (0: no limit; ties with the k-th stay) and then to the top-p nucleus: the most likely
    tokens whose mass, counted before each token, is < top_p (so the top token always stays).
    Draws depend only on (seed, row id, step), not on the batch bucket."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    top_k: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f'SamplingConfig.temperature must be >= 0, got {self.temperature}')
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f'SamplingConfig.top_p must be in (0, 1], got {self.top_p}')
        if self.top_k < 0:
            raise ValueError(f'SamplingConfig.top_k must be >= 0 (0: no limit), got {self.top_k}')

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def batch_bucket(batch: int) -> int:
    """Rows a batch of `batch` prompts is padded to: the next power of two."""
    return 1 << max(batch - 1, 0).bit_length()


def length_bucket(length: int) -> int:
    """Prompt buffer length for a longest prompt of `length` tokens."""
    if length <= LONG_PROMPT_STEP:
        return max(MIN_PROMPT_BUCKET, 1 << max(length - 1, 0).bit_length())
    return -(-length // LONG_PROMPT_STEP) * LONG_PROMPT_STEP


def warp_logits(
    logits_bv: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    top_p: float | jax.Array = 1.0,
    top_k: int | jax.Array = 0,
    min_keep: int = 1,
) -> jax.Array:
    """float32 logits / temperature with -inf outside the top-k, then outside the top-p nucleus
    (`SamplingConfig`), Hugging Face's warpers in their order; each filter keeps at least the
    `min_keep` most likely tokens (beam search keeps a continuation beside every stop id)."""
    logits_bv = logits_bv.astype(jnp.float32) / temperature
    sorted_bv = -jnp.sort(-logits_bv, axis=-1)
    # Top-k first: the k-th largest logit is the threshold.
    kth_b1 = jnp.take(sorted_bv, jnp.maximum(top_k, min_keep) - 1, axis=-1)[:, None]
    logits_bv = jnp.where((top_k > 0) & (logits_bv < kth_b1), -jnp.inf, logits_bv)
    probs_bv = jax.nn.softmax(logits_bv, axis=-1)
    sorted_bv = -jnp.sort(-probs_bv, axis=-1)
    mass_before_bv = jnp.cumsum(sorted_bv, axis=-1) - sorted_bv
    kept_bv = (mass_before_bv < top_p) | (jnp.arange(sorted_bv.shape[-1]) < min_keep)
    # The smallest kept probability; ties with it stay too (the nucleus is a set of values).
    threshold_b1 = jnp.min(jnp.where(kept_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
    # top_p = 1 keeps every token, even those a float32 cumsum would push past 1.
    in_nucleus_bv = (probs_bv >= threshold_b1) | (top_p >= 1.0)
    return jnp.where(in_nucleus_bv, logits_bv, -jnp.inf)


def select_tokens(
    logits_bv: jax.Array,
    key: jax.Array,
    *,
    greedy: bool,
    temperature: float | jax.Array = 1.0,
    top_p: float | jax.Array = 1.0,
    top_k: int | jax.Array = 0,
    row_ids_b: jax.Array | None = None,
) -> jax.Array:
    """The next token of each row, int32 [B]: the argmax if `greedy`, else a draw from
    `warp_logits` with key fold_in(key, row id) (row ids: `row_ids_b`, default 0..B-1).
    temperature, top_p and top_k may be traced (a new value does not recompile)."""
    if greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = warp_logits(logits_bv, temperature=temperature, top_p=top_p, top_k=top_k)
    if row_ids_b is None:
        row_ids_b = jnp.arange(logits_bv.shape[0])
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, row_ids_b)
    return jax.vmap(jax.random.categorical)(row_keys, logits_bv).astype(jnp.int32)


def decode(
    lm: DecoderLM,
    x_btd: jax.Array,
    prompt_len_b: jax.Array,
    key: jax.Array,
    knobs: Mapping[str, jax.Array],
    *,
    max_new_tokens: int,
    stop_ids: tuple[int, ...],
    pad_id: int,
    greedy: bool,
    suppress_ids: tuple[int, ...] = (),
) -> tuple[jax.Array, jax.Array]:
    """Prefill the prompt embeddings, then decode: (int32 [B, max_new_tokens], each row's first
    stop token included and `pad_id` after it; the first step's logits float32 [B, V], before
    suppression). Stops early once every row has stopped. knobs: traced 'temperature', 'top_p',
    'top_k' and 'row_ids' [B] (`select_tokens`)."""
    first_logits_bv, cache = kv_cache.prefill(
        lm, x_btd, prompt_len_b, max_len=x_btd.shape[1] + max_new_tokens - 1
    )
    stop_s = jnp.asarray(stop_ids, jnp.int32)
    batch = x_btd.shape[0]
    suppressed_v = jnp.isin(jnp.arange(first_logits_bv.shape[-1]), jnp.asarray(suppress_ids, int))

    def choose(n, logits_bv, done_b):
        next_b = select_tokens(
            jnp.where(suppressed_v, -jnp.inf, logits_bv),
            jax.random.fold_in(key, n),
            greedy=greedy,
            temperature=knobs['temperature'],
            top_p=knobs['top_p'],
            top_k=knobs['top_k'],
            row_ids_b=knobs['row_ids'],
        )
        next_b = jnp.where(done_b, pad_id, next_b)
        return next_b, done_b | jnp.isin(next_b, stop_s)

    def step(carry):
        n, logits_bv, cache, done_b, out_bn = carry
        next_b, done_b = choose(n, logits_bv, done_b)
        logits_bv, cache = kv_cache.decode_step(lm, lm.embed_tokens(next_b[:, None])[:, 0], cache)
        return n + 1, logits_bv, cache, done_b, out_bn.at[:, n].set(next_b)

    def running(carry):
        n, _, _, done_b, _ = carry
        return (n < max_new_tokens - 1) & ~jnp.all(done_b)

    init = (
        jnp.int32(0),
        first_logits_bv,
        cache,
        jnp.zeros((batch,), bool),
        jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
    )
    # The last token needs no decode step after it, so the loop stops one short and picks it here
    # (pad for every row if all stopped early).
    n, logits_bv, _, done_b, out_bn = jax.lax.while_loop(running, step, init)
    tokens_bn = out_bn.at[:, n].set(choose(n, logits_bv, done_b)[0])
    return tokens_bn, first_logits_bv.astype(jnp.float32)


def embed_prompts(
    graphdef: nnx.GraphDef, state: nnx.State, inputs: Mapping[str, jax.Array]
) -> tuple[DecoderLM, jax.Array]:
    """(the LM, the prompt embeddings [B, T, D]) of a `UniMoE` (media encoded once and spliced
    in) or a bare `DecoderLM`, viewed as at evaluation (deterministic, dropless)."""
    model = nnx.merge(graphdef, state)
    model = nnx.view(model, deterministic=True, dropless=True, raise_if_not_found=False)
    if isinstance(model, UniMoE):
        return model.llm, model.embed(inputs['tokens'], model.encode_media(inputs))
    return model, model.embed_tokens(inputs['tokens'])


@functools.partial(
    jax.jit,
    static_argnames=('graphdef', 'max_new_tokens', 'stop_ids', 'pad_id', 'greedy', 'suppress_ids'),
)
def _generate_bucketed(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    inputs: Mapping[str, jax.Array],
    key: jax.Array,
    knobs: Mapping[str, jax.Array],
    **static: Any,
) -> tuple[jax.Array, jax.Array]:
    lm, x_btd = embed_prompts(graphdef, state, inputs)
    return decode(lm, x_btd, inputs['prompt_len'], key, knobs, **static)


def _check_batch(tokens: np.ndarray, prompt_len: np.ndarray, max_new_tokens: int) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"generate: batch['tokens'] must be [B, T], got shape {tokens.shape}")
    num_rows, width = tokens.shape
    if prompt_len.shape != (num_rows,):
        raise ValueError(
            f"generate: batch['prompt_len'] must have shape ({num_rows},), got {prompt_len.shape}"
        )
    if num_rows == 0 or prompt_len.min() < 1 or prompt_len.max() > width:
        raise ValueError(
            f"generate: every batch['prompt_len'] must be in [1, T={width}], got {prompt_len}"
        )
    if max_new_tokens < 1:
        raise ValueError(f'generate: max_new_tokens must be >= 1, got {max_new_tokens}')


def sorted_ids(ids: Collection[int]) -> tuple[int, ...]:
    """Token ids as a sorted tuple of distinct ints: a static jit argument."""
    return tuple(sorted({int(i) for i in ids}))


def bucket_batch(
    batch: Mapping[str, Any],
    *,
    max_new_tokens: int,
    pad_id: int,
    sampling: SamplingConfig,
    row_ids: Sequence[int] | None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """(inputs, knobs, number of real rows) of a checked `batch` padded to its buckets: rows up to
    `batch_bucket` with copies of row 0 (their outputs are dropped), the prompt buffer cut or
    padded to `length_bucket`; knobs hold the traced sampling values and each row's stream id."""
    tokens = np.asarray(batch['tokens'])
    prompt_len = np.asarray(batch['prompt_len'])
    _check_batch(tokens, prompt_len, max_new_tokens)
    num_rows, width = tokens.shape
    rows = batch_bucket(num_rows)
    length = length_bucket(int(prompt_len.max()))
    take = np.concatenate([np.arange(num_rows), np.zeros(rows - num_rows, int)])
    buffer = np.full((rows, length), pad_id, np.int32)
    kept = min(width, length)
    buffer[:, :kept] = tokens[take, :kept]
    inputs = {'tokens': buffer, 'prompt_len': prompt_len[take].astype(np.int32)}
    for name in MEDIA_KEYS:
        if name in batch:
            inputs[name] = np.asarray(batch[name])[take]
    knobs = {
        'temperature': np.float32(sampling.temperature),
        'top_p': np.float32(sampling.top_p),
        'top_k': np.int32(sampling.top_k),
        'row_ids': np.asarray(np.arange(num_rows) if row_ids is None else row_ids, np.int32)[take],
    }
    return inputs, knobs, num_rows


def generate(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    batch: Mapping[str, Any],
    *,
    max_new_tokens: int,
    pad_id: int,
    stop_ids: Collection[int] = (),
    sampling: SamplingConfig = SamplingConfig(),
    row_ids: Sequence[int] | None = None,
    suppress_ids: Collection[int] = (),
    with_first_logits: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """New tokens int32 [B, max_new_tokens] for the prompts of `batch`; with `with_first_logits`
    also the logits float32 [B, V] the first new token was chosen from (before suppression).

    graphdef, state: `nnx.split` of a `UniMoE` or a `DecoderLM`.
    batch: 'tokens' int [B, T] (row b's prompt is tokens[b, :prompt_len[b]], the rest ignored),
    'prompt_len' int [B], and for a UniMoE the media of `MEDIA_KEYS` it has (batch-major arrays).
    A row's output ends at its first token in `stop_ids` (included) and is `pad_id` after it.
    row_ids: each row's sampling stream (default 0..B-1); suppress_ids: never generated.
    """
    inputs, knobs, num_rows = bucket_batch(
        batch, max_new_tokens=max_new_tokens, pad_id=pad_id, sampling=sampling, row_ids=row_ids
    )
    out, first_logits = _generate_bucketed(
        graphdef,
        state,
        inputs,
        jax.random.key(sampling.seed),
        knobs,
        max_new_tokens=max_new_tokens,
        stop_ids=sorted_ids(stop_ids),
        pad_id=pad_id,
        greedy=sampling.greedy,
        suppress_ids=sorted_ids(suppress_ids),
    )
    out = np.asarray(out)[:num_rows]
    return (out, np.asarray(first_logits)[:num_rows]) if with_first_logits else out
