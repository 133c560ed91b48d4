"""Expert-parallel MoE layer (shard_map + all_to_all) against the single-device layer, on 8
simulated CPU devices: forward, aux statistics and gradients; capacity drops against a hand count;
the exchanged bytes against the formula and the compiled HLO's all-to-alls."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from tests.moe.test_dispatch import dense_reference
from tests.moe.test_layer import random_module
from unimoe.moe import expert_parallel, routers
from unimoe.moe.config import MoEConfig
from unimoe.moe.layer import MoELayer
from unimoe.nn import sharding
from unimoe.nn.lora import LoRAConfig

DIM, FFN, NUM_EXPERTS = 7, 11, 8
BATCH, SEQ = 4, 8  # 32 tokens: 4 per device on 8 token shards


def make_layer(lora_rank: int = 0, lora_dropout: float = 0.0, **kw) -> MoELayer:
    kw.setdefault("num_experts", NUM_EXPERTS)
    kw.setdefault("top_k", 2)
    cfg = MoEConfig(**kw)
    lora = LoRAConfig(rank=lora_rank, dropout=lora_dropout)
    return random_module(lambda: MoELayer(DIM, cfg, ffn_dim=FFN, lora=lora, rngs=nnx.Rngs(0)), 3)


def inputs(seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    x_btd = jnp.asarray(rng.normal(size=(BATCH, SEQ, DIM)), jnp.float32)
    # Right padding on two examples: padding takes no capacity and is compared nowhere.
    mask_bt = np.ones((BATCH, SEQ), bool)
    mask_bt[1, 5:] = False
    mask_bt[3, 2:] = False
    cotangent_btd = jnp.asarray(rng.normal(size=(BATCH, SEQ, DIM)), jnp.float32)
    return x_btd, jnp.asarray(mask_bt), cotangent_btd


def loss_and_grads(layer: MoELayer, x_btd, mask_bt, cotangent_btd):
    """A loss reading the output at valid tokens and the balance loss; grads for params and x."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss_fn(params, x_btd):
        model = nnx.merge(graphdef, params, rest, copy=True)
        y_btd, aux = model(x_btd, mask_bt)
        valid = mask_bt[..., None].astype(jnp.float32)
        return jnp.sum(y_btd * cotangent_btd * valid) + aux.balance_loss, (y_btd, aux)

    (loss, (y_btd, aux)), grads = jax.jit(jax.value_and_grad(loss_fn, (0, 1), has_aux=True))(
        params, x_btd
    )
    return loss, y_btd, aux, grads


def assert_close_trees(got, want, tol):
    flat_got, flat_want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(flat_got) == len(flat_want)
    for g, w in zip(flat_got, flat_want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)


CASES = [
    ((8,), ("expert",), dict(kernel_impl="tiles", lora_rank=2)),
    (
        (2, 4),
        ("data", "expert"),
        dict(expert_parallel="all_gather", router="softmax_topk", kernel_impl="tiles"),
    ),
    ((2, 4), ("data", "expert"), dict(kernel_impl="ragged_dot", num_shared_experts=1)),
    (
        (2, 4),
        ("data", "expert"),
        dict(router="top_p", top_p=0.6, k_max=3, num_null_experts=1, kernel_impl="tiles"),
    ),
]


