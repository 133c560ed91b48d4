"""MoELayer against a per-token numpy reference for every router, plus each switch on its own."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimoe.models.llm import MLP
from unimoe.moe import routers
from unimoe.moe.config import MoEConfig
from unimoe.moe.layer import MoELayer, RouterBias
from unimoe.nn.lora import LoRAConfig

DIM, FFN, NUM_EXPERTS = 7, 11, 4
AUX_SCALARS = (
    "balance_loss",
    "z_loss",
    "dcmoe_balance_loss",
    "router_entropy",
    "dropped_fraction",
    "experts_per_token",
)


def random_module(make, seed: int, std: float = 0.4):
    """Builds `make()` abstractly and fills every parameter with N(0, std) numpy draws.

    Skips the eager random init (one compile per parameter shape) that the test overwrites anyway,
    and keeps no term hidden behind a zero init. Non-Param variables (the router bias) get draws
    too, so a bias term cannot hide behind its zero init either.
    """
    module = nnx.eval_shape(make)
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, (nnx.Param, RouterBias)):
            shape = var.get_value().shape
            var.set_value(jnp.asarray(std * rng.normal(size=shape), jnp.float32))
    return module


def make_layer(router: str = "topk_softmax", renormalize: bool = True, lora_rank: int = 0, **kw):
    kw.setdefault("num_experts", NUM_EXPERTS)
    kw.setdefault("top_k", 2)
    kw.setdefault("kernel_impl", "ragged_dot")
    cfg = MoEConfig(router=router, renormalize=renormalize, **kw)
    lora = LoRAConfig(rank=lora_rank)
    return random_module(lambda: MoELayer(DIM, cfg, ffn_dim=FFN, lora=lora, rngs=nnx.Rngs(0)), 1)


def forward(layer: MoELayer, x_btd: jax.Array, mask_bt: jax.Array):
    return layer(x_btd, mask_bt)


def all_valid(x_btd: np.ndarray) -> np.ndarray:
    return np.ones(x_btd.shape[:2], bool)


def f64(var) -> np.ndarray:
    return np.asarray(var[...], np.float64)


def numpy_swiglu(x_d: np.ndarray, w_gate_df, w_up_df, w_down_fd) -> np.ndarray:
    gate, up = x_d @ w_gate_df, x_d @ w_up_df
    return (gate / (1 + np.exp(-gate)) * up) @ w_down_fd


def softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def group_keep(select_e: np.ndarray, num_groups: int, top_groups: int) -> np.ndarray:
    """DeepSeek: a group scores the sum of its top-2; experts of the top_groups groups stay."""
    groups_gs = select_e.reshape(num_groups, -1)
    group_score_g = np.sort(groups_gs, axis=-1)[:, ::-1][:, :2].sum(-1)
    keep_g = np.zeros(num_groups, bool)
    keep_g[np.argsort(-group_score_g, kind="stable")[:top_groups]] = True
    return np.repeat(keep_g, groups_gs.shape[1])


def numpy_route(cfg: MoEConfig, logits_e: np.ndarray, bias_e: np.ndarray | None):
    """One token's (weights, router columns) in float64, straight from each paper's rule."""
    k = cfg.top_k
    if cfg.router == "topk_softmax":
        chosen = np.argsort(-logits_e, kind="stable")[:k]
        weights = softmax(logits_e[chosen])
    elif cfg.router == "softmax_topk":
        probs_e = softmax(logits_e)
        select_e = probs_e.copy()
        if cfg.top_groups:
            select_e[~group_keep(probs_e, cfg.num_groups, cfg.top_groups)] = -np.inf
        chosen = np.argsort(-select_e, kind="stable")[:k]
        weights = probs_e[chosen]
    elif cfg.router == "top_p":
        probs_e = softmax(logits_e)
        order = np.argsort(-probs_e, kind="stable")
        k_n = min(cfg.num_slots, 1 + int(np.sum(np.cumsum(probs_e[order]) < cfg.top_p)))
        chosen = order[:k_n]
        weights = probs_e[chosen] / probs_e[chosen].sum()
    elif cfg.router == "sigmoid_bias":
        scores_e = 1 / (1 + np.exp(-logits_e))
        select_e = scores_e + bias_e
        if cfg.top_groups:
            select_e[~group_keep(select_e.copy(), cfg.num_groups, cfg.top_groups)] = -np.inf
        chosen = np.argsort(-select_e, kind="stable")[:k]
        weights = scores_e[chosen]
    else:  # group_equal
        probs_e = softmax(logits_e)
        size, per_group = cfg.num_experts // cfg.num_groups, k // cfg.num_groups
        chosen = np.concatenate(
            [
                g * size
                + np.argsort(-probs_e[g * size : (g + 1) * size], kind="stable")[:per_group]
                for g in range(cfg.num_groups)
            ]
        )
        weights = probs_e[chosen]
    if cfg.renormalize and cfg.router in ("softmax_topk", "sigmoid_bias", "group_equal"):
        weights = weights / weights.sum()
    return weights * cfg.routed_scaling, chosen


def numpy_moe(layer: MoELayer, x_nd: np.ndarray) -> tuple[np.ndarray, list]:
    """One token at a time: route, run the chosen routed experts, mix, add the shared experts.

    Returns (out_nd, per-token router columns chosen). Null-expert columns compute nothing.
    """
    cfg = layer.cfg
    router_de = f64(layer.router.kernel)
    bias_e = None if layer.router_bias is None else f64(layer.router_bias)
    bank = layer.experts
    w_gate, w_up, w_down = (f64(w) for w in (bank.w_gate_edf, bank.w_up_edf, bank.w_down_efd))
    out_nd = np.zeros_like(x_nd, dtype=np.float64)
    columns = []
    for n, x_d in enumerate(np.asarray(x_nd, np.float64)):
        weights, chosen = numpy_route(cfg, x_d @ router_de, bias_e)
        columns.append(chosen)
        for weight, e in zip(weights, chosen):
            if e < cfg.num_experts:
                out_nd[n] += weight * numpy_swiglu(x_d, w_gate[e], w_up[e], w_down[e])
        if layer.shared_experts is not None:
            shared = layer.shared_experts
            out_d = numpy_swiglu(
                x_d, *(f64(lin.kernel) for lin in (shared.gate, shared.up, shared.down))
            )
            if layer.shared_gate is not None:
                out_d = out_d / (1 + np.exp(-(x_d @ f64(layer.shared_gate.kernel))))
            out_nd[n] += out_d
    return out_nd, columns


X_BTD = np.random.default_rng(0).normal(size=(2, 5, DIM)).astype(np.float32)
X_ND = X_BTD.reshape(10, DIM)


@pytest.mark.parametrize(
    "router, renormalize, kw",
    [
        ("topk_softmax", True, {}),
        ("softmax_topk", True, {}),
        ("softmax_topk", False, dict(num_shared_experts=2, shared_ffn_dim=5, shared_gate=True)),
        # A null column among 2 choices: tokens that pick it lose its share of the output.
        ("topk_softmax", True, dict(num_null_experts=1)),
        ("top_p", True, dict(num_null_experts=1, top_p=0.6, k_max=3)),
        ("sigmoid_bias", True, dict(num_groups=2, top_groups=1, routed_scaling=2.5)),
        ("sigmoid_bias", False, dict(top_k=3)),
        # Unrenormalized weights must stay shares of the softmax over all experts.
        ("softmax_topk", False, dict(num_groups=2, top_groups=1)),
        ("group_equal", False, dict(num_groups=2)),
    ],
)
def test_layer_matches_per_token_reference(router, renormalize, kw):
    layer = make_layer(router, renormalize, **kw)
    y_btd, aux = forward(layer, X_BTD, all_valid(X_BTD))
    expected_nd, columns = numpy_moe(layer, X_ND)
    np.testing.assert_allclose(y_btd.reshape(10, DIM), expected_nd, rtol=2e-5, atol=2e-6)
    counts_ne = np.zeros((10, layer.cfg.num_experts))
    for n, chosen in enumerate(columns):
        for e in chosen[chosen < layer.cfg.num_experts]:
            counts_ne[n, e] += 1
    np.testing.assert_array_equal(aux.expert_counts_be, counts_ne.reshape(2, 5, -1).sum(1))
    np.testing.assert_allclose(aux.expert_load, counts_ne.sum(0) / counts_ne.sum(), rtol=1e-6)
    # Routed experts a token runs: the dynamic k_n of top-P less its null picks, else K.
    np.testing.assert_allclose(aux.experts_per_token, counts_ne.sum() / 10, rtol=1e-6)
    if router == "top_p":
        # The rule must actually vary k here, and a null expert must be picked somewhere.
        assert len({len(c) for c in columns}) > 1
        assert any((c >= layer.cfg.num_experts).any() for c in columns)
    if layer.cfg.num_null_experts:
        assert any((c >= layer.cfg.num_experts).any() for c in columns)


def test_null_expert_shrinks_the_output_by_its_weight_share():
    # 4 routed + 1 null, all 5 columns chosen: weights = softmax over the 5 logits, so
    # y = (1 - p_null) * (the same layer without the null column).
    with_null = make_layer("topk_softmax", num_null_experts=1, top_k=5)
    without = make_layer("topk_softmax", top_k=4)
    for src, dst in (
        (with_null.experts.w_gate_edf, without.experts.w_gate_edf),
        (with_null.experts.w_up_edf, without.experts.w_up_edf),
        (with_null.experts.w_down_efd, without.experts.w_down_efd),
    ):
        dst[...] = src[...]
    without.router.kernel[...] = with_null.router.kernel[...][:, :4]
    y_null, aux_null = forward(with_null, X_BTD, all_valid(X_BTD))
    y_plain, _ = forward(without, X_BTD, all_valid(X_BTD))
    logits_n5 = X_ND.astype(np.float64) @ f64(with_null.router.kernel)
    p_null_n = np.exp(logits_n5[:, 4]) / np.exp(logits_n5).sum(-1)
    np.testing.assert_allclose(
        y_null.reshape(10, DIM), (1 - p_null_n)[:, None] * y_plain.reshape(10, DIM), rtol=2e-5
    )
    # Null slots are no routed assignment: each token counts its 4 routed experts only.
    np.testing.assert_array_equal(aux_null.expert_counts_be, np.full((2, 4), 5))


@pytest.mark.parametrize("router", ["topk_softmax", "softmax_topk"])
def test_experts_copied_from_one_dense_ffn_reproduce_it(router):
    dense = random_module(lambda: MLP(DIM, FFN, rngs=nnx.Rngs(0)), 4)
    layer = make_layer(router, kernel_impl="auto")  # the CPU default grouped matmul
    bank = layer.experts
    for w_bank, linear in (
        (bank.w_gate_edf, dense.gate),
        (bank.w_up_edf, dense.up),
        (bank.w_down_efd, dense.down),
    ):
        w_bank[...] = jnp.asarray(np.broadcast_to(linear.kernel[...], w_bank[...].shape))
    y_btd, _ = forward(layer, X_BTD, all_valid(X_BTD))
    dense_weights = [f64(linear.kernel) for linear in (dense.gate, dense.up, dense.down)]
    expected_nd = [numpy_swiglu(x_d, *dense_weights) for x_d in X_ND]
    np.testing.assert_allclose(y_btd.reshape(10, DIM), expected_nd, rtol=2e-5, atol=2e-6)


def test_padding_tokens_count_in_no_loss_and_no_load():
    layer = make_layer("topk_softmax")
    mask_bt = np.array([[True] * 5, [True, True, True, False, False]])
    y_btd, aux = forward(layer, X_BTD, mask_bt)
    valid_x_1nd = X_BTD[mask_bt][None]
    y_valid, aux_valid = forward(layer, valid_x_1nd, all_valid(valid_x_1nd))
    for name in ("balance_loss", "z_loss", "expert_load", "dcmoe_balance_loss", "router_entropy"):
        np.testing.assert_allclose(
            getattr(aux, name), getattr(aux_valid, name), rtol=1e-6, err_msg=name
        )
    np.testing.assert_array_equal(aux.expert_counts_be.sum(0), aux_valid.expert_counts_be[0])
    np.testing.assert_array_equal(aux.expert_counts_be.sum(1), [10, 6])
    assert aux.experts_per_token == 2.0  # top-2, padding tokens excluded
    # Dropless routing: a token's output depends on that token only.
    np.testing.assert_allclose(np.asarray(y_btd)[mask_bt], y_valid[0], rtol=1e-5, atol=1e-6)


def test_token_weight_reweights_only_the_dcmoe_loss():
    layer = make_layer("top_p", num_null_experts=1, top_p=0.6, k_max=3)
    weight_bt = np.where(np.arange(5) < 2, 1.0, 10.0)[None].repeat(2, 0).astype(np.float32)
    _, aux = forward(layer, X_BTD, all_valid(X_BTD))
    _, aux_w = nnx.jit(lambda m, x, w: m(x, token_weight_bt=w))(layer, X_BTD, weight_bt)
    assert not np.isclose(aux.dcmoe_balance_loss, aux_w.dcmoe_balance_loss)
    np.testing.assert_allclose(aux.balance_loss, aux_w.balance_loss, rtol=1e-6)


def test_capacity_drops_overflow_by_position_and_reports_it():
    # C = max(ceil(10 * 2 / 3 * 0.1), 1) = 1: each expert computes its first valid assignment.
    layer = make_layer(impl="capacity", capacity_factor=0.1, min_capacity=1)
    mask_bt = all_valid(X_BTD)
    mask_bt[0, 0] = False  # padding takes no capacity: token 1 is the first candidate
    y_btd, aux = forward(layer, X_BTD, mask_bt)
    bank = layer.experts
    w = [f64(v) for v in (bank.w_gate_edf, bank.w_up_edf, bank.w_down_efd)]
    router_de = f64(layer.router.kernel)
    expected_nd = np.zeros((10, DIM))
    taken = set()
    for n in range(1, 10):
        x_d = X_ND[n].astype(np.float64)
        weights, chosen = numpy_route(layer.cfg, x_d @ router_de, None)
        for weight, e in zip(weights, chosen):
            if e not in taken:
                taken.add(e)
                expected_nd[n] += weight * numpy_swiglu(x_d, w[0][e], w[1][e], w[2][e])
    valid = np.asarray(mask_bt).reshape(10)
    np.testing.assert_allclose(
        np.asarray(y_btd).reshape(10, DIM)[valid], expected_nd[valid], rtol=2e-5, atol=2e-6
    )
    np.testing.assert_allclose(aux.dropped_fraction, 1 - len(taken) / 18, rtol=1e-6)


def test_capacity_drop_by_score_keeps_each_experts_highest_logit():
    layer = make_layer(impl="capacity", capacity_factor=0.1, min_capacity=1, drop_policy="score")
    y_btd, aux = forward(layer, X_BTD, all_valid(X_BTD))
    logits_ne = X_ND.astype(np.float64) @ f64(layer.router.kernel)
    best = {}  # expert -> (logit, token, weight)
    for n in range(10):
        weights, chosen = numpy_route(layer.cfg, logits_ne[n], None)
        for weight, e in zip(weights, chosen):
            if e not in best or logits_ne[n, e] > best[e][0]:
                best[e] = (logits_ne[n, e], n, weight)
    bank = layer.experts
    w = [f64(v) for v in (bank.w_gate_edf, bank.w_up_edf, bank.w_down_efd)]
    expected_nd = np.zeros((10, DIM))
    for e, (_, n, weight) in best.items():
        expected_nd[n] += weight * numpy_swiglu(
            X_ND[n].astype(np.float64), w[0][e], w[1][e], w[2][e]
        )
    np.testing.assert_allclose(y_btd.reshape(10, DIM), expected_nd, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(aux.dropped_fraction, 1 - len(best) / 20, rtol=1e-6)


def test_capacity_large_enough_matches_dropless():
    dropless = make_layer()
    capacity = make_layer(impl="capacity", capacity_factor=4.0)
    y_dropless, _ = forward(dropless, X_BTD, all_valid(X_BTD))
    y_capacity, aux = forward(capacity, X_BTD, all_valid(X_BTD))
    np.testing.assert_allclose(y_capacity, y_dropless, rtol=1e-5, atol=1e-6)
    assert aux.dropped_fraction == 0


def test_dropless_view_lifts_the_capacity_as_generation_needs():
    dropless = make_layer()
    capacity = make_layer(impl="capacity", capacity_factor=0.1, min_capacity=1)
    y_dropless, _ = forward(dropless, X_BTD, all_valid(X_BTD))
    _, aux = forward(capacity, X_BTD, all_valid(X_BTD))
    assert aux.dropped_fraction > 0.5
    lifted = nnx.view(capacity, dropless=True)
    y_lifted, aux = forward(lifted, X_BTD, all_valid(X_BTD))
    np.testing.assert_allclose(y_lifted, y_dropless, rtol=1e-5, atol=1e-6)
    assert aux.dropped_fraction == 0


def test_router_bias_is_selection_only_and_not_a_param():
    layer = make_layer("sigmoid_bias", bias_update_rate=1e-3)
    assert isinstance(layer.router_bias, RouterBias)
    params = nnx.state(layer, nnx.Param)
    assert not any("router_bias" in map(str, path) for path, _ in nnx.to_flat_state(params))
    # A large bias forces expert 3 into every token's top-2, but its weight stays its score.
    layer.router_bias[...] = jnp.array([0.0, 0.0, 0.0, 100.0])
    y_btd, aux = forward(layer, X_BTD, all_valid(X_BTD))
    np.testing.assert_array_equal(aux.expert_counts_be[:, 3], [5, 5])
    expected_nd, _ = numpy_moe(layer, X_ND)
    np.testing.assert_allclose(y_btd.reshape(10, DIM), expected_nd, rtol=2e-5, atol=2e-6)
    # The router gradient exists; the bias is in no Param gradient.
    grads = nnx.grad(lambda m: jnp.sum(m(X_BTD)[0] ** 2))(layer)
    assert "router_bias" not in grads and np.any(grads["router"]["kernel"][...] != 0)


def stochastic_layer(**kw) -> MoELayer:
    cfg = MoEConfig(num_experts=NUM_EXPERTS, router="softmax_topk", kernel_impl="ragged_dot", **kw)
    return MoELayer(DIM, cfg, ffn_dim=FFN, rngs=nnx.Rngs(0, router=1))


@pytest.mark.parametrize("kw", [dict(second_choice="gumbel"), dict(jitter_eps=0.3)])
def test_sampling_only_in_training_and_deterministic_view_is_plain_routing(kw):
    layer = stochastic_layer(**kw)
    plain = stochastic_layer()
    for (path, var), (_, plain_var) in zip(
        nnx.to_flat_state(nnx.state(layer, nnx.Param)),
        nnx.to_flat_state(nnx.state(plain, nnx.Param)),
    ):
        plain_var.set_value(var.get_value())
    y_plain, _ = forward(plain, X_BTD, all_valid(X_BTD))
    y_eval, _ = forward(nnx.view(layer, deterministic=True), X_BTD, all_valid(X_BTD))
    np.testing.assert_array_equal(y_eval, y_plain)
    y_train_1, aux_1 = forward(layer, X_BTD, all_valid(X_BTD))
    y_train_2, _ = forward(layer, X_BTD, all_valid(X_BTD))
    assert not np.allclose(y_train_1, y_plain) and not np.allclose(y_train_1, y_train_2)
    if "second_choice" in kw:
        # The first choice stays the argmax: each token still uses its top expert.
        top_n = np.argmax(X_ND @ np.asarray(layer.router.kernel[...]), axis=-1)
        top_counts = np.bincount(top_n, minlength=NUM_EXPERTS)
        assert np.all(np.asarray(aux_1.expert_counts_be).sum(0) >= top_counts)


def test_gumbel_at_inference_samples_the_second_choice_in_the_deterministic_view():
    """Uni-MoE 8E as DeepSpeed evaluates it: the second expert is still drawn at inference."""
    layer = stochastic_layer(second_choice="gumbel", gumbel_at_inference=True)
    plain = stochastic_layer()
    nnx.update(plain, nnx.state(layer, nnx.Param))
    evaluated = nnx.view(layer, deterministic=True)
    y_plain, _ = forward(plain, X_BTD, all_valid(X_BTD))
    y_1, _ = forward(evaluated, X_BTD, all_valid(X_BTD))
    y_2, _ = forward(evaluated, X_BTD, all_valid(X_BTD))
    assert not np.allclose(y_1, y_plain) and not np.allclose(y_1, y_2)
    with pytest.raises(ValueError, match="gumbel_at_inference"):
        MoEConfig(num_experts=NUM_EXPERTS, router="softmax_topk", gumbel_at_inference=True)


def test_deterministic_configs_carry_no_rng_state():
    layer = make_layer()
    assert layer.router_rngs is None and layer.router_bias is None
    assert layer.shared_experts is None and layer.shared_gate is None


@pytest.mark.parametrize("impl", ["dropless", "capacity"])
def test_every_aux_key_present_with_its_shape(impl):
    kw = dict(capacity_factor=1.0) if impl == "capacity" else {}
    layer = make_layer("top_p", num_null_experts=1, k_max=2, impl=impl, **kw)
    y_btd, aux = forward(layer, X_BTD, all_valid(X_BTD))
    assert y_btd.shape == X_BTD.shape
    balance_sums = {"balance_assignments_e", "balance_prob_sums_e", "balance_tokens"}
    assert {f.name for f in dataclasses.fields(aux)} == {
        *AUX_SCALARS, "expert_load", "expert_counts_be", *balance_sums, "balance_loss_form"
    }
    for name in (*AUX_SCALARS, "balance_tokens"):
        value = getattr(aux, name)
        assert value.shape == () and value.dtype == jnp.float32, name
    assert aux.expert_load.shape == (4,) and aux.expert_counts_be.shape == (2, 4)
    # The pooled balance sums span every router column, the null expert included.
    assert aux.balance_assignments_e.shape == aux.balance_prob_sums_e.shape == (5,)


def test_router_stays_float32_for_bfloat16_activations():
    layer = make_layer("topk_softmax", num_shared_experts=1, shared_gate=True)
    y_btd, aux = forward(layer, X_BTD.astype(jnp.bfloat16), all_valid(X_BTD))
    assert y_btd.dtype == jnp.bfloat16
    assert aux.balance_loss.dtype == jnp.float32 and aux.z_loss.dtype == jnp.float32


def test_shared_experts_are_one_swiglu_of_the_summed_width():
    layer = make_layer(num_shared_experts=3, shared_ffn_dim=4)
    assert layer.shared_experts.gate.kernel[...].shape == (DIM, 12)
    assert make_layer(num_shared_experts=2).shared_experts.up.kernel[...].shape == (DIM, 2 * FFN)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_experts=3, top_k=4), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(num_experts=0), "num_experts"),
        (dict(router="sinkhorn"), "router"),
        (dict(impl="gshard"), "impl"),
        (dict(impl="capacity"), "capacity_factor"),
        (dict(capacity_factor=1.5), "capacity_factor"),
        (dict(impl="capacity", capacity_factor=1.0, drop_policy="random"), "drop_policy"),
        (dict(impl="capacity", capacity_factor=1.0, min_capacity=-1), "min_capacity"),
        (dict(ffn_dim=-1), "ffn_dim"),
        (dict(second_choice="gumbel"), "second_choice"),
        (dict(second_choice="sample", router="softmax_topk"), "second_choice"),
        (dict(router="top_p", top_p=0.0), "top_p"),
        (dict(router="top_p", k_max=5), "k_max"),
        (dict(router="sigmoid_bias", num_null_experts=1), "num_null_experts"),
        (dict(num_null_experts=-1), "num_null_experts"),
        (dict(shared_gate=True), "shared_gate"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
        (dict(shared_ffn_dim=-1), "shared_ffn_dim"),
        (dict(num_experts=4, num_groups=3), "num_groups"),
        (dict(num_experts=4, num_groups=2, top_groups=3), "top_groups"),
        (dict(num_experts=4, num_groups=2, top_groups=1), "top_groups"),  # topk_softmax
        (
            dict(router="softmax_topk", num_experts=4, top_k=3, num_groups=2, top_groups=1),
            "top_groups",
        ),
        (dict(router="group_equal", num_experts=6, top_k=3, num_groups=2), "num_groups"),
        (dict(routed_scaling=0.0), "routed_scaling"),
        (dict(jitter_eps=1.0), "jitter_eps"),
        (dict(bias_update_rate=0.1), "bias_update_rate"),
        (dict(kernel_impl="triton"), "kernel_impl"),
    ],
)
def test_config_rejects_impossible_settings(kwargs, field):
    with pytest.raises(ValueError, match=f"MoEConfig.{field}"):
        MoEConfig(**kwargs)


def test_every_router_is_registered_and_returns_k_slots():
    assert set(routers.ROUTERS) == {
        "topk_softmax", "softmax_topk", "top_p", "sigmoid_bias", "group_equal"
    }
    logits_ne = jnp.asarray(np.random.default_rng(0).normal(size=(6, NUM_EXPERTS)), jnp.float32)
    state = routers.RouterState(bias_e=jnp.zeros((NUM_EXPERTS,), jnp.float32))
    for name, router in routers.ROUTERS.items():
        kw = dict(num_groups=2) if name == "group_equal" else {}
        cfg = MoEConfig(num_experts=NUM_EXPERTS, router=name, **kw)
        routed = router(logits_ne, cfg, state)
        assert routed.weights_nk.shape == routed.columns_nk.shape == (6, cfg.num_slots), name
        assert routed.expert_sort is None, name
