"""KV-cached generation against an uncached reference that reruns the whole sequence per token."""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.tiny_model import TOKEN_IDS, model_config, random_module
from unimoe.eval import evaluate, generate
from unimoe.models.llm import DecoderLM, LLMConfig
from unimoe.models.unimoe import UniMoE

VOCAB = 41
PAD = 0
LM = dict(vocab_size=VOCAB, dim=24, num_layers=2, num_heads=3, num_kv_heads=1, ffn_dim=20)
LMS = {
    'dense': LM,
    'moe_lora': dict(LM, moe_layers='all', moe=dict(num_experts=3, top_k=2), lora=dict(rank=2)),
    # Capacity 1 of 4 decode tokens per expert: generation must lift it (`dropless` view).
    'moe_capacity': dict(
        LM,
        moe_layers='all',
        moe=dict(num_experts=3, top_k=2, impl='capacity', capacity_factor=0.3, min_capacity=1),
    ),
}


def random_lm(name: str) -> DecoderLM:
    return random_module(lambda: DecoderLM(LLMConfig(**LMS[name]), rngs=nnx.Rngs(0)))


def random_unimoe(*, moe: bool, lora_rank: int) -> UniMoE:
    cfg = model_config(moe=moe, lora_rank=lora_rank)
    return random_module(lambda: UniMoE(cfg, rngs=nnx.Rngs(0)))