@pytest.mark.parametrize("shape,names,kw", CASES)
def test_expert_parallel_layer_equals_single_device(shape, names, kw):
    """Same output at valid tokens, same aux statistics, same gradients (params and input).

    Tolerance 1e-5: the same float32 sums, grouped into different tiles and, for the weight
    gradients, summed over token shards in another order.
    """
    layer = make_layer(**kw)
    x_btd, mask_bt, cotangent_btd = inputs()
    want = loss_and_grads(layer, x_btd, mask_bt, cotangent_btd)
    with jax.set_mesh(jax.make_mesh(shape, names)):
        got = loss_and_grads(layer, x_btd, mask_bt, cotangent_btd)
    valid = np.asarray(mask_bt)[..., None]
    np.testing.assert_allclose(
        np.asarray(got[1]) * valid, np.asarray(want[1]) * valid, rtol=1e-5, atol=1e-5
    )
    assert float(got[2].dropped_fraction) == 0.0
    assert_close_trees(got[2], want[2], 1e-6)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    assert_close_trees(got[3], want[3], 1e-5)
    # The comparison has something to compare: the routed experts got gradients.
    assert float(jnp.abs(want[3][0]["experts"]["w_down_efd"][...]).max()) > 1e-3


def test_tokens_split_over_the_batch_rule_axes():
    """The token shards are the sharding rules' 'batch' axes (then 'seq'), the defaults under a
    bare set_mesh; the layer equals the single-device layer with tokens split over data x expert
    by the rules, and refuses rules that keep the tokens whole over `expert`."""
    mesh = jax.make_mesh((2, 4), ("data", "expert"))
    with jax.set_mesh(mesh):
        assert expert_parallel.token_axes() == ("data", "expert")
    layer = make_layer(kernel_impl="tiles")
    x_btd, mask_bt, cotangent_btd = inputs()
    want = loss_and_grads(layer, x_btd, mask_bt, cotangent_btd)
    rules = {**sharding.DEFAULT_RULES, "batch": ("expert",), "seq": ("data",)}
    with sharding.use_rules(mesh, rules):
        assert expert_parallel.token_axes() == ("expert", "data")
        got = loss_and_grads(layer, x_btd, mask_bt, cotangent_btd)
    valid = np.asarray(mask_bt)[..., None]
    np.testing.assert_allclose(
        np.asarray(got[1]) * valid, np.asarray(want[1]) * valid, rtol=1e-5, atol=1e-5
    )
    assert_close_trees(got[3], want[3], 1e-5)
    with sharding.use_rules(mesh, {**sharding.DEFAULT_RULES, "batch": ("data",)}):
        with pytest.raises(ValueError, match=r"rule 'batch' splits them over \('data',\)"):
            loss_and_grads(layer, x_btd, mask_bt, cotangent_btd)


def concentrate_on_first_experts(layer: MoELayer) -> None:
    """A zero router: equal logits, so every token picks experts 0 and 1 (top_k breaks ties by
    index), both on the first expert-parallel device when 4 devices hold 2 experts each."""
    kernel = layer.router.kernel
    kernel.set_value(jnp.zeros_like(kernel.get_value()))


