"""Beam search against Hugging Face `generate(num_beams=K)` at the same weights; beam sampling."""

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tests.convert import hf_models
from tests.eval.test_generate import PAD, TEXT_PROMPTS, media_batch, prompts_batch, random_lm
from tests.eval.test_generate import random_unimoe
from unimoe.convert import core
from unimoe.eval import beam, generate
from unimoe.models.llm import DecoderLM

NEW = 8  # as tests/eval/test_generate.py: the greedy runs reuse its compiled functions
HF_NEW = 12
# Prompts of different lengths, generated together on our side and one by one on Hugging Face's.
HF_PROMPTS = [[1, 7, 8, 9], [1, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29], [1, 30], [5, 6, 7, 8, 9]]


def hf_pair(name: str, folder: pathlib.Path) -> tuple[transformers.PreTrainedModel, DecoderLM]:
    """A tiny random HF model and the same weights in unimoe, through the conversion map."""
    hf_models.save(name, folder, seed=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    conv = core.read_hf(folder)
    lm = nnx.eval_shape(lambda: DecoderLM(conv.configs['llm'], rngs=nnx.Rngs(0)))
    core.load_into({'llm': lm}, conv.params)
    return hf, lm


@pytest.fixture(scope='module')
def hf_pairs(tmp_path_factory):
    """name -> (HF model, unimoe LM), each built once for the module."""
    pairs = {}

    def get(name: str):
        if name not in pairs:
            pairs[name] = hf_pair(name, tmp_path_factory.mktemp(name))
        return pairs[name]

    return get


def hf_generate(hf, prompt, **kwargs) -> np.ndarray:
    """The new tokens of HF `generate` (do_sample=False), padded to HF_NEW."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=HF_NEW,
            pad_token_id=PAD,
            **kwargs,
        )[0, len(prompt) :].numpy()
    return np.pad(out, (0, HF_NEW - len(out)), constant_values=PAD)


def run_beams(model: nnx.Module, batch, max_new_tokens: int = NEW, **kwargs) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return beam.beam_generate(
        graphdef, state, batch, pad_id=PAD, max_new_tokens=max_new_tokens, **kwargs
    )


@pytest.mark.parametrize('num_beams', [3, 5])
def test_beam_search_equals_hugging_face(num_beams, hf_pairs):
    """Our batch against HF one prompt at a time, on a tiny random Mixtral (MoE in every layer)."""
    hf, lm = hf_pairs('mixtral')
    batch = prompts_batch(HF_PROMPTS)
    # The stop id: the token the model emits most often greedily, so hypotheses do finish.
    free = np.concatenate([hf_generate(hf, p, eos_token_id=None) for p in HF_PROMPTS])
    eos = int(np.bincount(free).argmax())
    ended = []
    compiled = beam._beam_bucketed._cache_size()
    for length_penalty, min_new_tokens in [(1.0, 0), (0.5, 3), (-1.0, 2)]:
        ours = run_beams(
            lm,
            batch,
            max_new_tokens=HF_NEW,
            num_beams=num_beams,
            stop_ids=[eos],
            length_penalty=length_penalty,
            min_new_tokens=min_new_tokens,
        )
        for row, prompt in enumerate(HF_PROMPTS):
            theirs = hf_generate(
                hf,
                prompt,
                eos_token_id=eos,
                num_beams=num_beams,
                length_penalty=length_penalty,
                min_new_tokens=min_new_tokens,
            )
            np.testing.assert_array_equal(ours[row], theirs, err_msg=f'{length_penalty=} {row=}')
            ends = np.flatnonzero(theirs == eos)
            assert not len(ends) or ends[0] >= min_new_tokens
            ended.append(len(ends) > 0)
    # Both kinds of answer occur: stopped early (finished hypotheses) and cut at max_new_tokens.
    assert any(ended) and not all(ended)
    # length_penalty and min_new_tokens are traced: one compilation served all three.
    assert beam._beam_bucketed._cache_size() == compiled + 1


@functools.cache
def text_stops() -> tuple[int, int]:
    """Two stop ids the dense test LM emits greedily: the 3rd token of row 0, the 5th of row 1."""
    batch = prompts_batch(TEXT_PROMPTS)
    free = generate.generate(*nnx.split(random_lm('dense')), batch, max_new_tokens=NEW, pad_id=PAD)
    return int(free[0, 2]), int(free[1, 4])


def test_one_beam_is_greedy_generation():
    lm = random_lm('dense')
    batch = prompts_batch(TEXT_PROMPTS)
    stops = text_stops()
    graphdef, state = nnx.split(lm)
    greedy = generate.generate(
        graphdef, state, batch, max_new_tokens=NEW, pad_id=PAD, stop_ids=stops
    )
    np.testing.assert_array_equal(run_beams(lm, batch, num_beams=1, stop_ids=stops), greedy)
    assert (greedy == PAD).any()


SAMPLED = generate.SamplingConfig(temperature=1.0, top_k=20, seed=3)


def test_beam_sampling_is_reproducible_and_follows_the_seed_and_row_ids():
    lm = random_lm('dense')
    batch = prompts_batch(TEXT_PROMPTS)
    sample = functools.partial(run_beams, lm, num_beams=3, sampling=SAMPLED, row_ids=[10, 11, 12])
    first = sample(batch)
    np.testing.assert_array_equal(sample(batch), first)
    assert (sample(batch, sampling=dataclasses.replace(SAMPLED, seed=4)) != first).any()
    # A prompt alone, with its row id, samples what it samples in the batch.
    for row, prompt in enumerate(TEXT_PROMPTS):
        alone = sample(prompts_batch([prompt]), row_ids=[10 + row])
        np.testing.assert_array_equal(alone[0], first[row])
    assert (sample(batch, row_ids=[11, 12, 13]) != first).any()


def test_beam_sampling_near_zero_temperature_is_beam_search():
    lm = random_lm('dense')
    batch = prompts_batch(TEXT_PROMPTS)
    cold = generate.SamplingConfig(temperature=0.01, seed=5)
    stops = text_stops()
    kwargs = dict(num_beams=3, stop_ids=stops, length_penalty=0.7, min_new_tokens=3)
    searched = run_beams(lm, batch, **kwargs)
    np.testing.assert_array_equal(run_beams(lm, batch, sampling=cold, **kwargs), searched)
    assert np.isin(searched[:, 3], stops).all()  # each answer ends as soon as it may


def test_candidates_are_drawn_without_replacement_from_the_softmax():
    """torch.multinomial(softmax(scores), 2) keeps item i with probability
    p_i + sum_j p_j p_i / (1 - p_j): the Gumbel top-2 must match it."""
    scores_m = jnp.log(jnp.array([0.5, 0.25, 0.15, 0.1]))
    draws = 20000
    _, index_dc = beam._candidates(
        jnp.broadcast_to(scores_m, (draws, 4)),
        jax.random.key(0),
        jnp.arange(draws),
        count=2,
        greedy=False,
    )
    p = np.exp(np.asarray(scores_m))
    second = p[None, :] * (p[:, None] / (1 - p[:, None]))
    np.fill_diagonal(second, 0.0)
    expected = p + second.sum(axis=0)
    freq = np.bincount(np.asarray(index_dc).ravel(), minlength=4) / draws
    np.testing.assert_allclose(freq, expected, atol=0.015)
    assert (np.diff(np.asarray(index_dc), axis=1) != 0).all()  # two different items per draw


def test_media_reach_the_beams_of_a_unimoe():
    model = random_unimoe(moe=True, lora_rank=2)
    batch = media_batch(model, np.random.default_rng(0))
    beams = run_beams(model, batch, num_beams=3)
    other = dict(batch, image=batch['image'] + 1.0, audio_mel=batch['audio_mel'] - 1.0)
    assert (run_beams(model, other, num_beams=3) != beams).any()


def test_bad_beam_arguments_raise():
    lm = random_lm('dense')
    batch = prompts_batch(TEXT_PROMPTS)
    with pytest.raises(ValueError, match='num_beams'):
        run_beams(lm, batch, num_beams=0)
    with pytest.raises(ValueError, match='min_new_tokens'):
        run_beams(lm, batch, num_beams=2, min_new_tokens=-1)