def prompts_batch(prompts: list[list[int]], width: int = 0) -> dict[str, np.ndarray]:
    width = max(width, max(map(len, prompts)))
    tokens = np.full((len(prompts), width), PAD, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    return {'tokens': tokens, 'prompt_len': np.asarray([len(p) for p in prompts], np.int32)}


TEXT_PROMPTS = [[1, 7, 8, 9], [1, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29], [1, 30]]
# One max_new_tokens everywhere: tests then share compiled generation functions.
NEW = 8


def run(model: nnx.Module, batch, **kwargs) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return generate.generate(graphdef, state, batch, pad_id=PAD, **kwargs)


def uncached_greedy(
    logits_fn: Callable[[jax.Array, jax.Array], jax.Array],
    batch: dict[str, np.ndarray],
    *,
    max_new_tokens: int,
    stop_ids: tuple[int, ...] = (),
) -> np.ndarray:
    """Reference: rerun the full model on [B, max prompt + N] at every step, read each row's
    logits at its last token; `logits_fn(tokens_bt, prompt_len_b) -> logits_btv`."""
    prompt_len = batch['prompt_len']
    rows = np.arange(len(prompt_len))
    tokens = np.full((len(rows), prompt_len.max() + max_new_tokens), PAD, np.int32)
    tokens[:, : batch['tokens'].shape[1]] = batch['tokens']
    out = np.full((len(rows), max_new_tokens), PAD, np.int32)
    done = np.zeros(len(rows), bool)
    for n in range(max_new_tokens):
        logits = np.asarray(logits_fn(jnp.asarray(tokens), jnp.asarray(prompt_len)))
        next_token = np.where(done, PAD, logits[rows, prompt_len + n - 1].argmax(-1))
        out[:, n] = next_token
        done |= np.isin(next_token, stop_ids)
        tokens[rows, prompt_len + n] = next_token
    return out


def lm_logits_fn(lm: DecoderLM):
    lm = nnx.view(lm, deterministic=True, dropless=True, raise_if_not_found=False)

    @nnx.jit
    def logits(lm, tokens_bt):
        return lm(lm.embed_tokens(tokens_bt), jnp.ones(tokens_bt.shape, bool))[0]

    return lambda t, p: logits(lm, t)


@pytest.mark.parametrize('name', sorted(LMS))
def test_cached_greedy_equals_uncached_for_the_text_lm(name):
    lm = random_lm(name)
    batch = prompts_batch(TEXT_PROMPTS)
    cached = run(lm, batch, max_new_tokens=NEW)
    reference = uncached_greedy(lm_logits_fn(lm), batch, max_new_tokens=NEW)
    np.testing.assert_array_equal(cached, reference)
    assert len(np.unique(cached)) > 5  # the random model says something, not one token repeated


def media_batch(model: UniMoE, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Three prompts: text + image, audio + text, image + audio (placeholders expanded)."""
    image = [TOKEN_IDS['image_token_id']] * model.num_media_tokens['image']
    audio = [TOKEN_IDS['audio_token_id']] * model.num_media_tokens['audio']
    batch = prompts_batch(
        [[1, 7, 8] + image + [9, 10], [1] + audio + [11, 12, 13, 14, 15, 16], [1] + image + audio]
    )
    batch.update(
        image=rng.normal(size=(3, 12, 12, 3)).astype(np.float32),
        video=rng.normal(size=(3, 2, 12, 12, 3)).astype(np.float32),
        audio_mel=rng.normal(size=(3, 14, 8)).astype(np.float32),
    )
    return batch


def unimoe_logits_fn(model: UniMoE, batch):
    """Media spliced into the prompt only: generated tokens are text, as in `generate`."""
    model = nnx.view(model, deterministic=True, dropless=True, raise_if_not_found=False)
    media_keys = ('image', 'video', 'audio_mel')

    @nnx.jit
    def logits(model, media_batch, tokens_bt, prompt_len_b):
        in_prompt_bt = jnp.arange(tokens_bt.shape[1])[None] < prompt_len_b[:, None]
        spliced_btd = model.embed(tokens_bt, model.encode_media(media_batch))
        x_btd = jnp.where(in_prompt_bt[..., None], spliced_btd, model.llm.embed_tokens(tokens_bt))
        return model.llm(x_btd, jnp.ones(tokens_bt.shape, bool))[0]

    return lambda t, p: logits(model, {k: batch[k] for k in media_keys}, t, p)


@pytest.mark.parametrize('moe, lora_rank', [(False, 0), (True, 2)], ids=['dense', 'moe_lora'])
def test_cached_greedy_equals_uncached_with_image_and_audio_in_the_prompt(moe, lora_rank):
    model = random_unimoe(moe=moe, lora_rank=lora_rank)
    batch = media_batch(model, np.random.default_rng(0))
    cached = run(model, batch, max_new_tokens=NEW)
    np.testing.assert_array_equal(
        cached, uncached_greedy(unimoe_logits_fn(model, batch), batch, max_new_tokens=NEW)
    )
    # The media reach the answer: other pixels and mels change what is generated.
    other = dict(batch, image=batch['image'] + 1.0, audio_mel=batch['audio_mel'] - 1.0)
    assert (run(model, other, max_new_tokens=NEW) != cached).any()


def test_generation_reads_the_sound_tower_for_its_rows():
    """A `has_sound` row's `<audio>` is read from BEATs + Q-Former in generation too (the
    evaluation passes the sound keys): other filterbanks change its answer, not the other rows'."""
    cfg = model_config(sound=True)
    model = random_module(lambda: UniMoE(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    batch = media_batch(model, rng)
    batch.update(
        sound_fbank=rng.normal(size=(3, 1, 13, 8)).astype(np.float32),
        sound_frame_mask=np.zeros((3, 1, 13), bool),
        has_sound=np.array([False, True, False]),
    )
    assert set(generate.MEDIA_KEYS) >= {'sound_fbank', 'sound_frame_mask', 'has_sound'}
    cached = run(model, batch, max_new_tokens=NEW)
    other_fbank = rng.normal(size=batch['sound_fbank'].shape).astype(np.float32)
    other = run(model, dict(batch, sound_fbank=other_fbank), max_new_tokens=NEW)
    assert (other[1] != cached[1]).any()
    np.testing.assert_array_equal(other[[0, 2]], cached[[0, 2]])


def test_batched_equals_unbatched_with_different_prompt_lengths():
    model = random_unimoe(moe=True, lora_rank=2)
    batch = media_batch(model, np.random.default_rng(1))
    together = run(model, batch, max_new_tokens=NEW)
    for row in range(3):
        alone = {k: v[row : row + 1] for k, v in batch.items()}
        alone['tokens'] = alone['tokens'][:, : alone['prompt_len'][0]]
        np.testing.assert_array_equal(
            run(model, alone, max_new_tokens=NEW), together[row : row + 1]
        )


def test_stop_tokens_end_each_row_and_pad_after_them():
    lm = random_lm('moe_lora')
    batch = prompts_batch(TEXT_PROMPTS)
    free = run(lm, batch, max_new_tokens=NEW)
    # Stop at the token row 0 produces 3rd and the one row 1 produces 5th.
    stops = (int(free[0, 2]), int(free[1, 4]))
    stopped = run(lm, batch, max_new_tokens=NEW, stop_ids=stops)
    for row in range(3):
        hits = np.flatnonzero(np.isin(free[row], stops))
        end = hits[0] + 1 if len(hits) else NEW
        np.testing.assert_array_equal(stopped[row, :end], free[row, :end])
        np.testing.assert_array_equal(stopped[row, end:], PAD)
    assert (stopped == PAD).sum() > (free == PAD).sum()
    # generate_answers (the evaluation's entry point) stops at eos and any other stop id.
    graphdef, state = nnx.split(lm)
    answers = evaluate.generate_answers(
        graphdef, state, batch, max_new_tokens=NEW, eos_id=stops[1], pad_id=PAD, stop_ids=stops[:1]
    )
    np.testing.assert_array_equal(answers, stopped)


SAMPLED = generate.SamplingConfig(temperature=1.0, top_p=0.9, seed=7)


def test_sampling_is_reproducible_for_a_seed():
    lm = random_lm('dense')
    batch = prompts_batch(TEXT_PROMPTS)
    first = run(lm, batch, max_new_tokens=NEW, sampling=SAMPLED)
    np.testing.assert_array_equal(run(lm, batch, max_new_tokens=NEW, sampling=SAMPLED), first)
    other_seed = dataclasses.replace(SAMPLED, seed=8)
    assert (run(lm, batch, max_new_tokens=NEW, sampling=other_seed) != first).any()
    assert (first != run(lm, batch, max_new_tokens=NEW)).any()  # not the greedy tokens


def test_top_p_near_zero_samples_the_greedy_tokens():
    lm = random_lm('dense')
    batch = prompts_batch(TEXT_PROMPTS)
    nucleus = generate.SamplingConfig(temperature=1.5, top_p=1e-6, seed=3)
    np.testing.assert_array_equal(
        run(lm, batch, max_new_tokens=NEW, sampling=nucleus), run(lm, batch, max_new_tokens=NEW)
    )


@pytest.mark.parametrize('temperature, top_p', [(1.0, 1.0), (0.5, 1.0), (1.0, 0.8)])
def test_samples_follow_the_tempered_nucleus_softmax(temperature, top_p):
    logits_v = jnp.array([2.0, 1.5, 0.5, 0.0, -1.0])
    draws = 20000
    samples = generate.select_tokens(
        jnp.broadcast_to(logits_v, (draws, 5)),
        jax.random.key(0),
        greedy=False,
        temperature=temperature,
        top_p=top_p,
    )
    probs = np.asarray(jax.nn.softmax(logits_v / temperature))
    # The nucleus: the most likely tokens whose mass before them is < top_p, renormalized.
    order = np.argsort(-probs)
    kept = order[np.cumsum(probs[order]) - probs[order] < top_p]
    expected = np.zeros(5)
    expected[kept] = probs[kept] / probs[kept].sum()
    freq = np.bincount(np.asarray(samples), minlength=5) / draws
    np.testing.assert_allclose(freq, expected, atol=0.015)  # ~4 standard errors at p = 0.5
    assert len(kept) < 5 or top_p == 1.0


@pytest.mark.parametrize('top_k, top_p', [(2, 1.0), (3, 0.6)])
def test_samples_follow_top_k_then_the_nucleus(top_k, top_p):
    """Hugging Face's order: the k most likely tokens, then the nucleus of their softmax."""
    logits_v = jnp.array([0.0, 2.0, -1.0, 1.5, 0.5])
    draws = 20000
    samples = generate.select_tokens(
        jnp.broadcast_to(logits_v, (draws, 5)),
        jax.random.key(1),
        greedy=False,
        top_k=top_k,
        top_p=top_p,
    )
    top = np.argsort(-np.asarray(logits_v))[:top_k]
    probs = np.zeros(5)
    probs[top] = np.exp(np.asarray(logits_v)[top]) / np.exp(np.asarray(logits_v)[top]).sum()
    order = np.argsort(-probs)
    kept = order[(np.cumsum(probs[order]) - probs[order] < top_p) & (probs[order] > 0)]
    expected = np.zeros(5)
    expected[kept] = probs[kept] / probs[kept].sum()
    freq = np.bincount(np.asarray(samples), minlength=5) / draws
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_a_row_samples_its_own_stream_whatever_its_batch():
    """Row ids key the draws: a prompt sampled alone or beside others gives the same tokens."""
    lm = random_lm('dense')
    together = run(
        lm, prompts_batch(TEXT_PROMPTS), max_new_tokens=NEW, sampling=SAMPLED, row_ids=[10, 11, 12]
    )
    for row, prompt in enumerate(TEXT_PROMPTS):
        alone = run(
            lm, prompts_batch([prompt]), max_new_tokens=NEW, sampling=SAMPLED, row_ids=[10 + row]
        )
        np.testing.assert_array_equal(alone[0], together[row])
    shifted = run(
        lm, prompts_batch(TEXT_PROMPTS), max_new_tokens=NEW, sampling=SAMPLED, row_ids=[11, 12, 13]
    )
    assert (shifted != together).any()


def test_suppressed_ids_are_never_generated_and_first_logits_are_returned():
    lm = random_lm('dense')
    batch = prompts_batch(TEXT_PROMPTS)
    greedy, logits = run(lm, batch, max_new_tokens=NEW, with_first_logits=True)
    # The first logits are the model's own next-token logits at each prompt's end.
    full_btv = np.asarray(lm_logits_fn(lm)(jnp.asarray(batch['tokens']), None))
    ends = batch['prompt_len'] - 1
    np.testing.assert_allclose(logits, full_btv[np.arange(3), ends], atol=1e-5)
    banned = sorted({int(t) for t in greedy.ravel()})
    suppressed = run(lm, batch, max_new_tokens=NEW, suppress_ids=banned)
    assert not np.isin(suppressed, banned).any()
    allowed = np.where(np.isin(np.arange(VOCAB), banned), -np.inf, logits)
    np.testing.assert_array_equal(suppressed[:, 0], allowed.argmax(-1))


def test_prompt_lengths_within_a_bucket_compile_once():
    lm = random_lm('dense')
    graphdef, state = nnx.split(lm)

    def compiles(prompts, sampling=generate.SamplingConfig()):
        before = generate._generate_bucketed._cache_size()
        generate.generate(
            graphdef, state, prompts_batch(prompts), max_new_tokens=3, pad_id=PAD, sampling=sampling
        )
        return generate._generate_bucketed._cache_size() - before

    assert generate.length_bucket(5) == generate.length_bucket(12) == 16
    assert generate.batch_bucket(3) == generate.batch_bucket(4) == 4
    assert compiles([[1, 2, 3, 4, 5], [1, 2], [1]]) == 1
    # Other lengths and batch sizes in the same buckets (16 positions, 4 rows): no new compile.
    assert compiles([[1] * 12, [1, 2, 3], [4] * 7, [5] * 9]) == 0
    assert compiles([[1] * 16, [2] * 4, [3]]) == 0
    # A longer prompt moves to the next bucket (32 positions): one new compile.
    assert compiles([[1] * 17, [2]]) == 1
    # Sampling compiles once; other temperatures, top-p values and seeds reuse it.
    assert compiles([[1, 2]], generate.SamplingConfig(temperature=0.7, top_p=0.5, seed=1)) == 1
    assert compiles([[1, 2]], generate.SamplingConfig(temperature=1.3, top_p=0.9, seed=2)) == 0


def test_buckets():
    assert [generate.batch_bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert [generate.length_bucket(n) for n in (1, 16, 17, 100, 256, 257, 600)] == [
        16,
        16,
        32,
        128,
        256,
        512,
        768,
    ]


@pytest.mark.parametrize(
    'prompts, prompt_len, max_new_tokens, match',
    [
        ([[1, 2], [3]], [2, 0], 2, 'prompt_len'),
        ([[1, 2], [3]], [2, 3], 2, 'prompt_len'),
        ([[1, 2], [3]], [2, 1, 1], 2, 'prompt_len'),
        ([[1, 2]], [2], 0, 'max_new_tokens'),
    ],
)
def test_bad_batches_raise(prompts, prompt_len, max_new_tokens, match):
    lm = random_lm('dense')
    batch = dict(prompts_batch(prompts), prompt_len=np.asarray(prompt_len))
    with pytest.raises(ValueError, match=match):
        run(lm, batch, max_new_tokens=max_new_tokens)


@pytest.mark.parametrize(
    'kwargs, match', [(dict(temperature=-1.0), 'temperature'), (dict(top_p=0.0), 'top_p')]
)
def test_bad_sampling_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate.SamplingConfig(**kwargs)
