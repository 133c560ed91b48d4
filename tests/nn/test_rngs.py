"""Modules built inside a trace with `traceable_rngs`: the draws of `nnx.Rngs`, without the
walks over the traced program that made a paper-scale build quadratic."""

import jax
import numpy as np
from flax import nnx
from jax._src.interpreters import partial_eval

from unimoe.nn.lora import Linear, LoRAConfig
from unimoe.nn.rngs import traceable_rngs


def _layers(rngs: nnx.Rngs) -> nnx.List:
    # LoRA dropout keeps an RNG stream (key and counter) in the module's state.
    lora = LoRAConfig(rank=2, dropout=0.1)
    return nnx.List([Linear(6, 5, lora=lora, rngs=rngs) for _ in range(3)])


def _key_data(x: jax.Array) -> np.ndarray:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def test_a_traced_build_never_walks_the_traced_program(monkeypatch):
    walks = []
    find_progenitors = partial_eval.JaxprStackFrame.find_progenitors

    def counting(frame, tracer):
        walks.append(1)
        return find_progenitors(frame, tracer)

    # Reached from a tracer's missing-attribute message (`_origin_msg`), once per RNG draw with
    # plain counters: a walk over every equation traced so far.
    monkeypatch.setattr(partial_eval.JaxprStackFrame, 'find_progenitors', counting)
    nnx.eval_shape(lambda: _layers(traceable_rngs(0)))
    jax.jit(lambda: nnx.state(_layers(traceable_rngs(0)))).trace()
    assert not walks
    nnx.eval_shape(lambda: _layers(nnx.Rngs(0)))
    assert walks, 'the probe no longer sees the walk of plain counters'


def test_a_jitted_build_draws_what_plain_rngs_draw():
    built = jax.jit(lambda: nnx.state(_layers(traceable_rngs(5))))()
    expected = dict(nnx.to_flat_state(jax.jit(lambda: nnx.state(_layers(nnx.Rngs(5))))()))
    flat = dict(nnx.to_flat_state(built))
    assert flat.keys() == expected.keys()
    assert any(isinstance(v, nnx.RngCount) for v in flat.values())
    for path, variable in flat.items():
        np.testing.assert_array_equal(
            _key_data(variable.get_value()), _key_data(expected[path].get_value()), str(path)
        )
