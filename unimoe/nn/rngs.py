"""RNG streams for building a module inside a trace (`jax.eval_shape`, `jax.jit`)."""

from __future__ import annotations

from flax import nnx


def traceable_rngs(seed: int) -> nnx.Rngs:
    """`nnx.Rngs(seed)` whose streams' counters are array refs; create it inside the trace.

    A plain counter becomes a tracer, and each draw's increment makes flax compare shardings with
    `getattr(tracer, 'sharding', None)`, whose AttributeError message walks the whole traced
    program so far (jax's `find_progenitors`): a build is quadratic in the number of parameters.
    The paper-scale UniMoE (7B LM, 32 layers) took 40 s under `nnx.eval_shape` and 57 s to trace
    under `jax.jit` on the project's 2-core CPU. A ref's update is not such a comparison. The
    draws are the same (same keys, same counts), and a jitted build returns the counters as plain
    arrays. Only the counters are refs: parameters as refs do not survive `eval_shape`.
    """
    with nnx.var_defaults(ref=True):
        return nnx.Rngs(seed)
