import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.tiny_model import random_module
from unimoe.models import kv_cache
from unimoe.models.llm import DecoderLM, LLMConfig

VOCAB = 37
BASE = dict(vocab_size=VOCAB, dim=24, num_layers=2, num_heads=3, num_kv_heads=1, ffn_dim=20)
CONFIGS = {
    'dense': BASE,
    'moe_lora_qkv_bias_tied': dict(
        BASE,
        moe_layers='every_2',
        moe=dict(num_experts=3, top_k=2),
        lora=dict(rank=2),
        qkv_bias=True,
        tie_embeddings=True,
    ),
    'llama3_rope_gqa': dict(
        BASE,
        num_heads=4,
        num_kv_heads=2,
        rope_scaling=dict(rope_type='llama3', factor=8.0, original_max_positions=8),
    ),
}

# Jitted once per shape: eager NNX ops make these tests 10x slower.
prefill = nnx.jit(kv_cache.prefill, static_argnames='max_len')
decode_step = nnx.jit(kv_cache.decode_step)


@nnx.jit
def forward(lm: DecoderLM, tokens_bt: jax.Array) -> jax.Array:
    return lm(lm.embed_tokens(tokens_bt), jnp.ones(tokens_bt.shape, bool))[0]


@nnx.jit
def embed(lm: DecoderLM, tokens: jax.Array) -> jax.Array:
    return lm.embed_tokens(tokens)


def random_lm(cfg: LLMConfig) -> DecoderLM:
    return random_module(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_prefill_then_decode_steps_equal_the_full_forward(name):
    lm = random_lm(LLMConfig(**CONFIGS[name]))
    tokens_bt = jax.random.randint(jax.random.key(2), (3, 14), 0, VOCAB)
    full_btv = forward(lm, tokens_bt)
    # Rows of different prompt lengths in one right-padded buffer of 9 positions.
    prompt_len_b = jnp.array([4, 9, 6])
    rows_b = jnp.arange(3)
    logits_bv, cache = prefill(lm, embed(lm, tokens_bt[:, :9]), prompt_len_b, max_len=14)
    np.testing.assert_allclose(logits_bv, full_btv[rows_b, prompt_len_b - 1], atol=2e-5)
    for n in range(4):
        position_b = prompt_len_b + n
        logits_bv, cache = decode_step(lm, embed(lm, tokens_bt[rows_b, position_b]), cache)
        np.testing.assert_array_equal(cache.length_b, position_b + 1)
        np.testing.assert_allclose(logits_bv, full_btv[rows_b, position_b], atol=2e-5)
    assert np.abs(np.asarray(full_btv)).max() > 1.0  # the weights give informative logits


def test_decode_overwrites_prompt_padding_in_the_cache():
    lm = random_lm(LLMConfig(**BASE))
    tokens_bt = jax.random.randint(jax.random.key(3), (2, 8), 0, VOCAB)
    prompt_len_b = jnp.array([3, 8])
    garbage_bt = tokens_bt.at[0, 3:].set(VOCAB - 1)  # row 0's padding differs from its next tokens
    _, cache = prefill(lm, embed(lm, garbage_bt), prompt_len_b, max_len=10)
    logits_bv, _ = decode_step(lm, embed(lm, tokens_bt[:, 0] * 0 + 5), cache)
    clean_bt = tokens_bt.at[0, 3].set(5)
    full_btv = forward(lm, clean_bt[:1, :4])
    np.testing.assert_allclose(logits_bv[0], full_btv[0, 3], atol=2e-5)


def test_prefill_rejects_a_cache_shorter_than_the_prompt():
    lm = random_lm(LLMConfig(**BASE))
    with pytest.raises(ValueError, match='max_len'):
        kv_cache.prefill(lm, jnp.zeros((1, 6, 24)), jnp.array([6]), max_len=5)
