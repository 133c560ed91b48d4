"""Expert parallelism: the routed experts of an MoE layer split over the `expert` mesh axis.

Axis letters as in `dispatch`: N tokens, D model width, E experts, K slots per token, M = N*K
assignments; P = the expert-parallel degree (size of the `expert` axis), L = E / P experts per
device, C = rows per (sender, destination) mailbox.

`expert_parallel_dispatch` runs one `jax.shard_map` over the mesh set with `jax.set_mesh`:
tokens are split over the axes the sharding rules split the batch (and sequence) over
(`nn.sharding.token_axes`; by default data, fsdp and `expert` itself), expert weights over
`expert`. Each device, on its own tokens:
1. gives every routed assignment a mailbox slot: destination d = expert // L, its place in d's
   queue in (token, slot) order, kept when that place is < C. C is static and the same on every
   device: C = ceil(cf * N_local * K / P), at most N_local * K, so cf = P (the default) lets a
   device send all its assignments to one destination and nothing is ever dropped;
2. sends the [P, C, D] mailboxes (and their local expert ids, sentinel L for empty rows) with
   `jax.lax.all_to_all` over `expert`;
3. runs its L experts on the P * C rows it received with the single-device dropless dispatch
   (`dispatch.dropless_tiled_dispatch` / `dropless_dispatch`, one slot per row);
4. sends the results back with the reverse `all_to_all` and combines them with the router weights
   in float32, as the single-device layer does.
Routing and the auxiliary statistics stay outside (`MoELayer`), on the global batch, so they are
those of the single-device layer; shared experts stay outside too (no exchange).
Padding tokens (mask False) are sent nowhere: they take no capacity and their routed output is 0.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from unimoe.moe import dispatch
from unimoe.nn import sharding
from unimoe.moe.experts import ExpertBank
from unimoe.moe.gmm import gather_rows

log = logging.getLogger(__name__)

EXPERT_AXIS = "expert"
EXCHANGES = ("all_to_all", "all_gather")


def expert_parallel_size() -> int:
    """Size of the `expert` axis of the mesh set by `jax.set_mesh` (1 without one)."""
    return int(jax.sharding.get_abstract_mesh().shape.get(EXPERT_AXIS, 1))


def token_axes() -> tuple[str, ...]:
    """Mesh axes the tokens are split over: the sharding rules' batch (and sequence) axes."""
    return sharding.token_axes(jax.sharding.get_abstract_mesh().axis_names)


def token_shards() -> int:
    """How many pieces the tokens are split into: the product of the `token_axes` sizes."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in token_axes())


def mailbox_capacity(local_assignments: int, ep_size: int, capacity_factor: float) -> int:
    """C = ceil(cf * local_assignments / P), in [1, local_assignments]; cf = 0 means cf = P.

    With cf = P a device can send every assignment to one destination: dropless.
    """
    if capacity_factor < 0:
        raise ValueError(
            f"ep_capacity_factor must be >= 0 (0 = the EP degree), got {capacity_factor}"
        )
    factor = capacity_factor or ep_size
    return max(1, min(math.ceil(factor * local_assignments / ep_size), local_assignments))


@dataclasses.dataclass(frozen=True)
class ExchangeBytes:
    """Bytes one device hands to the expert all-to-alls of one MoE layer for one batch.

    The all-to-all buffers are [P, C, D] (tokens out, results back) and [P, C] int32 (the local
    expert ids, forward only); the backward pass sends the cotangents of both [P, C, D]
    exchanges. A device's own block (1 / P of each buffer) does not leave it.
    """

    ep_size: int
    capacity: int
    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward

    @property
    def off_device(self) -> int:
        """What crosses the interconnect: all but the device's own block."""
        return self.total * (self.ep_size - 1) // self.ep_size


def exchange_bytes(
    local_tokens: int,
    top_k: int,
    dim: int,
    ep_size: int,
    capacity_factor: float = 0.0,
    activation_bytes: int = 4,
) -> ExchangeBytes:
    """The formula: C = `mailbox_capacity(local_tokens * K, P, cf)`, rows R = P * C;
    forward = 2 * R * D * activation_bytes + 4 * R, backward = 2 * R * D * activation_bytes.
    The buffers are static, so the bytes do not depend on the routing (only what is padding)."""
    cap = mailbox_capacity(local_tokens * top_k, ep_size, capacity_factor)
    rows = ep_size * cap
    activations = rows * dim * activation_bytes
    return ExchangeBytes(
        ep_size=ep_size, capacity=cap, forward=2 * activations + 4 * rows, backward=2 * activations
    )


