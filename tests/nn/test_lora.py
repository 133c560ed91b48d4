"""LoRA Linear numerics (peft conventions) and merging adapters into base weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimoe.models.llm import DecoderLM, LLMConfig
from unimoe.nn.lora import Linear, LoRAConfig, matmul, merge_lora
from unimoe.moe.experts import ExpertBank


def test_config_scale_and_validation():
    assert LoRAConfig(rank=8, alpha=16.0).scale == 2.0
    assert not LoRAConfig().enabled
    with pytest.raises(ValueError, match="LoRAConfig.rank"):
        LoRAConfig(rank=-1)
    with pytest.raises(ValueError, match="LoRAConfig.dropout"):
        LoRAConfig(rank=2, dropout=1.0)


def test_linear_adds_scaled_low_rank_update():
    layer = Linear(3, 2, lora=LoRAConfig(rank=1, alpha=2.0), use_bias=True, rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    layer.bias[...] = jnp.array([0.5, -0.5])
    layer.lora_a[...] = jnp.array([[1.0], [0.0], [2.0]])
    layer.lora_b[...] = jnp.array([[1.0, -1.0]])
    # x @ kernel = [4, 5]; + bias = [4.5, 4.5]; x @ a = 7; 7 * b * (alpha / rank = 2) = [14, -14].
    y = layer(jnp.array([[1.0, 2.0, 3.0]]))
    np.testing.assert_allclose(y, [[18.5, -9.5]])


def test_matmul_gradients_are_those_of_the_plain_product():
    # Its VJP computes d_w from a materialised x.T (a CPU speed-up); d_x and d_w must be exactly
    # the gradients of x @ w, hand-checked on 2 x 3 @ 3 x 2: d_x = g w^T, d_w = x^T g.
    x = jnp.array([[1.0, 2.0, 3.0], [0.0, -1.0, 2.0]])
    w = jnp.array([[1.0, 0.5], [-1.0, 2.0], [0.0, 1.0]])
    g = jnp.array([[1.0, 0.0], [2.0, -1.0]])
    y, vjp = jax.vjp(matmul, x, w)
    np.testing.assert_array_equal(y, [[-1.0, 7.5], [1.0, 0.0]])
    d_x, d_w = vjp(g)
    np.testing.assert_array_equal(d_x, [[1.0, -1.0, 0.0], [1.5, -4.0, -1.0]])
    np.testing.assert_array_equal(d_w, [[1.0, 0.0], [0.0, 1.0], [7.0, -2.0]])
    # The same inside jit, at a size where the barrier's copy is a real transpose.
    rng = np.random.default_rng(0)
    x, w, g = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((64, 48), (48, 40), (64, 40)))
    got = jax.jit(lambda x, w: jax.vjp(matmul, x, w)[1](g))(x, w)
    np.testing.assert_allclose(got[0], g @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], x.T @ g, rtol=1e-5, atol=1e-5)


def test_fresh_adapters_follow_peft_init():
    layer = Linear(16, 5, lora=LoRAConfig(rank=3), rngs=nnx.Rngs(0))
    assert not np.any(layer.lora_b[...])
    lora_a = np.asarray(layer.lora_a[...])
    # kaiming_uniform(a=sqrt(5)) on fan_in 16: U(-1/4, 1/4).
    assert np.all(np.abs(lora_a) <= 0.25) and np.std(lora_a) > 0.05
    bank = ExpertBank(2, 6, 10, lora=LoRAConfig(rank=3), rngs=nnx.Rngs(0))
    for b in (bank.lora_gate_b_erf, bank.lora_up_b_erf, bank.lora_down_b_erd):
        assert not np.any(b[...])
    assert np.all(np.abs(bank.lora_down_a_efr[...]) <= 1 / np.sqrt(10))
    assert isinstance(layer.lora_a, nnx.LoRAParam) and isinstance(bank.lora_up_a_edr, nnx.LoRAParam)


def test_dropout_applies_to_the_adapter_input_only():
    layer = Linear(4, 4, lora=LoRAConfig(rank=4, alpha=4.0, dropout=0.5), rngs=nnx.Rngs(0))
    layer.kernel[...] = 2.0 * jnp.eye(4)
    layer.lora_a[...] = jnp.eye(4)
    layer.lora_b[...] = jnp.eye(4)
    x = jnp.arange(1.0, 65.0).reshape(16, 4)
    # Training: base 2x plus dropout(x), each element either dropped (2x) or kept / 0.5 (4x).
    ratio = np.asarray(layer(x) / x)
    assert set(np.unique(ratio)) == {2.0, 4.0}
    layer.eval()
    np.testing.assert_allclose(layer(x), 3.0 * x)


def random_lm(lora: LoRAConfig) -> DecoderLM:
    cfg = LLMConfig(
        vocab_size=37,
        dim=24,
        num_layers=2,
        num_heads=3,
        num_kv_heads=1,
        ffn_dim=40,
        moe_layers=(1,),
        moe={"num_experts": 3, "top_k": 2},
        lora=lora,
    )
    model = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            var.set_value(jnp.asarray(0.3 * rng.normal(size=var.get_value().shape), jnp.float32))
    return model


@nnx.jit
def logits_of(model: DecoderLM, tokens_bt: jax.Array) -> jax.Array:
    return model(model.embed_tokens(tokens_bt), jnp.ones(tokens_bt.shape, bool))[0]


def test_merge_lora_keeps_the_function_and_zeroes_the_adapters():
    model = random_lm(LoRAConfig(rank=2, alpha=3.0))
    tokens_bt = jnp.asarray(np.random.default_rng(1).integers(0, 37, (2, 7)), jnp.int32)
    before = logits_of(model, tokens_bt)
    q_kernel_before = np.asarray(model.layers[0].attn.q.kernel[...])
    merge_lora(model)
    np.testing.assert_allclose(logits_of(model, tokens_bt), before, rtol=1e-4, atol=1e-5)
    lora_b_values = [
        var[...]
        for path, var in nnx.iter_graph(model)
        if isinstance(var, nnx.LoRAParam) and ("lora_b" in path[-1] or "_b_" in path[-1])
    ]
    assert len(lora_b_values) == 2 * 4 + 3  # q, k, v, o per layer + the bank's gate, up, down.
    assert all(not np.any(b) for b in lora_b_values)
    assert not np.allclose(model.layers[0].attn.q.kernel[...], q_kernel_before)
