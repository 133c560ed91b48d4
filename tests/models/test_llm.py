"""Decoder LM: parity with Hugging Face LlamaForCausalLM, padding, MoE layers, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimoe.models import llm
from unimoe.models.llm import DecoderLM, LLMConfig, resolve_moe_layers

VOCAB, DIM, HEADS, FFN, T, B = 37, 24, 3, 40, 7, 3


def tiny_config(**overrides) -> LLMConfig:
    kwargs = dict(
        vocab_size=VOCAB, dim=DIM, num_layers=3, num_heads=HEADS, num_kv_heads=1, ffn_dim=FFN
    )
    return LLMConfig(**{**kwargs, **overrides})


@nnx.jit
def forward(model: DecoderLM, tokens_bt: jax.Array, attn_mask_bt: jax.Array):
    return model(model.embed_tokens(tokens_bt), attn_mask_bt)


RNG = np.random.default_rng(0)
TOKENS_BT = RNG.integers(1, VOCAB, (B, T)).astype(np.int32)
# Right padding: rows of 7, 5 and 2 real tokens.
MASK_BT = np.arange(T)[None, :] < np.array([[7], [5], [2]])


@pytest.mark.parametrize("num_kv_heads, tie", [(1, False), (3, True)])
def test_logits_match_hugging_face_llama(num_kv_heads, tie):
    # Test-only dependencies (the `test` extra): a missing one must fail, not skip, the parity check.
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=DIM,
        intermediate_size=FFN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=num_kv_heads,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            # Norm scales near 1, everything else large enough that a wrong term shows.
            noise = torch.randn_like(param)
            param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.3 * noise)
        hf_logits = hf_model(
            input_ids=torch.from_numpy(TOKENS_BT).long(),
            attention_mask=torch.from_numpy(MASK_BT).long(),
        ).logits.numpy()

    cfg = tiny_config(num_layers=2, num_kv_heads=num_kv_heads, rope_theta=500.0, tie_embeddings=tie)
    model = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    hf = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    model.embed.embedding.set_value(jnp.asarray(hf["model.embed_tokens.weight"]))
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        for ours, theirs in (
            (layer.attn.q, "self_attn.q_proj"),
            (layer.attn.k, "self_attn.k_proj"),
            (layer.attn.v, "self_attn.v_proj"),
            (layer.attn.o, "self_attn.o_proj"),
            (layer.ffn.gate, "mlp.gate_proj"),
            (layer.ffn.up, "mlp.up_proj"),
            (layer.ffn.down, "mlp.down_proj"),
        ):
            ours.kernel.set_value(jnp.asarray(hf[prefix + theirs + ".weight"].T))
        layer.attn_norm.scale.set_value(jnp.asarray(hf[prefix + "input_layernorm.weight"]))
        layer.ffn_norm.scale.set_value(jnp.asarray(hf[prefix + "post_attention_layernorm.weight"]))
    model.final_norm.scale.set_value(jnp.asarray(hf["model.norm.weight"]))
    if not tie:
        model.lm_head.kernel.set_value(jnp.asarray(hf["lm_head.weight"].T))

    logits, aux = forward(model, TOKENS_BT, MASK_BT)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, hf_logits, atol=1e-4, rtol=1e-4)
    assert aux.expert_load.shape == (0, 4) and aux.balance_loss == 0.0


def moe_config(**overrides) -> LLMConfig:
    return tiny_config(moe_layers=(0, 2), moe={"num_experts": 5, "top_k": 2}, **overrides)


@pytest.fixture(scope="module")
def moe_lm() -> DecoderLM:
    """Built once with the real initializers; tests must not modify it."""
    return DecoderLM(moe_config(), rngs=nnx.Rngs(0))


def test_moe_layers_build_run_and_report_routing_statistics(moe_lm):
    assert [layer.is_moe for layer in moe_lm.layers] == [True, False, True]
    logits, aux = forward(moe_lm, TOKENS_BT, MASK_BT)
    assert logits.shape == (B, T, VOCAB)
    assert aux.expert_load.shape == (2, 5)
    np.testing.assert_allclose(aux.expert_load.sum(-1), [1.0, 1.0], rtol=1e-6)
    # Two MoE layers, each at least 1 (reached only by perfectly balanced routing).
    assert np.isfinite(aux.balance_loss) and aux.balance_loss >= 2.0 - 1e-5
    assert np.isfinite(aux.z_loss) and aux.z_loss > 0.0


def test_appended_padding_changes_no_real_logit_and_no_routing_statistic(moe_lm):
    logits, aux = forward(moe_lm, TOKENS_BT, MASK_BT)
    pad = 4
    pad_tokens = RNG.integers(1, VOCAB, (B, pad))
    tokens_padded = np.concatenate([TOKENS_BT, pad_tokens], 1).astype(np.int32)
    mask_padded = np.concatenate([MASK_BT, np.zeros((B, pad), bool)], 1)
    logits_padded, aux_padded = forward(moe_lm, tokens_padded, mask_padded)
    np.testing.assert_allclose(
        np.asarray(logits_padded)[mask_padded], np.asarray(logits)[MASK_BT], rtol=1e-5, atol=1e-6
    )
    for name in ("balance_loss", "z_loss", "expert_load"):
        np.testing.assert_allclose(
            getattr(aux_padded, name), getattr(aux, name), rtol=1e-5, err_msg=name
        )


def test_gradients_reach_routers_and_every_lora_parameter():
    cfg = tiny_config(num_layers=2, moe_layers=(1,), moe={"num_experts": 3}, lora={"rank": 2})
    model = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    # Every weight random, LoRA B included: with peft's B = 0 the gradient of A is exactly zero.
    rng = np.random.default_rng(1)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            var.set_value(jnp.asarray(0.1 * rng.normal(size=var.get_value().shape), jnp.float32))
    targets_bt = RNG.integers(0, VOCAB, (B, T))

    def loss_fn(model):
        logits, aux = model(model.embed_tokens(TOKENS_BT), MASK_BT)
        log_probs = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(log_probs, targets_bt[..., None], -1)[..., 0]
        return jnp.sum(nll * MASK_BT) / MASK_BT.sum() + 0.01 * aux.balance_loss

    grads = nnx.jit(nnx.grad(loss_fn))(model)
    flat = nnx.to_flat_state(grads)
    router_grads = [v[...] for p, v in flat if "router" in p]
    lora_grads = {p: v[...] for p, v in flat if isinstance(v, nnx.LoRAParam)}
    assert len(router_grads) == 1
    assert len(lora_grads) == 2 * 4 * 2 + 6  # q, k, v, o (A and B) per layer; 6 in the bank.
    for grad in [*router_grads, *lora_grads.values()]:
        assert np.all(np.isfinite(grad)) and np.any(grad != 0.0)


def test_bfloat16_compute_tracks_float32(moe_lm):
    logits_f32, _ = forward(moe_lm, TOKENS_BT, MASK_BT)
    bf16_cfg = moe_config(dtype="bfloat16")
    bf16_graph = nnx.graphdef(nnx.eval_shape(lambda: DecoderLM(bf16_cfg, rngs=nnx.Rngs(0))))
    model_bf16 = nnx.merge(bf16_graph, nnx.state(moe_lm))
    logits_bf16, aux = forward(model_bf16, TOKENS_BT, MASK_BT)
    assert logits_bf16.dtype == jnp.float32 and aux.balance_loss.dtype == jnp.float32
    scale = np.abs(logits_f32).max()
    np.testing.assert_allclose(logits_bf16, logits_f32, atol=0.05 * scale)


def test_resolve_moe_layers():
    assert resolve_moe_layers("none", 5) == ()
    assert resolve_moe_layers("all", 3) == (0, 1, 2)
    assert resolve_moe_layers("every_2", 5) == (0, 2, 4)
    assert resolve_moe_layers("every_3", 7) == (0, 3, 6)
    assert resolve_moe_layers([3, 1], 4) == (1, 3)
    for bad in ("every_0", "odd", "every_x"):
        with pytest.raises(ValueError, match="moe_layers"):
            resolve_moe_layers(bad, 4)
    with pytest.raises(ValueError, match="out of range"):
        resolve_moe_layers((0, 4), 4)


def test_config_from_plain_kwargs_and_validation():
    cfg = LLMConfig(
        **{
            "vocab_size": VOCAB,
            "dim": DIM,
            "num_layers": 4,
            "num_heads": 3,
            "num_kv_heads": 1,
            "ffn_dim": FFN,
            "moe_layers": "every_2",
            "moe": {"num_experts": 4},
            "lora": {"rank": 8},
        }
    )
    assert cfg.moe_layers == (0, 2) and cfg.moe.num_experts == 4 and cfg.lora.rank == 8
    assert cfg.resolved_head_dim == 8
    with pytest.raises(ValueError, match="num_kv_heads"):
        tiny_config(num_kv_heads=2)
    with pytest.raises(ValueError, match="moe_layers"):
        tiny_config(moe_layers=(3,))
    with pytest.raises(ValueError, match="head_dim"):
        tiny_config(dim=25)
    with pytest.raises(ValueError, match="MoEConfig.top_k"):
        tiny_config(moe={"num_experts": 2, "top_k": 3})
    with pytest.raises(ValueError, match="dtype"):
        tiny_config(dtype="float64")


def test_blocked_causal_attention_equals_full_masked_softmax():
    # 300 query rows = blocks of 128, 128 and 44; GQA (2 kv heads x 3); row 1 right-padded.
    rng = np.random.default_rng(0)
    q_btgrd = rng.normal(size=(2, 300, 2, 3, 8)).astype(np.float32)
    k_bsgd, v_bsgd = (rng.normal(size=(2, 300, 2, 8)).astype(np.float32) for _ in range(2))
    key_mask_bs = np.ones((2, 300), np.int32)
    key_mask_bs[1, 170:] = 0
    got = llm.causal_attention(*map(jnp.asarray, (q_btgrd, k_bsgd, v_bsgd, key_mask_bs)))

    scores = np.einsum("btgrd,bsgd->bgrts", q_btgrd, k_bsgd) / np.sqrt(8)
    allowed = np.tril(np.ones((300, 300), bool))[None] & key_mask_bs.astype(bool)[:, None, :]
    scores = np.where(allowed[:, None, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.einsum("bgrts,bsgd->btgrd", probs, v_bsgd)
    assert llm.CAUSAL_BLOCK < 300
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_attention_gradients_match_autodiff_of_the_masked_softmax():
    # Blocks of 128, 128 and 44 rows; GQA (2 kv heads x 3); row 1 padded from 170, row 2 all
    # padding, whose softmax is uniform over finfo.min scores: q and k must get no gradient there.
    rng = np.random.default_rng(1)
    batch, seq = 3, 300
    q_btgrd = jnp.asarray(rng.normal(size=(batch, seq, 2, 3, 8)), jnp.float32)
    k_bsgd, v_bsgd, d_out = (
        jnp.asarray(rng.normal(size=shape), jnp.float32)
        for shape in ((batch, seq, 2, 8), (batch, seq, 2, 8), (batch, seq, 2, 3, 8))
    )
    key_mask_bs = np.ones((batch, seq), np.int32)
    key_mask_bs[1, 170:] = 0
    key_mask_bs[2] = 0

    def reference(q_btgrd, k_bsgd, v_bsgd):
        scores = jnp.einsum("btgrd,bsgd->bgrts", q_btgrd, k_bsgd) / np.sqrt(8)
        allowed = np.tril(np.ones((seq, seq), bool))[None] & key_mask_bs.astype(bool)[:, None]
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        return jnp.einsum("bgrts,bsgd->btgrd", jax.nn.softmax(scores, axis=-1), v_bsgd)

    def blocked(q_btgrd, k_bsgd, v_bsgd):
        return llm.causal_attention(q_btgrd, k_bsgd, v_bsgd, jnp.asarray(key_mask_bs))

    grads = {
        name: jax.jit(jax.grad(lambda *qkv, f=f: jnp.sum(f(*qkv) * d_out), argnums=(0, 1, 2)))(
            q_btgrd, k_bsgd, v_bsgd
        )
        for name, f in (("reference", reference), ("blocked", blocked))
    }
    # Row 2's outputs differ by design: a block spreads its uniform weights over its own keys.
    for want, got in zip(grads["reference"], grads["blocked"], strict=True):
        np.testing.assert_allclose(got[:2], want[:2], rtol=1e-4, atol=1e-5)
    d_q, d_k, _ = grads["blocked"]
    assert np.all(np.asarray(d_q[2]) == 0.0) and np.all(np.asarray(d_k[2]) == 0.0)


def test_lora_on_dense_ffns_only_when_asked_and_merged_exactly():
    """`lora.dense_ffn` (Uni-MoE-audio, interleaved layouts): the layers that stay dense get
    adapters on gate / up / down too; merged into the kernels they compute the same function."""
    from unimoe.nn.lora import merge_lora

    kwargs = dict(
        vocab_size=11, dim=8, num_layers=2, num_heads=2, num_kv_heads=1, ffn_dim=12,
        moe_layers=(0,), moe=dict(num_experts=2, top_k=1),
    )  # fmt: skip
    plain = DecoderLM(LLMConfig(**kwargs, lora=dict(rank=2)), rngs=nnx.Rngs(0))
    assert plain.layers[1].ffn.gate.lora_a is None
    model = DecoderLM(LLMConfig(**kwargs, lora=dict(rank=2, dense_ffn=True)), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for path, adapter in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        adapter.set_value(jnp.asarray(rng.normal(size=adapter.get_value().shape), jnp.float32))
    assert model.layers[1].ffn.down.lora_b is not None
    tokens_bt = jnp.asarray(rng.integers(0, 11, (2, 5)))
    mask_bt = jnp.ones((2, 5), bool)
    before = model(model.embed_tokens(tokens_bt), mask_bt)[0]
    dense_down = np.asarray(model.layers[1].ffn.down.kernel[...])
    merge_lora(model)
    assert np.abs(np.asarray(model.layers[1].ffn.down.kernel[...]) - dense_down).max() > 1e-2
    after = model(model.embed_tokens(tokens_bt), mask_bt)[0]
    np.testing.assert_allclose(after, before, atol=1e-4)