def _constrain(x: jax.Array, spec: P) -> jax.Array:
    """Puts x in `spec`'s layout: `reshard` on Explicit axes (shard_map asserts there instead of
    resharding), a sharding constraint on Auto ones."""
    mesh = jax.sharding.get_abstract_mesh()
    named = {
        a
        for part in spec
        if part is not None
        for a in (part if isinstance(part, tuple) else (part,))
    }
    types = {mesh.axis_types[mesh.axis_names.index(a)] for a in named}
    if types == {AxisType.Explicit}:
        return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, spec)


def _mailbox_slots(
    experts_nk: jax.Array, mask_n: jax.Array, num_local: int, ep_size: int, cap: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(slot_m: mailbox row of each assignment, P * C = none; kept_m; valid_m).

    Mailbox row d * C + q holds the q-th routed assignment (token order, then slot) bound for
    destination d, if q < C.
    """
    num_experts = num_local * ep_size
    experts_m = dispatch.sentinel_ids(experts_nk, num_experts).reshape(-1)
    top_k = experts_nk.shape[1]
    valid_m = (experts_m < num_experts) & jnp.repeat(mask_n.astype(bool), top_k)
    dest_m = jnp.where(valid_m, experts_m // num_local, ep_size)
    # One-hot over destinations (the sentinel P is all zeros): a running count is each
    # assignment's place in its destination's queue.
    onehot_mp = jax.nn.one_hot(dest_m, ep_size, dtype=jnp.int32)
    queue_m = jnp.sum((jnp.cumsum(onehot_mp, axis=0) - 1) * onehot_mp, axis=1)
    kept_m = valid_m & (queue_m < cap)
    slot_m = jnp.where(kept_m, dest_m * cap + queue_m, ep_size * cap)
    return slot_m, kept_m, valid_m


def _local_dispatch(
    bank: ExpertBank, x_rd: jax.Array, local_r: jax.Array, *, num_local: int, backend: str
) -> jax.Array:
    """The received rows through this device's experts (local id L = an empty row -> 0)."""
    ones_r1 = jnp.ones((x_rd.shape[0], 1), jnp.float32)
    if backend == "tiles":
        return dispatch.dropless_tiled_dispatch(
            x_rd,
            ones_r1,
            local_r[:, None],
            bank.gathered,
            num_local,
            tile=bank.tile_for(x_rd.shape[0], num_local),
        )
    return dispatch.dropless_dispatch(
        x_rd,
        ones_r1,
        local_r[:, None],
        functools.partial(bank.grouped, backend=backend),
        num_local,
    )


def _local_bank(graphdef, params, rest, dropout_key, token_axes_: tuple[str, ...]) -> ExpertBank:
    """This device's experts. The weights vary over `expert` only; made varying over the token
    axes too, every operand of the tiled loops has the same manual axes (check_vma), and the
    transpose of this cast sums the weight gradients over the token shards.

    With LoRA dropout active, the bank's dropout stream restarts from `dropout_key` (drawn
    outside, so the caller's stream advances) folded with this device's index: each device
    draws its own masks."""
    params = jax.tree.map(
        lambda w: jax.lax.pcast(w, tuple(a for a in token_axes_ if a != EXPERT_AXIS), to="varying"),
        params,
    )
    bank = nnx.merge(graphdef, params, rest)
    if dropout_key is not None:
        stream = bank.lora_dropout.rngs
        stream.key[...] = jax.random.fold_in(dropout_key, jax.lax.axis_index(token_axes_))
        stream.count[...] = jnp.zeros_like(stream.count[...])
    return bank


# (received rows x_rd, local expert id per row, L = none) -> y_rd: this device's experts.
LocalExpertFn = Callable[[jax.Array, jax.Array], jax.Array]


def _all_gather_exchange(
    x_nd, weights_nk, experts_nk, mask_n, run_local: LocalExpertFn, num_local: int
) -> jax.Array:
    """The all-gather / reduce-scatter variant: every device of an expert group gathers the
    group's tokens, runs its own experts on the assignments they got, and the partial outputs
    (float32, already weighted) are summed and split back with `psum_scatter`."""
    top_k = experts_nk.shape[1]
    gather = functools.partial(jax.lax.all_gather, axis_name=EXPERT_AXIS, axis=0, tiled=True)
    x_gd, weights_gk, experts_gk, mask_g = (
        gather(a) for a in (x_nd, weights_nk, experts_nk, mask_n)
    )
    first = jax.lax.axis_index(EXPERT_AXIS) * num_local
    mine_gk = (experts_gk >= first) & (experts_gk < first + num_local) & mask_g[:, None]
    local_m = jnp.where(mine_gk, experts_gk - first, num_local).reshape(-1)
    # One row per assignment (weight 1, so each row comes back exactly in x's dtype), then the
    # weighted sum in float32 as the single-device combine does.
    y_md = run_local(jnp.repeat(x_gd, top_k, axis=0), local_m)
    y_gd = jnp.einsum(
        "gkd,gk->gd",
        y_md.reshape(-1, top_k, y_md.shape[-1]).astype(jnp.float32),
        weights_gk.astype(jnp.float32),
    )
    y_nd = jax.lax.psum_scatter(y_gd, EXPERT_AXIS, scatter_dimension=0, tiled=True)
    return y_nd.astype(x_nd.dtype)


def _all_to_all_exchange(
    x_nd,
    weights_nk,
    experts_nk,
    mask_n,
    run_local: LocalExpertFn,
    num_local: int,
    ep_size: int,
    cap: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mailboxes out, local experts, results back, combine; (y_nd, dropped_m, valid_m)."""
    num_tokens, top_k = experts_nk.shape
    num_rows = num_tokens * top_k
    num_slots = ep_size * cap
    slot_m, kept_m, valid_m = _mailbox_slots(experts_nk, mask_n, num_local, ep_size, cap)
    # Mailbox row -> the assignment filling it (M = empty), then gathers both ways.
    filler_s = jnp.full((num_slots + 1,), num_rows).at[slot_m].set(jnp.arange(num_rows))[:-1]
    filled_s = filler_s < num_rows
    token_s = jnp.where(filled_s, filler_s // top_k, num_tokens)
    experts_m = experts_nk.reshape(-1)
    local_s = jnp.where(
        filled_s, experts_m[jnp.minimum(filler_s, num_rows - 1)] % num_local, num_local
    )
    x_sd = gather_rows(x_nd, token_s, slot_m.reshape(num_tokens, top_k))

    exchange = functools.partial(
        jax.lax.all_to_all, axis_name=EXPERT_AXIS, split_axis=0, concat_axis=0
    )
    x_recv_pcd = exchange(x_sd.reshape(ep_size, cap, -1))
    local_recv_pc = exchange(local_s.reshape(ep_size, cap).astype(jnp.int32))
    y_rd = run_local(x_recv_pcd.reshape(num_slots, -1), local_recv_pc.reshape(-1))
    y_sd = exchange(y_rd.reshape(ep_size, cap, -1)).reshape(num_slots, -1)

    y_md = gather_rows(y_sd, slot_m, filler_s[:, None])
    y_nd = dispatch.combine(y_md.reshape(num_tokens, top_k, -1), weights_nk, x_nd.dtype)
    return y_nd, valid_m & ~kept_m, valid_m


def _shard_body(
    x_nd,
    weights_nk,
    experts_nk,
    mask_n,
    params,
    rest,
    dropout_key,
    *,
    graphdef,
    exchange: str,
    num_local: int,
    ep_size: int,
    cap: int,
    backend: str,
    sum_axes: tuple[str, ...],
):
    """One device's part: (y_nd of its tokens, dropped and valid assignment counts, psummed)."""
    bank = _local_bank(graphdef, params, rest, dropout_key, sum_axes)
    run_local = functools.partial(
        _local_dispatch, bank, num_local=num_local, backend=backend
    )
    if exchange == "all_gather":
        y_nd = _all_gather_exchange(x_nd, weights_nk, experts_nk, mask_n, run_local, num_local)
        return y_nd, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    y_nd, dropped_m, valid_m = _all_to_all_exchange(
        x_nd, weights_nk, experts_nk, mask_n, run_local, num_local, ep_size, cap
    )
    num_dropped = jax.lax.psum(jnp.sum(dropped_m.astype(jnp.float32)), sum_axes)
    num_valid = jax.lax.psum(jnp.sum(valid_m.astype(jnp.float32)), sum_axes)
    return y_nd, num_dropped, num_valid


def _local_backend(backend: str) -> str:
    """The grouped-matmul backend of the local experts inside the shard_map."""
    if backend != "pallas":
        return backend
    # The Pallas gmm's block index maps fail shard_map's check_vma on varying group metadata
    # (interpret mode, jax 0.10.2); ragged_dot passes, so the local experts use it for now.
    log.info("expert parallelism: local experts on ragged_dot, not the Pallas gmm")
    return "ragged_dot"


def _check_split(num_experts: int, num_tokens: int, ep_size: int, axes: tuple[str, ...]) -> None:
    """The experts split evenly over `expert`, the tokens over the token axes, which hold it."""
    if ep_size < 2:
        raise ValueError(
            "expert_parallel_dispatch needs a mesh (jax.set_mesh) with an `expert` axis > 1"
        )
    if num_experts % ep_size:
        raise ValueError(
            f"num_experts={num_experts} must be divisible by the `expert` mesh axis ({ep_size})"
        )
    if EXPERT_AXIS not in axes:  # whole tokens on every expert rank: each would send them all
        raise ValueError(
            f"expert parallelism splits the tokens over the `expert` axis, but the sharding rule "
            f"'batch' splits them over {axes}: add 'expert' to config.sharding_rules.batch "
            "(the default rules have it) or set config.model.moe.expert_parallel='off'"
        )
    if num_tokens % token_shards():
        raise ValueError(
            f"expert parallelism splits the {num_tokens} tokens (batch * length) over mesh axes "
            f"{axes} ({token_shards()} shards): they must divide evenly"
        )


def expert_parallel_dispatch(
    x_nd: jax.Array,
    weights_nk: jax.Array,
    experts_nk: jax.Array,
    token_mask_n: jax.Array,
    experts: ExpertBank,
    *,
    capacity_factor: float = 0.0,
    backend: str = "tiles",
    exchange: str = "all_to_all",
) -> tuple[jax.Array, jax.Array]:
    """Routed output of the global batch with the experts split over the current mesh's `expert`
    axis. Returns (y_nd, dropped_fraction = valid assignments dropped by the mailbox capacity /
    valid routed assignments, over the whole batch).

    experts_nk holds global expert ids, E (or anything outside [0, E)) for slots that compute
    nothing. capacity_factor 0 = the EP degree (dropless). exchange: 'all_to_all' (mailboxes)
    or 'all_gather' (all-gather the expert group's tokens, reduce-scatter the outputs; never
    drops, and moves P * N_local * D per device each way whatever K: for small P or large K).
    """
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    backend = _local_backend(backend)
    dispatch.check_routing(x_nd, weights_nk, experts_nk)
    ep_size, num_experts, axes = expert_parallel_size(), experts.num_experts, token_axes()
    num_tokens, top_k = experts_nk.shape
    _check_split(num_experts, num_tokens, ep_size, axes)
    dropout = experts.lora_dropout
    active_dropout = dropout is not None and not dropout.deterministic and dropout.rate > 0
    dropout_key = dropout.rngs() if active_dropout else None
    cap = mailbox_capacity(num_tokens // token_shards() * top_k, ep_size, capacity_factor)

    graphdef, params, rest = nnx.split(experts, nnx.Param, ...)
    token_spec, expert_spec = P(axes), P(EXPERT_AXIS)
    # The caller's layout of x, restored on the output (Explicit axes type it; a reshape of the
    # token-split output back to [B, T, D] may not be expressible otherwise).
    caller_spec = jax.typeof(x_nd).sharding.spec
    x_nd, weights_nk, experts_nk, token_mask_n = (
        _constrain(a, token_spec) for a in (x_nd, weights_nk, experts_nk, token_mask_n)
    )
    params = jax.tree.map(lambda a: _constrain(a, expert_spec), params)
    body = functools.partial(
        _shard_body,
        graphdef=graphdef,
        exchange=exchange,
        num_local=num_experts // ep_size,
        ep_size=ep_size,
        cap=cap,
        backend=backend,
        sum_axes=axes,
    )
    in_specs = (token_spec, token_spec, token_spec, token_spec, expert_spec, P(), P())
    y_nd, num_dropped, num_valid = jax.shard_map(
        body, in_specs=in_specs, out_specs=(token_spec, P(), P()), check_vma=True
    )(x_nd, weights_nk, experts_nk, token_mask_n, params, rest, dropout_key)
    if any(t == AxisType.Explicit for t in jax.sharding.get_abstract_mesh().axis_types):
        y_nd = jax.sharding.reshard(y_nd, caller_spec)
    return y_nd, num_dropped / jnp.maximum(num_valid, 1.0)
