"""Sharded training state: a mesh and rules from config, directly sharded init, sharded batches,
and the train step jitted with explicit in / out shardings: the one jit site of training.

Every run has a Plan: without `config.mesh` it is a one-device mesh, so one-device training is the
mesh case and takes the same path (init, placement, restore, step) as a pod.

Nothing here copies a full model through the host: `init_module` and `init_optimizer` run the
initialisers under `jax.jit` with `out_shardings`, so each device materialises only its shards.
Batches arrive per process (each host reads its own rows) and are assembled into global arrays
with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from unimoe.nn import sharding
from unimoe.nn.rngs import traceable_rngs
from unimoe.parallel import mesh as mesh_lib, rules as rules_lib


@dataclasses.dataclass(frozen=True)
class Plan:
    """A mesh and the logical-to-mesh rules every sharding of a run is derived from."""

    mesh: jax.sharding.Mesh
    rules: Mapping[str, tuple[str, ...]]

    def shardings(self, tree: Any) -> Any:
        """NamedShardings for a state tree (arrays or ShapeDtypeStructs), by parameter path."""
        return rules_lib.tree_shardings(tree, self.mesh, self.rules)

    def batch_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        return NamedSharding(
            self.mesh, sharding.batch_spec(shape, dict(self.mesh.shape), self.rules)
        )

    @property
    def batch_shards(self) -> int:
        """How many ways the global batch is split (the 'batch' rule's mesh axes)."""
        sizes = dict(self.mesh.shape)
        return int(np.prod([sizes[a] for a in self.rules['batch']]))

    def context(self):
        """Trace under this: activation constraints apply and `jax.set_mesh` is active."""
        return sharding.use_rules(self.mesh, self.rules)


def make_plan(mesh: Mapping[str, int] | None, rules: sharding.Rules | None = None) -> Plan:
    """A run's Plan: the mesh `mesh` ({axis: size}, one size may be -1) over every process's
    devices, or without one a one-device mesh on this process's first device; `rules` default to
    `DEFAULT_RULES`. An experiment passes its `config.mesh` and `config.sharding_rules`."""
    devices = None if mesh else jax.local_devices()[:1]
    return Plan(
        mesh_lib.make_mesh(dict(mesh or {}), devices),
        rules_lib.parse_rules(None) if rules is None else dict(rules),
    )


ModuleT = Any


def init_module(plan: Plan, build: Callable[[nnx.Rngs], ModuleT], seed: int) -> ModuleT:
    """`build(nnx.Rngs(seed))` with every variable created directly in its shards (jit with
    out_shardings).

    On a one-device mesh `build` runs eagerly and is placed: under jit XLA fuses the
    initialisers and the last bit of many values changes (72 of the test model's 149 leaves),
    which would change every number a one-device run has ever reported. Traced (for the shapes,
    then under jit), `build` gets `traceable_rngs(seed)`: the same draws, in time linear in the
    number of parameters.
    """
    if plan.mesh.size == 1:
        graphdef, state = nnx.split(build(nnx.Rngs(seed)))
        return nnx.merge(graphdef, place(plan, state))

    def build_traced() -> ModuleT:
        return build(traceable_rngs(seed))

    graphdef, abstract_state = nnx.split(nnx.eval_shape(build_traced))
    shardings = plan.shardings(abstract_state)

    def init_state():
        return nnx.split(build_traced())[1]

    state = run_once(jax.jit(init_state, out_shardings=shardings))
    return nnx.merge(graphdef, state)


def init_optimizer(plan: Plan, tx: optax.GradientTransformation, params: Any) -> Any:
    """`tx.init(params)` with the moments sharded like their parameters."""
    shardings = plan.shardings(jax.eval_shape(tx.init, params))
    return run_once(jax.jit(tx.init, out_shardings=shardings), params)


# Initialisers run once: XLA's optimisations cost more compile time than they save (the tiny
# UniMoE's sharded init compiles in 11 s instead of 25 s on the project's CPU).
_RUN_ONCE_OPTIONS = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def run_once(jitted: Any, *args: Any) -> Any:
    """`jitted(*args)`, compiled with the cheap options of a function that runs once."""
    return jitted.lower(*args).compile(_RUN_ONCE_OPTIONS)(*args)


def place(plan: Plan, tree: Any) -> Any:
    """`tree` resharded by the rules (e.g. after host-side parameter loading or a restore).

    Host values (numpy, or arrays on one local device) must be the same in every process: each
    process copies in only the shards its devices hold.
    """

    def put(leaf: Any, sharding: NamedSharding) -> jax.Array:
        if isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
            return leaf  # already in place (a sharded init): no copy through the host
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return jax.device_put(leaf, sharding)
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # RNG streams: via their data
            data = put(jax.random.key_data(leaf), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, plan.shardings(tree))


def with_shardings(plan: Plan, abstract_tree: Any) -> Any:
    """ShapeDtypeStructs carrying the rule shardings (restore targets for orbax)."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_tree,
        plan.shardings(abstract_tree),
    )


def shard_batch(plan: Plan, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Global arrays from this process's rows (its slice of the global batch, in process order)."""
    if jax.process_count() == 1:
        # The rows are the global batch. `device_put` is asynchronous: the next batch is read
        # while this step runs; `make_array_from_process_local_data` waited for the device (the
        # tiny test stage's step took 22 ms instead of 17, 2026-12-07).
        shardings = {key: plan.batch_sharding(np.shape(v)) for key, v in local_batch.items()}
        return jax.device_put(dict(local_batch), shardings)
    out = {}
    for key, local in local_batch.items():
        local = np.asarray(local)
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        sharding = plan.batch_sharding(global_shape)
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


def jit_step(
    plan: Plan, step_fn: Callable[..., Any], *, donate: bool = True
) -> Callable[..., Any]:
    """`step_fn(trainable, opt_state, rest, batch, step_index)` jitted with explicit shardings.

    The first call's (or `lower`'s) arguments, arrays or ShapeDtypeStructs, give the structure:
    the state keeps its rule shardings across steps, the batch is split over the 'batch' axes,
    metrics are replicated. Calls trace under `plan.context()` (activation constraints,
    `set_mesh`). Jitting the same `step_fn` again (the next same-shaped stage, a resume) reuses
    JAX's compiled program.
    """
    replicated = NamedSharding(plan.mesh, jax.sharding.PartitionSpec())
    jitted: list[Any] = []  # the jitted step and its state shardings, from the first call

    def jit_for(trainable: Any, opt_state: Any, rest: Any, batch: Mapping[str, Any]) -> Any:
        if not jitted:
            state_shardings = tuple(plan.shardings(t) for t in (trainable, opt_state, rest))
            batch_shardings = {k: plan.batch_sharding(tuple(v.shape)) for k, v in batch.items()}
            step = jax.jit(
                step_fn,
                in_shardings=(*state_shardings, batch_shardings, replicated),
                out_shardings=(*state_shardings, replicated),
                donate_argnums=(0, 1, 2) if donate else (),
            )
            jitted.extend((step, state_shardings))
        return jitted[0]

    def call(trainable: Any, opt_state: Any, rest: Any, *batch_and_index: Any) -> Any:
        first = not jitted
        step = jit_for(trainable, opt_state, rest, batch_and_index[0])
        if first:
            # The state comes back committed to its shardings; a first state that is not (fresh
            # arrays) would make the second call compile the step again.
            trainable, opt_state, rest = jax.device_put((trainable, opt_state, rest), jitted[1])
        with plan.context():
            return step(trainable, opt_state, rest, *batch_and_index)

    def lower(*args: Any) -> Any:
        with plan.context():
            return jit_for(*args[:4]).lower(*args)

    call.lower = lower  # type: ignore[attr-defined]
    return call
