import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimoe.eval.generate import greedy_generate

VOCAB = 13
EOS, PAD = 12, 0
JUNK = 9  # fills the buffer after each prompt; a causal model never reads it


def _one_hot_logits(next_token_bt):
    return jax.nn.one_hot(next_token_bt, VOCAB) * 5.0 - 1.0


def _increment(tokens_bt):
    return _one_hot_logits((tokens_bt + 1) % VOCAB)


def _prefix_sum(tokens_bt):
    """Next token = sum of all tokens so far mod V: depends on every earlier token."""
    return _one_hot_logits(jnp.cumsum(tokens_bt, axis=1) % VOCAB)


def _eos_at_position_5(tokens_bt):
    position_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
    return _one_hot_logits(jnp.where(position_bt == 5, EOS, position_bt + 1))


def _buffer(prompts, seq_len):
    tokens_bt = np.full((len(prompts), seq_len), JUNK, np.int32)
    for b, prompt in enumerate(prompts):
        tokens_bt[b, : len(prompt)] = prompt
    return jnp.asarray(tokens_bt), jnp.asarray([len(p) for p in prompts], jnp.int32)


def test_increment_with_ragged_prompts_and_eos():
    tokens_bt, prompt_len_b = _buffer([[3, 5], [1, 2, 3, 4], [10]], seq_len=8)
    out = greedy_generate(
        _increment, tokens_bt, prompt_len_b, max_new_tokens=4, eos_id=EOS, pad_id=PAD
    )
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(out, [[6, 7, 8, 9], [5, 6, 7, 8], [11, 12, 0, 0]])


def test_generated_tokens_are_fed_back_under_jit():
    tokens_bt, prompt_len_b = _buffer([[2, 3], [4]], seq_len=7)
    generate = jax.jit(
        lambda t, p: greedy_generate(_prefix_sum, t, p, max_new_tokens=4, eos_id=EOS, pad_id=PAD)
    )
    # Row 0: 2+3=5, 10, 20%13=7, 27%13=1.  Row 1: 4, 8, 16%13=3, 19%13=6.
    np.testing.assert_array_equal(generate(tokens_bt, prompt_len_b), [[5, 10, 7, 1], [4, 8, 3, 6]])


def test_rows_stop_at_eos_at_different_steps():
    tokens_bt, prompt_len_b = _buffer([[1] * 3, [1] * 6, [1] * 5], seq_len=11)
    out = greedy_generate(
        _eos_at_position_5, tokens_bt, prompt_len_b, max_new_tokens=5, eos_id=EOS, pad_id=PAD
    )
    # Row b reads positions len_b - 1, len_b, ...; position 5 predicts eos, any other t predicts
    # t + 1 (so the pads below are not what the model predicts). All rows finish before step 5.
    np.testing.assert_array_equal(
        out, [[3, 4, 5, EOS, PAD], [EOS, PAD, PAD, PAD, PAD], [5, EOS, PAD, PAD, PAD]]
    )


@pytest.mark.parametrize(
    'prompts, seq_len, max_new_tokens, match',
    [
        ([[1, 2, 3], [1]], 5, 3, 'max_new_tokens'),
        ([[1, 2], []], 6, 2, 'prompt_len'),
        ([[1, 2]], 6, 0, 'max_new_tokens'),
    ],
)
def test_bad_lengths_raise(prompts, seq_len, max_new_tokens, match):
    tokens_bt, prompt_len_b = _buffer(prompts, seq_len)
    with pytest.raises(ValueError, match=match):
        greedy_generate(
            _increment,
            tokens_bt,
            prompt_len_b,
            max_new_tokens=max_new_tokens,
            eos_id=EOS,
            pad_id=PAD,
        )


def test_prompt_len_shape_mismatch_raises():
    with pytest.raises(ValueError, match='prompt_len_b'):
        greedy_generate(
            _increment,
            jnp.zeros((2, 5), jnp.int32),
            jnp.ones((3,), jnp.int32),
            max_new_tokens=1,
            eos_id=EOS,
            pad_id=PAD,
        )
