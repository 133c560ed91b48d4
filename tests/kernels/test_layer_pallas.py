"""MoELayer with kernel_impl='pallas' (interpret mode on CPU) equals kernel_impl='xla'."""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimoe.moe import gmm
from unimoe.moe.config import MoEConfig
from unimoe.moe.layer import MoELayer

DIM, FFN = 8, 16


def loss_and_grads(cfg: MoEConfig, x_btd, mask_bt, probe_btd):
    layer = MoELayer(DIM, cfg, ffn_dim=FFN, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)

    @jax.jit
    def run(params, x_btd):
        def loss(params, x_btd):
            y_btd, aux = nnx.merge(graphdef, params)(x_btd, mask_bt)
            return jnp.sum(y_btd * probe_btd) + aux.balance_loss, (y_btd, aux)

        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x_btd)

    return run(params, x_btd)


def test_pallas_layer_matches_xla_forward_and_grads(caplog):
    # top-P with a null expert: fused routing, sentinel slots, empty groups are all exercised.
    cfg = MoEConfig(num_experts=4, router="top_p", top_p=0.5, k_max=3, num_null_experts=1)
    keys = jax.random.split(jax.random.key(0), 2)
    x_btd = jax.random.normal(keys[0], (2, 5, DIM))
    probe_btd = jax.random.normal(keys[1], (2, 5, DIM))
    mask_bt = jnp.ones((2, 5), bool).at[1, 3:].set(False)

    with caplog.at_level(logging.INFO, logger="unimoe.moe.layer"):
        (_, (y_p, aux_p)), grads_p = loss_and_grads(
            dataclasses.replace(cfg, kernel_impl="pallas"), x_btd, mask_bt, probe_btd
        )
    assert "fused Pallas kernel" in caplog.text and "(pallas)" in caplog.text
    (_, (y_x, aux_x)), grads_x = loss_and_grads(
        dataclasses.replace(cfg, kernel_impl="ragged_dot"),
        x_btd,
        mask_bt,
        probe_btd,
    )
    assert float(jnp.abs(y_x).max()) > 0
    np.testing.assert_allclose(y_p, y_x, rtol=1e-5, atol=1e-6)
    for want, got in zip(jax.tree.leaves(aux_x), jax.tree.leaves(aux_p), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    flat_p, flat_x = jax.tree.leaves(grads_p), jax.tree.leaves(grads_x)
    assert len(flat_p) == len(flat_x) > 2
    for g_p, g_x in zip(flat_p, flat_x):
        np.testing.assert_allclose(g_p, g_x, rtol=1e-4, atol=1e-6)
    # The router gets a gradient through the fused kernel's weights.
    assert float(jnp.abs(grads_p[0]["router"]["kernel"][...]).max()) > 0


def test_kernel_impl_resolves_in_one_place_and_is_validated():
    def resolve(kernel_impl, platform, rows=4096):
        return gmm.resolve_backend(kernel_impl, rows, 8, platform)

    assert [resolve("auto", p) for p in ("cpu", "tpu", "gpu")] == ["tiles", "pallas", "pallas"]
    assert [resolve("xla", p) for p in ("cpu", "tpu", "gpu")] == ["tiles", "ragged_dot", "ragged_dot"]
    assert resolve("ragged_dot", "cpu") == "ragged_dot" and resolve("tiles", "tpu") == "tiles"
    # A decode step (few rows per expert) on CPU: ragged_dot's dense pass beats the tile loops.
    assert resolve("auto", "cpu", rows=gmm.SMALL_GROUP_ROWS * 8 - 1) == "ragged_dot"
    assert resolve("auto", "cpu", rows=gmm.SMALL_GROUP_ROWS * 8) == "tiles"
    assert gmm.resolve_backend("auto", 2, 8, "cpu", under_mesh=True) == "tiles"
    layer = MoELayer(8, MoEConfig(), ffn_dim=16, rngs=nnx.Rngs(0))
    assert (layer.backend(num_tokens=2), layer.backend(num_tokens=4096)) == ("ragged_dot", "tiles")
    with pytest.raises(ValueError, match="kernel_impl"):
        MoEConfig(kernel_impl="triton")


def test_bf16_compute_with_float32_params_matches_xla(caplog):
    """Mixed precision as `LLMConfig.dtype='bfloat16'` runs a layer: bf16 activations, float32
    parameters (the master weights, cast to bf16 at each matmul). The Pallas layer's expert
    gradients are float32 and agree with the XLA path's (the tile loops here) to bf16 rounding."""
    cfg = MoEConfig(num_experts=4, router="top_p", top_p=0.5, k_max=3, num_null_experts=1)
    keys = jax.random.split(jax.random.key(1), 2)
    # 24 tokens x 3 slots: enough rows per expert for the XLA path to take the tile loops on CPU.
    x_btd = jax.random.normal(keys[0], (2, 12, DIM)).astype(jnp.bfloat16)
    probe_btd = jax.random.normal(keys[1], (2, 12, DIM))
    mask_bt = jnp.ones((2, 12), bool).at[1, 9:].set(False)
    run = functools.partial(loss_and_grads, x_btd=x_btd, mask_bt=mask_bt, probe_btd=probe_btd)

    (_, (y_p, _)), (grads_p, _) = run(dataclasses.replace(cfg, kernel_impl="pallas"))
    with caplog.at_level(logging.INFO, logger="unimoe.moe.layer"):
        (_, (y_x, _)), (grads_x, _) = run(dataclasses.replace(cfg, kernel_impl="xla"))
    assert "(tiles)" in caplog.text
    _, (grads_f32, _) = run(dataclasses.replace(cfg, kernel_impl="xla"), x_btd=jnp.float32(x_btd))
    assert y_p.dtype == y_x.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(y_p), np.float32(y_x), rtol=2e-2, atol=2e-2)
    for name in ("w_gate_edf", "w_up_edf", "w_down_efd"):
        g_p, g_x = grads_p["experts"][name][...], grads_x["experts"][name][...]
        assert g_p.dtype == g_x.dtype == jnp.float32
        scale = float(jnp.abs(g_x).max())
        assert scale > 0
        # bf16 keeps 8 significant bits: 2^-8 of the largest gradient, with room for the sums.
        np.testing.assert_allclose(g_p, g_x, atol=2e-2 * scale, rtol=0)
        # ... and the compute really was bf16: float32 activations give other gradients.
        assert float(jnp.abs(g_x - grads_f32["experts"][name][...]).max()) > 1e-4 * scale
