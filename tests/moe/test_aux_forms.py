"""The balance-loss forms (`MoEConfig.balance_loss_form`) against independent references at the
same router logits: Hugging Face's `load_balancing_loss_func` (torch) for 'hf_pooled', a numpy
transcription of the official Uni-MoE 8E gating for 'uni_moe_8e', a numpy Switch loss for the
default; then the form through the scanned decoder and into a stage's training loss."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from tests.tiny_model import TOKEN_IDS, model_dict, random_module
from unimoe import config as config_lib
from unimoe.checkpoint import path_str
from unimoe.models import layer_stack
from unimoe.models.llm import DecoderLM, LLMConfig
from unimoe.models.unimoe import ModelSpec, UniMoE, UniMoEConfig
from unimoe.moe import routing
from unimoe.moe.aux_stats import MoEAux
from unimoe.moe.config import MoEConfig
from unimoe.moe.layer import MoELayer
from unimoe.train import step as step_lib
from unimoe.train import validate

DIM, FFN = 9, 13
BATCH, SEQ, LAYERS = 3, 7, 3
# Rows of padding at the end of examples 1 and 2 (odd counts, one example unpadded).
MASK_BT = np.ones((BATCH, SEQ), bool)
MASK_BT[1, 4:] = False
MASK_BT[2, 6:] = False


def _layers_and_logits(num_experts: int, top_k: int, form: str, router: str = "topk_softmax"):
    """LAYERS MoE layers of random weights, each run on its own random input: (the stacked and
    reduced aux, [the router logits of each layer as the layer computes them])."""
    cfg = MoEConfig(
        num_experts=num_experts, top_k=top_k, router=router, balance_loss_form=form,
        kernel_impl="ragged_dot",
    )  # fmt: skip
    rng = np.random.default_rng(num_experts * 10 + top_k)
    auxes, logits = [], []
    for seed in range(LAYERS):
        layer = random_module(lambda: MoELayer(DIM, cfg, ffn_dim=FFN, rngs=nnx.Rngs(0)), seed, 0.6)
        x_btd = jnp.asarray(rng.normal(size=(BATCH, SEQ, DIM)), jnp.float32)
        _, aux = layer(x_btd, jnp.asarray(MASK_BT))
        auxes.append(aux)
        logits.append(np.array(layer.router(x_btd.reshape(-1, DIM))))
    return MoEAux.stack(auxes).reduce_layers(), logits


@pytest.mark.parametrize("num_experts, top_k", [(4, 2), (8, 2)])
def test_hf_pooled_equals_transformers_load_balancing_loss(num_experts, top_k):
    aux, logits = _layers_and_logits(num_experts, top_k, "hf_pooled")
    gate_logits = tuple(torch.from_numpy(logits_ne) for logits_ne in logits)
    mask = torch.from_numpy(MASK_BT.astype(np.int64))
    expected = load_balancing_loss_func(gate_logits, num_experts, top_k, mask)
    np.testing.assert_allclose(aux.balance_loss, expected.item(), rtol=1e-5)
    # On one layer, HF's value is k times our default's.
    valid = MASK_BT.reshape(-1)
    for layer in range(LAYERS):
        one = load_balancing_loss_func(gate_logits[layer : layer + 1], num_experts, top_k, mask)
        switch = _switch_layer_loss(logits[layer], top_k, valid)
        np.testing.assert_allclose(one.item(), top_k * switch, rtol=1e-5)


def test_hf_pooled_without_padding_equals_hf_without_a_mask():
    rng = np.random.default_rng(3)
    logits = [rng.normal(size=(BATCH * SEQ, 8)).astype(np.float32) for _ in range(LAYERS)]
    sums = []
    for logits_ne in logits:
        _, experts_nk = routing.route_topk_softmax(jnp.asarray(logits_ne), 2)
        probs_ne = jax.nn.softmax(jnp.asarray(logits_ne), axis=-1)
        sums.append(routing.balance_sums(probs_ne, experts_nk, jnp.ones(BATCH * SEQ, bool)))
    ours = routing.balance_loss_pooled(*(jnp.stack(s) for s in zip(*sums)))
    expected = load_balancing_loss_func(tuple(map(torch.from_numpy, logits)), 8, 2)
    np.testing.assert_allclose(ours, expected.item(), rtol=1e-5)


def _official_8e_layer_loss(logits_ne: np.ndarray) -> float:
    """DeepSpeed `top2gating` as Uni-MoE 8E calls it (no token mask): gates = softmax(logits);
    me = mean of gates over all rows; ce = mean of one_hot(argmax gates); l_aux = mean(me * ce)
    * E * E."""
    shifted = logits_ne - logits_ne.max(axis=1, keepdims=True)
    gates = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    num_experts = gates.shape[1]
    mask1 = np.eye(num_experts)[gates.argmax(axis=1)]
    me, ce = gates.mean(axis=0), mask1.mean(axis=0)
    return float(np.mean(me * ce) * num_experts * num_experts)


@pytest.mark.parametrize("num_experts", [4, 8])
def test_uni_moe_8e_equals_the_official_gating_padding_included(num_experts):
    aux, logits = _layers_and_logits(num_experts, 2, "uni_moe_8e", router="softmax_topk")
    expected = sum(_official_8e_layer_loss(logits_ne) for logits_ne in logits)
    np.testing.assert_allclose(aux.balance_loss, expected, rtol=1e-5)
    # The valid tokens alone give another value: the padding rows are counted.
    valid = MASK_BT.reshape(-1)
    masked = sum(_official_8e_layer_loss(logits_ne[valid]) for logits_ne in logits)
    assert abs(masked - expected) > 1e-3


def _switch_layer_loss(logits_ne: np.ndarray, top_k: int, valid_n: np.ndarray) -> float:
    """Our default, per layer: E * sum_e f_e * P_e over the valid tokens, f_e the share of their
    top-k assignments (summing to 1), P_e their mean softmax."""
    logits_ne, num_experts = logits_ne[valid_n], logits_ne.shape[1]
    probs = np.exp(logits_ne) / np.exp(logits_ne).sum(axis=1, keepdims=True)
    chosen = np.argsort(-logits_ne, axis=1)[:, :top_k]
    load = np.bincount(chosen.reshape(-1), minlength=num_experts) / chosen.size
    return float(num_experts * np.sum(load * probs.mean(axis=0)))


def test_the_default_form_is_the_per_layer_switch_loss_summed():
    assert MoEConfig().balance_loss_form == "switch_topk"
    aux, logits = _layers_and_logits(4, 2, MoEConfig().balance_loss_form)
    valid = MASK_BT.reshape(-1)
    expected = sum(_switch_layer_loss(logits_ne, 2, valid) for logits_ne in logits)
    np.testing.assert_allclose(aux.balance_loss, expected, rtol=1e-5)


def test_an_unknown_form_is_named_as_a_config_field():
    with pytest.raises(ValueError, match=r"MoEConfig.balance_loss_form must be one of"):
        MoEConfig(balance_loss_form="mixtral")
    configs = pathlib.Path(__file__).parent.parent.parent / "configs"
    config = config_lib.load_config(f"{configs}/unimoe_tiny.py:mode=test")
    config.model.moe.balance_loss_form = "mixtral"
    with pytest.raises(ValueError, match=r"config.model.moe.balance_loss_form must be one of"):
        validate.validate_experiment(config)


def _unrolled_and_scanned(form: str) -> tuple[DecoderLM, DecoderLM]:
    cfg = dict(
        vocab_size=29, dim=12, num_layers=3, num_heads=3, num_kv_heads=1, ffn_dim=10,
        moe_layers='all', moe=dict(num_experts=5, top_k=2, balance_loss_form=form),
    )  # fmt: skip
    unrolled = DecoderLM(LLMConfig(**cfg), rngs=nnx.Rngs(0))
    scanned = DecoderLM(LLMConfig(**cfg, scan_layers=True), rngs=nnx.Rngs(1))
    params = nnx.to_flat_state(nnx.state(unrolled, nnx.Param))
    flat = {path_str(path): np.asarray(variable.get_value()) for path, variable in params}
    stacked = layer_stack.scanned_params(flat, scanned.cfg.block_period, 3)
    for path, variable in nnx.to_flat_state(nnx.state(scanned, nnx.Param)):
        variable.set_value(jnp.asarray(stacked[path_str(path)]))
    return unrolled, scanned


@pytest.mark.parametrize("form", ["hf_pooled", "uni_moe_8e"])
def test_the_scanned_decoder_reports_the_unrolled_balance_loss(form):
    x_btd = jax.random.normal(jax.random.key(0), (2, 5, 12))
    mask_bt = jnp.ones((2, 5), bool).at[1, 3:].set(False)
    unrolled, scanned = _unrolled_and_scanned(form)
    run = nnx.jit(lambda model: model(x_btd, mask_bt)[1])
    aux_u, aux_s = run(unrolled), run(scanned)
    assert aux_u.balance_loss.shape == () and aux_u.balance_tokens.shape == (3,)
    np.testing.assert_allclose(aux_s.balance_loss, aux_u.balance_loss, rtol=1e-5)
    # The pooled value comes from the three layers' sums, not the per-layer values summed.
    if form == "hf_pooled":
        sums = (aux_u.balance_assignments_e, aux_u.balance_prob_sums_e, aux_u.balance_tokens)
        pooled = routing.balance_loss_pooled(*sums)
        np.testing.assert_allclose(aux_u.balance_loss, pooled, rtol=1e-6)


def test_the_form_reaches_a_stages_training_loss():
    rng = np.random.default_rng(1)
    batch = {
        'tokens': jnp.asarray(rng.integers(6, 41, size=(2, 9))),
        'loss_mask': jnp.ones((2, 9)),
        'attn_mask': jnp.ones((2, 9), bool).at[1, 6:].set(False),
    }
    loss_cfg = step_lib.LossConfig(kind='chat', balance_coef=0.5)
    results = {}
    for form in routing.BALANCE_LOSS_FORMS:
        md = model_dict()
        md.moe.balance_loss_form = form
        cfg = UniMoEConfig.for_stage(
            ModelSpec.from_dict(md), vocab_size=41, token_ids=TOKEN_IDS, num_labels=(5, 7),
            moe=True, lora_rank=0,
        )  # fmt: skip
        model = random_module(lambda: UniMoE(cfg, rngs=nnx.Rngs(0)), seed=2)
        loss, metrics = nnx.jit(lambda m: step_lib.compute_loss(m, batch, loss_cfg, 0))(model)
        np.testing.assert_allclose(loss, metrics['ce'] + 0.5 * metrics['balance_loss'], rtol=1e-6)
        results[form] = (float(loss), float(metrics['ce']))
    # Same weights and batch (the form changes no parameter): one CE, three losses.
    np.testing.assert_allclose([ce for _, ce in results.values()], results['switch_topk'][1])
    losses = sorted(loss for loss, _ in results.values())
    assert min(np.diff(losses)) > 1e-4, results
