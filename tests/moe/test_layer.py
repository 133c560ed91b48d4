"""MoELayer against a per-token numpy reference, dense equivalence and padding handling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimoe.models.llm import MLP
from unimoe.models.lora import LoRAConfig
from unimoe.moe.layer import MoEConfig, MoELayer

DIM, FFN, NUM_EXPERTS = 7, 11, 3


def random_module(make, seed: int, std: float = 0.4):
    """Builds `make()` abstractly and fills every parameter with N(0, std) numpy draws.

    Skips the eager random init (one compile per parameter shape) that the test overwrites anyway,
    and keeps no term hidden behind a zero init.
    """
    module = nnx.eval_shape(make)
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param):
            shape = var.get_value().shape
            var.set_value(jnp.asarray(std * rng.normal(size=shape), jnp.float32))
    return module


def make_layer(router: str, renormalize: bool = True, lora_rank: int = 0) -> MoELayer:
    cfg = MoEConfig(num_experts=NUM_EXPERTS, top_k=2, router=router, renormalize=renormalize)
    lora = LoRAConfig(rank=lora_rank)
    return random_module(lambda: MoELayer(DIM, cfg, ffn_dim=FFN, lora=lora, rngs=nnx.Rngs(0)), 1)


@nnx.jit
def forward(layer: MoELayer, x_btd: jax.Array, mask_bt: jax.Array):
    return layer(x_btd, mask_bt)


def all_valid(x_btd: np.ndarray) -> np.ndarray:
    return np.ones(x_btd.shape[:2], bool)


def numpy_swiglu(x_d: np.ndarray, w_gate_df, w_up_df, w_down_fd) -> np.ndarray:
    gate, up = x_d @ w_gate_df, x_d @ w_up_df
    return (gate / (1 + np.exp(-gate)) * up) @ w_down_fd


def numpy_moe(layer: MoELayer, x_nd: np.ndarray) -> np.ndarray:
    """One token at a time: route, run the chosen experts, mix (no sorting, no batching)."""
    cfg = layer.cfg
    router_de = np.asarray(layer.router.kernel[...], np.float64)
    bank = layer.experts
    w_gate, w_up, w_down = (
        np.asarray(w[...], np.float64) for w in (bank.w_gate_edf, bank.w_up_edf, bank.w_down_efd)
    )
    out_nd = np.zeros_like(x_nd, dtype=np.float64)
    for n, x_d in enumerate(np.asarray(x_nd, np.float64)):
        logits_e = x_d @ router_de
        chosen = np.argsort(-logits_e, kind="stable")[: cfg.top_k]
        if cfg.router == "topk_softmax":
            weights = np.exp(logits_e[chosen] - logits_e[chosen].max())
            weights /= weights.sum()
        else:
            probs_e = np.exp(logits_e - logits_e.max())
            probs_e /= probs_e.sum()
            weights = probs_e[chosen]
            if cfg.renormalize:
                weights = weights / weights.sum()
        for weight, e in zip(weights, chosen):
            out_nd[n] += weight * numpy_swiglu(x_d, w_gate[e], w_up[e], w_down[e])
    return out_nd


X_BTD = np.random.default_rng(0).normal(size=(2, 5, DIM)).astype(np.float32)


@pytest.mark.parametrize(
    "router, renormalize",
    [("topk_softmax", True), ("softmax_topk", True), ("softmax_topk", False)],
)
def test_layer_matches_per_token_reference(router, renormalize):
    layer = make_layer(router, renormalize)
    y_btd, aux = forward(layer, X_BTD, all_valid(X_BTD))
    expected_nd = numpy_moe(layer, X_BTD.reshape(10, DIM))
    np.testing.assert_allclose(y_btd.reshape(10, DIM), expected_nd, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.sum(aux["expert_load"]), 1.0, rtol=1e-6)


@pytest.mark.parametrize("router", ["topk_softmax", "softmax_topk"])
def test_experts_copied_from_one_dense_ffn_reproduce_it(router):
    dense = random_module(lambda: MLP(DIM, FFN, rngs=nnx.Rngs(0)), 4)
    layer = make_layer(router)
    bank = layer.experts
    for w_bank, linear in (
        (bank.w_gate_edf, dense.gate),
        (bank.w_up_edf, dense.up),
        (bank.w_down_efd, dense.down),
    ):
        w_bank[...] = jnp.asarray(np.broadcast_to(linear.kernel[...], w_bank[...].shape))
    y_btd, _ = forward(layer, X_BTD, all_valid(X_BTD))
    dense_weights = [
        np.asarray(linear.kernel[...], np.float64) for linear in (dense.gate, dense.up, dense.down)
    ]
    expected_nd = [numpy_swiglu(x_d, *dense_weights) for x_d in X_BTD.reshape(10, DIM)]
    np.testing.assert_allclose(y_btd.reshape(10, DIM), expected_nd, rtol=2e-5, atol=2e-6)


def test_padding_tokens_count_in_no_loss_and_no_load():
    layer = make_layer("topk_softmax")
    mask_bt = np.array([[True] * 5, [True, True, True, False, False]])
    y_btd, aux = forward(layer, X_BTD, mask_bt)
    valid_x_1nd = X_BTD[mask_bt][None]
    y_valid, aux_valid = forward(layer, valid_x_1nd, all_valid(valid_x_1nd))
    for name in ("balance_loss", "z_loss", "expert_load"):
        np.testing.assert_allclose(aux[name], aux_valid[name], rtol=1e-6, err_msg=name)
    # Dropless routing: a token's output depends on that token only.
    np.testing.assert_allclose(np.asarray(y_btd)[mask_bt], y_valid[0], rtol=1e-5, atol=1e-6)


def test_router_stays_float32_for_bfloat16_activations():
    layer = make_layer("topk_softmax")
    y_btd, aux = forward(layer, X_BTD.astype(jnp.bfloat16), all_valid(X_BTD))
    assert y_btd.dtype == jnp.bfloat16
    assert aux["balance_loss"].dtype == jnp.float32 and aux["z_loss"].dtype == jnp.float32


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_experts=3, top_k=4), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(num_experts=0), "num_experts"),
        (dict(router="sinkhorn"), "router"),
        (dict(impl="capacity"), "impl"),
        (dict(ffn_dim=-1), "ffn_dim"),
    ],
)
def test_config_rejects_impossible_settings(kwargs, field):
    with pytest.raises(ValueError, match=f"MoEConfig.{field}"):
        MoEConfig(**kwargs)
