"""Fused routing: router logits -> top-k / top-P weights, expert counts and the expert sort, in one
Pallas kernel. Its XLA reference, its VJP and the choice between them are
`unimoe.moe.fused_routing`.

Axis letters: N tokens, C router columns (routed experts, then null experts), E routed experts,
K slots, M = N * K assignments (m = n * K + k).

Outputs (`Routing`): weights_nk (float32) and columns_nk (int32, the router column of each slot,
C for an unused top-P slot) exactly as the `routing.py` router returns them; and, over the
dispatch ids experts_nk = min(columns_nk, E) (null experts and unused slots are the sentinel E):
group_sizes_e (assignments per routed expert) and rank_m, the row of assignment m once the
assignments are stably sorted by expert with the sentinels last (`dispatch._sort_by_expert`'s
rank), i.e. a counting sort.

The kernel's grid is (2 phases, token blocks), both sequential: phase 0 routes every block and
accumulates the per-expert counts in VMEM; phase 1 routes again, stores the weights and columns (cheap next to a pass over
the [N, C] logits held in VMEM blocks), turns the counts into expert start rows and gives each
assignment start + (same-expert assignments before it), the within-block part by a
lower-triangular matmul. Top-k is k rounds of max-and-mask (lowest column wins a tie, as
`lax.top_k`). The backward pass (to the logits, through the weights) is the VJP of the XLA
reference, which makes the same choices. Mosaic (TPU) and interpret mode only: a Triton program
has no state carried across the grid, so on GPU `fused_routing.route` runs the reference.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST
FUSED_ROUTERS = ("topk_softmax", "softmax_topk", "top_p")


class Routing(NamedTuple):
    weights_nk: jax.Array
    columns_nk: jax.Array
    group_sizes_e: jax.Array
    rank_m: jax.Array


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    """router in FUSED_ROUTERS; k = slots (top_k, or k_max for 'top_p'); E routed experts."""

    router: str
    k: int
    num_experts: int
    renormalize: bool = True
    top_p: float = 0.7

    def check(self, num_columns: int) -> None:
        if self.router not in FUSED_ROUTERS:
            raise ValueError(f"fused routing supports {FUSED_ROUTERS}, got {self.router!r}")
        if not 1 <= self.k <= num_columns:
            raise ValueError(f"k must be in [1, {num_columns}] (router columns), got {self.k}")
        if not 1 <= self.num_experts <= num_columns:
            raise ValueError(f"num_experts must be in [1, {num_columns}], got {self.num_experts}")


def _top_slots(spec: RouterSpec, logits: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
    """Per slot j: weight [bt, 1] (float32) and router column [bt, 1] (int32) of one block."""
    num_columns = logits.shape[1]
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    if spec.router == "topk_softmax":
        vals = logits
    else:
        e = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
        vals = e / jnp.sum(e, axis=1, keepdims=True)
    tops, cols = [], []
    for _ in range(spec.k):
        best = jnp.max(vals, axis=1, keepdims=True)
        col = jnp.min(jnp.where(vals == best, iota, num_columns), axis=1, keepdims=True)
        tops.append(best)
        cols.append(col)
        vals = jnp.where(iota == col, -jnp.inf, vals)

    if spec.router == "topk_softmax":
        exps = [jnp.exp(t - tops[0]) for t in tops]
        total = sum(exps)
        return [x / total for x in exps], cols
    if spec.router == "softmax_topk":
        if spec.renormalize:
            total = sum(tops)
            tops = [t / total for t in tops]
        return tops, cols
    # top_p: keep 1 + #(cumulative mass below top_p) slots, at most k (routing.route_top_p).
    cum, below = jnp.zeros_like(tops[0]), jnp.zeros_like(tops[0])
    for t in tops:
        cum = cum + t
        below = below + (cum < spec.top_p).astype(F32)
    k_n = jnp.minimum(1.0 + below, float(spec.k))
    used = [k_n > j for j in range(spec.k)]
    kept = [jnp.where(u, t, 0.0) for u, t in zip(used, tops)]
    total = jnp.maximum(sum(kept), 1e-20)
    return [w / total for w in kept], [jnp.where(u, c, num_columns) for u, c in zip(used, cols)]


def _slots_to_block(slots: list[jax.Array], dtype) -> jax.Array:
    """[bt, 1] per slot -> [bt, K] (a select per slot; no lane concatenation)."""
    shape = (slots[0].shape[0], len(slots))
    iota = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    out = jnp.zeros(shape, dtype)
    for j, s in enumerate(slots):
        out = jnp.where(iota == j, s.astype(dtype), out)
    return out


def _route_kernel(
    logits_ref,
    weights_ref,
    columns_ref,
    rank_ref,
    sizes_ref,
    counts_ref,
    seen_ref,
    *,
    spec: RouterSpec,
    num_tokens: int,
):
    phase, block = pl.program_id(0), pl.program_id(1)
    block_t = logits_ref.shape[0]
    num_ids = spec.num_experts + 1  # routed experts and the sentinel
    weights, cols = _top_slots(spec, logits_ref[...].astype(F32))

    # Tokens of the edge block past N route garbage: they count nowhere.
    tokens = block * block_t + jax.lax.broadcasted_iota(jnp.int32, (block_t, 1), 0)
    valid = tokens < num_tokens
    ids = jax.lax.broadcasted_iota(jnp.int32, (block_t, num_ids), 1)
    onehots = [((jnp.minimum(c, spec.num_experts) == ids) & valid).astype(F32) for c in cols]
    block_counts = sum(onehots)  # [bt, E + 1]: assignments of each token to each id

    @pl.when((phase == 0) & (block == 0))
    def _zero_counts():
        counts_ref[...] = jnp.zeros_like(counts_ref)

    @pl.when(phase == 0)
    def _count():
        counts_ref[...] += jnp.sum(block_counts, axis=0, keepdims=True)

    @pl.when((phase == 1) & (block == 0))
    def _zero_seen():
        seen_ref[...] = jnp.zeros_like(seen_ref)

    @pl.when(phase == 1)
    def _rank():
        # starts[e] = assignments to ids below e; before[t, e] = block assignments of tokens < t.
        upper = jax.lax.broadcasted_iota(jnp.int32, (num_ids, num_ids), 0) < (
            jax.lax.broadcasted_iota(jnp.int32, (num_ids, num_ids), 1)
        )
        starts = jnp.dot(counts_ref[...], upper.astype(F32), precision=HIGHEST)
        lower = jax.lax.broadcasted_iota(jnp.int32, (block_t, block_t), 0) > (
            jax.lax.broadcasted_iota(jnp.int32, (block_t, block_t), 1)
        )
        before = jnp.dot(lower.astype(F32), block_counts, precision=HIGHEST)
        base = starts + seen_ref[...] + before
        ranks = []
        for onehot in onehots:
            ranks.append(jnp.sum(onehot * base, axis=1, keepdims=True))
            base = base + onehot  # later slots of the same token come after this one
        weights_ref[...] = _slots_to_block(weights, F32)
        columns_ref[...] = _slots_to_block(cols, jnp.int32)
        rank_ref[...] = _slots_to_block(ranks, jnp.int32)
        seen_ref[...] += jnp.sum(block_counts, axis=0, keepdims=True)
        sizes_ref[...] = counts_ref[:, : spec.num_experts].astype(jnp.int32)


def route_pallas(spec: RouterSpec, block_tokens: int, interpret: Any, logits_nc: jax.Array) -> Routing:
    """The kernel (forward only: `unimoe.moe.fused_routing.route` adds the VJP and picks the
    backend); logits [N, C] float32."""
    num_tokens, num_columns = logits_nc.shape
    block_t = min(block_tokens, num_tokens)
    num_blocks = pl.cdiv(num_tokens, block_t)
    k = spec.k

    def token_block(phase, block):
        return block, 0

    def output_block(phase, block):
        # Phase 0 stores nothing: parking its steps on block 0 keeps every output block's
        # visits consecutive (a TPU output block is written back when its index changes and
        # never read back, so a later revisit would start from garbage).
        return block * phase, 0

    def whole(phase, block):
        return 0, 0

    weights, columns, rank, sizes = pl.pallas_call(
        functools.partial(_route_kernel, spec=spec, num_tokens=num_tokens),
        out_shape=(
            jax.ShapeDtypeStruct((num_tokens, k), F32),
            jax.ShapeDtypeStruct((num_tokens, k), jnp.int32),
            jax.ShapeDtypeStruct((num_tokens, k), jnp.int32),
            jax.ShapeDtypeStruct((1, spec.num_experts), jnp.int32),
        ),
        grid=(2, num_blocks),
        in_specs=[pl.BlockSpec((block_t, num_columns), token_block)],
        out_specs=(
            pl.BlockSpec((block_t, k), output_block),
            pl.BlockSpec((block_t, k), output_block),
            pl.BlockSpec((block_t, k), output_block),
            pl.BlockSpec((1, spec.num_experts), whole),
        ),
        scratch_shapes=[
            pltpu.VMEM((1, spec.num_experts + 1), F32),
            pltpu.VMEM((1, spec.num_experts + 1), F32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary")),
        interpret=interpret,
        name="unimoe_fused_route",
    )(logits_nc)
    return Routing(weights, columns, sizes.reshape(-1), rank.reshape(-1))
