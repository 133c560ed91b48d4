"""Upcycling dense FFNs into expert banks: per source model, copies, hidden-axis slices."""

import dataclasses
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.convert import hf_models
from unimoe import factory
from unimoe.convert import core, upcycle
from unimoe.models.llm import MLP, DecoderLM
from unimoe.moe.experts import ExpertBank
from unimoe.moe.config import MoEConfig


def upcycle_ffn(
    ffn: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]], mode: str, num_experts: int
) -> dict[str, np.ndarray]:
    """{'gate/kernel', 'up/kernel', 'down/kernel'} dense weights (a list of them for 'per_source')
    -> {'experts/w_gate_edf', 'experts/w_up_edf', 'experts/w_down_efd'}."""
    sources = [ffn] if isinstance(ffn, Mapping) else list(ffn)
    return {
        expert: upcycle.expert_weights(
            [np.asarray(src[dense]) for src in sources], dense.split("/")[0], mode, num_experts
        )
        for dense, expert in upcycle.DENSE_TO_EXPERT.items()
    }

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def dense_llama(tmp_path_factory) -> tuple[DecoderLM, dict[str, np.ndarray]]:
    """The converted tiny HF LLaMA (hidden 96, ffn 80) and its flat params without 'llm/'."""
    conv = core.read_hf(hf_models.save("llama", tmp_path_factory.mktemp("llama")))
    model = core.abstract_modules(conv.configs)["llm"]
    core.load_into({"llm": model}, conv.params)
    return model, {path.removeprefix("llm/"): v for path, v in conv.params.items()}


def _moe_llama(dense: DecoderLM, **moe) -> DecoderLM:
    """An abstract MoE twin of `dense`: every weight must then be loaded (a random init of all of
    it would cost more than the tests)."""
    # ragged_dot: the cheapest grouped matmul to run on CPU at this size.
    moe_cfg = MoEConfig(**moe, kernel_impl="ragged_dot")
    cfg = dataclasses.replace(dense.cfg, moe_layers="all", moe=moe_cfg)
    return nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(1)))


def _new_routers(model: DecoderLM) -> tuple[str, dict[str, np.ndarray]]:
    """Upcycling leaves routers new: random ones, as an init would draw."""
    rng = np.random.default_rng(1)
    routers = {}
    for i, layer in enumerate(model.layers):
        shape = layer.ffn.router.kernel.get_value().shape
        routers[f"layers/{i}/ffn/router/kernel"] = rng.normal(size=shape).astype(np.float32)
    return "new_routers", routers


@nnx.jit
def _logits(model: DecoderLM, tokens_bt: np.ndarray):
    mask_bt = jnp.ones(tokens_bt.shape, bool)
    return model(model.embed_tokens(jnp.asarray(tokens_bt)), mask_bt)


TOKENS_BT = RNG.integers(0, hf_models.LM["vocab_size"], (2, 11)).astype(np.int32)


def test_copies_of_one_ffn_give_the_dense_model_output(dense_llama):
    dense, flat = dense_llama
    moe = _moe_llama(dense, num_experts=6, top_k=3, router="softmax_topk")
    sources = [("dense", flat), _new_routers(moe)]
    origin = factory.load_params(moe, sources, [("dense", flat)], upcycle_mode="copies")
    assert origin["layers/1/ffn/experts/w_down_efd"] == "dense"
    assert origin["layers/1/ffn/router/kernel"] == "new_routers"
    dense_logits, _ = _logits(dense, TOKENS_BT)
    moe_logits, aux = _logits(moe, TOKENS_BT)
    # The random router spreads tokens over the experts, yet every mix of equal experts with
    # weights summing to 1 is the dense FFN: only float rounding of the weighted sum differs.
    assert (np.asarray(aux.expert_load) > 0).sum() > 6
    np.testing.assert_allclose(moe_logits, dense_logits, rtol=1e-6, atol=2e-6)


def test_experts_from_different_models_change_the_output(dense_llama):
    dense, flat = dense_llama
    moe = _moe_llama(dense, num_experts=2, top_k=1, router="softmax_topk")
    shifted = {path: v + 0.05 if "mlp" in path or "ffn" in path else v for path, v in flat.items()}
    factory.load_params(moe, [("a", flat), _new_routers(moe)], [("a", flat), ("b", shifted)])
    bank = moe.layers[0].ffn.experts
    np.testing.assert_array_equal(bank.w_up_edf[...][0], flat["layers/0/ffn/up/kernel"])
    np.testing.assert_array_equal(bank.w_up_edf[...][1], shifted["layers/0/ffn/up/kernel"])
    assert np.max(np.abs(_logits(moe, TOKENS_BT)[0] - _logits(dense, TOKENS_BT)[0])) > 1e-3


