"""Scanned decoder layers (`LLMConfig.scan_layers`) compute what the unrolled ones do at the same
weights: loss, gradients, MoE statistics, router-bias updates and generation, for MoE on every
layer, on every 2nd layer and on an irregular set; every remat policy leaves them unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimoe.checkpoint import path_str
from unimoe.eval import generate
from unimoe.models import layer_stack
from unimoe.models.llm import DecoderLM, LLMConfig

# Odd sizes; 4 layers so 'every_2' scans 2 blocks of 2 and (0, 3) is one irregular block.
BASE = dict(
    vocab_size=61, dim=24, num_layers=4, num_heads=4, num_kv_heads=2, ffn_dim=40,
    moe=dict(num_experts=4, top_k=2), lora=dict(rank=3, dropout=0.0),
)  # fmt: skip


def _flat(state) -> dict[str, np.ndarray]:
    return {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _pair(moe_layers, remat='none', **moe) -> tuple[DecoderLM, DecoderLM]:
    """(unrolled, scanned) LMs holding the same weights (LoRA B made non-zero)."""
    cfg = dict(BASE, moe_layers=moe_layers, moe={**BASE['moe'], **moe})
    unrolled = DecoderLM(LLMConfig(**cfg, remat=remat), rngs=nnx.Rngs(0))
    for path, variable in nnx.to_flat_state(nnx.state(unrolled, nnx.Param)):
        if 'lora_b' in path_str(path):
            key = jax.random.key(len(path_str(path)))
            variable.set_value(0.1 * jax.random.normal(key, variable.get_value().shape))
    scanned = DecoderLM(LLMConfig(**cfg, remat=remat, scan_layers=True), rngs=nnx.Rngs(1))
    period = scanned.cfg.block_period
    stacked = layer_stack.scanned_params(_flat(nnx.state(unrolled, nnx.Param)), period, 4)
    for path, variable in nnx.to_flat_state(nnx.state(scanned, nnx.Param)):
        variable.set_value(jnp.asarray(stacked[path_str(path)]))
    return unrolled, scanned


def _inputs():
    x_btd = jax.random.normal(jax.random.key(0), (2, 7, 24))
    return x_btd, jnp.ones((2, 7), bool).at[1, 5:].set(False)


def _loss_and_grads(model: DecoderLM):
    x_btd, mask_bt = _inputs()

    def loss(model):
        logits, aux = model(x_btd, mask_bt)
        return (logits**2).mean() + aux.balance_loss + aux.z_loss, aux

    (value, aux), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return value, aux, layer_stack.unrolled_params(_flat(grads))


@pytest.mark.parametrize('moe_layers, period', [('all', 1), ('every_2', 2), ((0, 3), 4)])
def test_scanned_equals_unrolled(moe_layers, period):
    unrolled, scanned = _pair(moe_layers)
    assert scanned.cfg.block_period == period
    loss_u, aux_u, grads_u = _loss_and_grads(unrolled)
    loss_s, aux_s, grads_s = _loss_and_grads(scanned)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    # Per MoE layer, in layer order.
    for name in ('expert_load', 'router_entropy', 'balance_loss'):
        np.testing.assert_allclose(getattr(aux_s, name), getattr(aux_u, name), atol=1e-6)
    assert grads_s.keys() == grads_u.keys()
    for path, grad in grads_u.items():
        np.testing.assert_allclose(grads_s[path], grad, atol=1e-6, err_msg=path)


@pytest.mark.parametrize('remat', ['full', 'dots', 'dots_no_batch'])
def test_remat_policies_change_no_number(remat):
    reference_loss, _, reference_grads = _loss_and_grads(_pair('every_2')[0])
    for model in _pair('every_2', remat=remat):
        loss, _, grads = _loss_and_grads(model)
        np.testing.assert_allclose(loss, reference_loss, rtol=1e-6)
        for path, grad in reference_grads.items():
            np.testing.assert_allclose(grads[path], grad, atol=1e-6, err_msg=path)


def test_generation_is_the_same():
    unrolled, scanned = _pair('every_2')
    tokens = np.array([[5, 9, 2, 44, 0, 0], [7, 1, 3, 3, 8, 12]], np.int32)
    batch = {'tokens': tokens, 'prompt_len': np.array([4, 6], np.int32)}
    outputs = [
        generate.generate(*nnx.split(model), batch, max_new_tokens=5, pad_id=0)
        for model in (unrolled, scanned)
    ]
    np.testing.assert_array_equal(outputs[1], outputs[0])


def test_router_bias_updates_reach_each_layer():
    from unimoe.train import step

    unrolled, scanned = _pair('all', router='sigmoid_bias', bias_update_rate=0.1)
    load_le = jnp.asarray(np.random.default_rng(0).integers(0, 9, (4, 4)), jnp.float32)

    class Holder(nnx.Module):  # update_router_biases reads `model.llm`
        def __init__(self, llm):
            self.llm = llm

    for model in (unrolled, scanned):
        step.update_router_biases(Holder(model), load_le)
    biases = [
        layer_stack.unrolled_params(_flat(nnx.state(m, nnx.Not(nnx.Param))))
        for m in (unrolled, scanned)
    ]
    bias_paths = [p for p in biases[0] if p.endswith('router_bias')]
    assert len(bias_paths) == 4
    for path in bias_paths:
        np.testing.assert_array_equal(biases[1][path], biases[0][path], err_msg=path)
    assert np.abs(biases[0][bias_paths[0]]).sum() > 0  # the update did something


def test_parameter_layouts_round_trip():
    _, scanned = _pair('every_2')
    flat = _flat(nnx.state(scanned, nnx.Param))
    unrolled = layer_stack.unrolled_params(flat)
    assert 'layers/3/ffn/gate/kernel' in unrolled and 'layers/2/ffn/experts/w_up_edf' in unrolled
    restacked = layer_stack.scanned_params(unrolled, 2, 4)
    assert restacked.keys() == flat.keys()
    for path, value in flat.items():
        np.testing.assert_array_equal(restacked[path], value)
