"""The fused routing kernel (interpret mode, `moe.fused_routing.route`) against its XLA reference
built on `moe.routing`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from unimoe.moe import dispatch, fused_routing as kroute

CASES = {
    # 37 tokens in blocks of 16: the edge block's 11 padding rows must count nowhere.
    "topk_softmax": (kroute.RouterSpec("topk_softmax", 2, 4), 37, 4),
    "softmax_topk_unnormalized": (
        kroute.RouterSpec("softmax_topk", 3, 8, renormalize=False),
        40,
        8,
    ),
    # 6 router columns, 5 routed experts: column 5 is a null expert, unused slots get id 6.
    "top_p_null_expert": (kroute.RouterSpec("top_p", 4, 5, top_p=0.6), 33, 6),
}


@functools.partial(jax.jit, static_argnames=("spec", "reference"))
def routing_and_grad(logits, probe, *, spec, reference):
    fn = kroute.route_reference if reference else functools.partial(kroute.route, block_tokens=16)
    routed, vjp = jax.vjp(lambda x: fn(x, spec), logits)
    cotangent = jax.tree.map(jnp.zeros_like, routed)._replace(weights_nk=probe)
    cotangent = jax.tree.map(
        lambda c, r: (
            c if jnp.issubdtype(r.dtype, jnp.floating) else np.zeros(r.shape, jax.dtypes.float0)
        ),
        cotangent,
        routed,
    )
    return routed, vjp(cotangent)[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_routing_matches_reference(case):
    spec, num_tokens, num_columns = CASES[case]
    logits = 2 * jax.random.normal(jax.random.key(num_tokens), (num_tokens, num_columns))
    probe = jax.random.normal(jax.random.key(1), (num_tokens, spec.k))
    got, got_grad = routing_and_grad(logits, probe, spec=spec, reference=False)
    want, want_grad = routing_and_grad(logits, probe, spec=spec, reference=True)
    np.testing.assert_array_equal(got.columns_nk, want.columns_nk)
    np.testing.assert_array_equal(got.group_sizes_e, want.group_sizes_e)
    np.testing.assert_array_equal(got.rank_m, want.rank_m)
    np.testing.assert_allclose(got.weights_nk, want.weights_nk, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-6)
    # The rank is the dispatch's stable expert sort: a permutation, routed experts first.
    experts_nk = jnp.minimum(got.columns_nk, spec.num_experts)
    _, _, rank_m, sizes_e = dispatch._sort_by_expert(experts_nk, spec.num_experts)
    np.testing.assert_array_equal(got.rank_m, rank_m)
    np.testing.assert_array_equal(got.group_sizes_e, sizes_e)
    if case == "top_p_null_expert":
        assert np.any(np.asarray(got.columns_nk) == num_columns)  # some unused slots
        assert int(got.group_sizes_e.sum()) < got.rank_m.size  # sentinels are in no group


def test_fused_routing_in_tpu_simulator_has_no_races_or_revisits():
    """The simulator also rejects an output block revisited after another one (the TPU
    writes a block back when its index changes and never reads it back)."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call

    spec = kroute.RouterSpec("top_p", 3, 5)
    logits = jax.random.normal(jax.random.key(3), (24, 6))
    params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
    got = kroute.route(logits, spec, block_tokens=8, interpret=params)
    assert not interpret_pallas_call.races.races_found
    for g, w in zip(got, kroute.route_reference(logits, spec)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_fused_routing_lowers_for_tpu():
    logits = jax.ShapeDtypeStruct((512, 8), jnp.float32)
    spec = kroute.RouterSpec("softmax_topk", 2, 8)
    lowered = jax.jit(lambda x: kroute.route(x, spec, platform="tpu", interpret=False)).trace(
        logits
    )
    assert "@tpu_custom_call(" in lowered.lower(lowering_platforms=("tpu",)).as_text()


def test_unsupported_router_is_rejected():
    with pytest.raises(ValueError, match="fused routing supports"):
        kroute.route(jnp.zeros((4, 4)), kroute.RouterSpec("sigmoid_bias", 2, 4))