def test_slices_partition_the_hidden_units_and_sum_to_the_dense_ffn():
    dim, ffn, experts = 12, 20, 4
    dense = {
        "gate/kernel": 0.3 * RNG.normal(size=(dim, ffn)).astype(np.float32),
        "up/kernel": 0.3 * RNG.normal(size=(dim, ffn)).astype(np.float32),
        "down/kernel": 0.3 * RNG.normal(size=(ffn, dim)).astype(np.float32),
    }
    mlp = nnx.eval_shape(lambda: MLP(dim, ffn, rngs=nnx.Rngs(0)))
    for name, linear in (("gate", mlp.gate), ("up", mlp.up), ("down", mlp.down)):
        linear.kernel.set_value(jnp.asarray(dense[f"{name}/kernel"]))
    banks = upcycle_ffn(dense, "slices", experts)
    assert banks["experts/w_gate_edf"].shape == (experts, dim, ffn // experts)
    assert banks["experts/w_down_efd"].shape == (experts, ffn // experts, dim)
    np.testing.assert_array_equal(
        np.concatenate(banks["experts/w_up_edf"], axis=1), dense["up/kernel"]
    )
    np.testing.assert_array_equal(
        np.concatenate(banks["experts/w_down_efd"], axis=0), dense["down/kernel"]
    )
    bank = nnx.eval_shape(lambda: ExpertBank(experts, dim, ffn // experts, rngs=nnx.Rngs(1)))
    bank.w_gate_edf.set_value(jnp.asarray(banks["experts/w_gate_edf"]))
    bank.w_up_edf.set_value(jnp.asarray(banks["experts/w_up_edf"]))
    bank.w_down_efd.set_value(jnp.asarray(banks["experts/w_down_efd"]))
    x_nd = RNG.normal(size=(7, dim)).astype(np.float32)
    per_expert_end = bank.batched(jnp.broadcast_to(x_nd, (experts, *x_nd.shape)))
    np.testing.assert_allclose(per_expert_end.sum(0), mlp(jnp.asarray(x_nd)), rtol=1e-5, atol=1e-7)
    # Each slice alone is a different, partial function.
    assert np.max(np.abs(per_expert_end[0] - per_expert_end[1])) > 1e-4


def test_slices_through_load_params(dense_llama):
    dense, flat = dense_llama
    moe = _moe_llama(dense, num_experts=4, top_k=2, ffn_dim=20)  # 80 hidden units / 4
    sources = [("dense", flat), _new_routers(moe)]
    factory.load_params(moe, sources, [("dense", flat)], upcycle_mode="slices")
    gate = np.asarray(moe.layers[1].ffn.experts.w_gate_edf[...])
    np.testing.assert_array_equal(gate[2], flat["layers/1/ffn/gate/kernel"][:, 40:60])

    wrong_width = _moe_llama(dense, num_experts=4, top_k=2)  # experts as wide as the dense FFN
    with pytest.raises(ValueError, match=r"layers/0/ffn/experts/w_\w+: upcycling \(slices\)"):
        factory.load_params(wrong_width, sources, [("dense", flat)], upcycle_mode="slices")


def test_per_source_stacks_in_source_order():
    sources = [RNG.normal(size=(3, 5)) for _ in range(3)]
    stacked = upcycle.expert_weights(sources, "gate", "per_source", 3)
    for e, source in enumerate(sources):
        np.testing.assert_array_equal(stacked[e], source)


@pytest.mark.parametrize(
    "sources, mode, num_experts, message",
    [
        (1, "per_source", 3, "takes 3 dense FFN"),
        (2, "copies", 3, "takes 1 dense FFN"),
        (1, "slices", 4, "6 hidden units do not split into 4"),
        (1, "halves", 2, "mode must be one of"),
    ],
)
def test_bad_upcycling_requests_raise(sources, mode, num_experts, message):
    dense = [np.zeros((4, 6))] * sources
    with pytest.raises(ValueError, match=message):
        upcycle.expert_weights(dense, "up", mode, num_experts)


def test_dense_source_key():
    assert (
        upcycle.dense_source_key("llm/layers/3/ffn/experts/w_up_edf")
        == "llm/layers/3/ffn/up/kernel"
    )
    assert upcycle.dense_source_key("layers/0/ffn/experts/w_down_efd") == "layers/0/ffn/down/kernel"
    assert upcycle.dense_source_key("llm/layers/3/ffn/router/kernel") is None