def test_dropless_when_every_token_goes_to_one_device():
    layer = make_layer(kernel_impl="tiles")
    concentrate_on_first_experts(layer)
    x_btd, mask_bt, _ = inputs()
    want_y, _ = nnx.jit(lambda m, x: m(x, mask_bt))(layer, x_btd)
    with jax.set_mesh(jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)):
        got_y, aux = nnx.jit(lambda m, x: m(x, mask_bt))(layer, x_btd)
    assert float(aux.dropped_fraction) == 0.0
    np.testing.assert_allclose(np.asarray(aux.expert_load)[:2], [0.5, 0.5])
    valid = np.asarray(mask_bt)[..., None]
    np.testing.assert_allclose(
        np.asarray(got_y) * valid, np.asarray(want_y) * valid, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("concentrated", [False, True])
def test_smaller_capacity_drops_the_hand_counted_overflow(concentrated):
    """ep_capacity_factor 1 on (data=2, expert=4): C = ceil(1 * 4 tokens * 2 / 4) = 2 rows per
    (sender, destination). Each token shard keeps the first 2 valid assignments per destination
    in (token, slot) order; the output is the single-device mix without the dropped ones."""
    layer = make_layer(kernel_impl="tiles", ep_capacity_factor=1.0)
    if concentrated:
        concentrate_on_first_experts(layer)
    x_btd, mask_bt, _ = inputs(seed=1)
    with jax.set_mesh(jax.make_mesh((2, 4), ("data", "expert"))):
        got_y, aux = nnx.jit(lambda m, x: m(x, mask_bt))(layer, x_btd)

    x_nd = x_btd.reshape(-1, DIM)
    routed = routers.route(layer.router(x_nd), layer.cfg, layer.router_state(), fused=False)
    weights_nk, experts_nk = routed.weights_nk, routed.columns_nk
    experts_nk, mask_n = np.asarray(experts_nk), np.asarray(mask_bt).reshape(-1)
    shards, ep_size, num_local, cap = 8, 4, NUM_EXPERTS // 4, 2
    per_shard = experts_nk.shape[0] // shards
    kept_nk = np.zeros(experts_nk.shape, bool)
    valid = dropped = 0
    for shard in range(shards):
        queue = [0] * ep_size
        for n in range(shard * per_shard, (shard + 1) * per_shard):
            for k in range(experts_nk.shape[1]):
                if not mask_n[n]:
                    continue
                dest = experts_nk[n, k] // num_local
                valid += 1
                kept_nk[n, k] = queue[dest] < cap
                dropped += not kept_nk[n, k]
                queue[dest] += 1
    assert dropped > 0
    assert float(aux.dropped_fraction) == pytest.approx(dropped / valid)
    kept_experts_nk = jnp.asarray(np.where(kept_nk, experts_nk, NUM_EXPERTS))
    want_nd = dense_reference(
        x_nd, weights_nk, kept_experts_nk, layer.experts.batched, NUM_EXPERTS
    )
    valid_n1 = mask_n[:, None]
    np.testing.assert_allclose(
        np.asarray(got_y).reshape(-1, DIM) * valid_n1,
        np.asarray(want_nd) * valid_n1,
        rtol=1e-5,
        atol=1e-5,
    )


def test_mailbox_capacity_rule():
    assert expert_parallel.mailbox_capacity(8, 4, 0.0) == 8  # cf = P: everything to one peer
    assert expert_parallel.mailbox_capacity(8, 4, 1.0) == 2
    assert expert_parallel.mailbox_capacity(8, 4, 1.5) == 3
    assert expert_parallel.mailbox_capacity(8, 4, 100.0) == 8
    with pytest.raises(ValueError, match="ep_capacity_factor"):
        expert_parallel.mailbox_capacity(8, 4, -1.0)


def test_choice_is_logged_and_bad_settings_fail_clearly(caplog):
    x_btd, mask_bt, _ = inputs()
    caplog.set_level("INFO", logger="unimoe.moe.layer")

    def trace(layer):
        # Tracing is enough: the layer logs its choice and checks its mesh at trace time.
        return jax.eval_shape(lambda x: layer(x, mask_bt), x_btd)

    with jax.set_mesh(jax.make_mesh((8,), ("expert",))):
        trace(make_layer())
        # Few rows per expert, but under a mesh the CPU keeps the tiles (`gmm.resolve_backend`).
        assert "expert-parallel dispatch (tiles)" in caplog.text
        assert "expert axis 8 (all_to_all)" in caplog.text
        caplog.clear()
        # 'off' keeps the single-device dispatch under the same mesh.
        trace(make_layer(expert_parallel="off"))
        assert "dropless dispatch" in caplog.text and "expert-parallel" not in caplog.text
        # 3 tokens do not split over 8 devices (a decode step): the single-device dispatch.
        caplog.clear()
        jax.eval_shape(lambda x: make_layer()(x, mask_bt[:1, :3]), x_btd[:1, :3])
        assert "3 tokens do not split over 8 token shards" in caplog.text
        assert "dropless dispatch" in caplog.text
        # 6 experts do not split over 8 devices: a clear error, not a wrong layout.
        with pytest.raises(ValueError, match="divisible by the `expert` mesh axis"):
            trace(make_layer(num_experts=6))
    with pytest.raises(ValueError, match="expert_parallel"):
        MoEConfig(expert_parallel="on")
    with pytest.raises(ValueError, match="ep_capacity_factor"):
        MoEConfig(ep_capacity_factor=-1.0)


ELEMENT_BYTES = {"f64": 8, "s64": 8, "f32": 4, "s32": 4, "bf16": 2, "f16": 2, "s8": 1, "pred": 1}


def hlo_all_to_all_bytes(hlo_text: str) -> int:
    """Sum over the compiled HLO's all-to-all ops of their result sizes (one device's share)."""
    total = 0
    for line in hlo_text.splitlines():
        if " all-to-all(" not in line:
            continue
        result_type = line.split(" = ", 1)[1].split(" all-to-all(", 1)[0]
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", result_type):
            total += ELEMENT_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def test_exchanged_bytes_match_formula_and_compiled_hlo():
    """ep_capacity_factor 1 (C = 2, not the dropless 8): the buffers follow the capacity rule."""
    capacity_factor = 1.0
    layer = make_layer(kernel_impl="tiles", ep_capacity_factor=capacity_factor)
    x_btd, mask_bt, cotangent_btd = inputs()
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def forward(params, x_btd):
        return nnx.merge(graphdef, params, rest, copy=True)(x_btd, mask_bt)[0]

    def loss(params, x_btd):
        return jnp.sum(forward(params, x_btd) * cotangent_btd)

    with jax.set_mesh(jax.make_mesh((2, 4), ("data", "expert"))):
        forward_hlo = jax.jit(forward).lower(params, x_btd).compile().as_text()
        step_hlo = jax.jit(jax.grad(loss, (0, 1))).lower(params, x_btd).compile().as_text()
    # 32 tokens over 8 token shards, K = 2, P = 4: C = ceil(1 * 4 * 2 / 4) = 2.
    want = expert_parallel.exchange_bytes(
        BATCH * SEQ // 8, 2, DIM, 4, capacity_factor, activation_bytes=4
    )
    rows = 4 * 2
    assert want.forward == 2 * rows * DIM * 4 + 4 * rows and want.backward == 2 * rows * DIM * 4
    assert hlo_all_to_all_bytes(forward_hlo) == want.forward
    assert hlo_all_to_all_bytes(step_hlo) == want.total
    assert want.off_device == want.total * 3 // 4


def test_lora_dropout_draws_per_device_masks_and_advances_the_stream():
    """Training with LoRA dropout: the caller's stream advances each call (new masks next time)
    and each device folds in its index (the same rows on two token shards get different masks).
    In eval mode the layer equals the single-device one."""
    layer = make_layer(kernel_impl="tiles", lora_rank=2, lora_dropout=0.5)
    stream = layer.experts.lora_dropout.rngs
    # rbg keys: threefry's dropout masks take ~3x longer to compile on CPU, for the same test.
    stream.key.set_value(jax.random.key(1, impl="unsafe_rbg"))
    stream.count.set_value(jnp.zeros((), jnp.uint32))
    # 8 token shards of 4 tokens, all holding the same 4 tokens.
    x_btd = jnp.tile(inputs()[0][:1, :4], (BATCH, SEQ // 4, 1))
    call = nnx.jit(lambda m, x: m(x)[0])
    eval_layer = nnx.view(layer, deterministic=True)
    want_eval = call(eval_layer, x_btd)
    with jax.set_mesh(jax.make_mesh((2, 4), ("data", "expert"))):
        got_train = call(layer, x_btd)
        got_eval = call(eval_layer, x_btd)
    assert int(stream.count.get_value()) == 1
    np.testing.assert_allclose(np.asarray(got_eval), np.asarray(want_eval), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got_train, want_eval)
    shards = np.asarray(got_train).reshape(8, 4, DIM)
    assert not np.allclose(shards[0], shards[1])
