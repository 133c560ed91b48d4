"""Decoder layers under `nnx.scan`, and rematerialisation: one compiled block for the whole stack.

With `LLMConfig.scan_layers` the decoder's parameters are stacked on a leading axis and the
forward pass scans over them, so the program holds one block however deep the model is (compile
time and program size stop growing with the layer count). A layout with MoE on some layers only
scans over its repeating block (`block_period`: 'all' and 'none' a block of 1 layer, 'every_2'
of 2, MoE first; an irregular list is one block of every layer, i.e. unrolled).

Parameter paths: unrolled `llm/layers/<i>/...`; scanned `llm/blocks/layers/<j>/...` with a
leading axis of `num_layers // period` blocks, block `b`'s layer `j` being decoder layer
`b * period + j`. Everything outside the model (converted checkpoints, upcycling, earlier stages)
speaks the unrolled names; `unrolled_params` / `scanned_params` translate at the boundary.

`LLMConfig.remat` picks what the backward pass recomputes instead of keeping, per block (scanned)
or per layer (unrolled): `REMAT_POLICIES`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimoe.moe.aux_stats import MoEAux

# name -> jax.checkpoint policy (None: no rematerialisation, every intermediate kept).
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    'none': None,
    # Only each block's input is kept; everything inside is recomputed (least memory).
    'full': jax.checkpoint_policies.nothing_saveable,
    # Matmul outputs kept, elementwise work (norms, activations, softmax) recomputed.
    'dots': jax.checkpoint_policies.dots_saveable,
    # Weight matmuls kept (no batch dimension), attention's batched score matmuls recomputed.
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # As dots_no_batch, but kept in host memory (accelerators with pinned host memory).
    'offload_dots_no_batch': jax.checkpoint_policies.offload_dot_with_no_batch_dims(
        'device', 'pinned_host'
    ),
}


def block_period(moe_layers: Sequence[int], num_layers: int) -> int:
    """The shortest block length the layout repeats with (num_layers for an irregular one)."""
    moe = set(moe_layers)
    for period in range(1, num_layers + 1):
        if num_layers % period == 0 and all(
            (i in moe) == (i % period in moe) for i in range(num_layers)
        ):
            return period
    raise AssertionError('a block of every layer always repeats')


def rematerialised(fn: Callable, policy: str, *, in_scan: bool) -> Callable:
    """`fn` (whose first argument is a module) under `nnx.remat` with the named policy."""
    if policy == 'none':
        return fn
    # Inside a scan the loop already keeps XLA from merging recomputation with the forward pass.
    return nnx.remat(fn, policy=REMAT_POLICIES[policy], prevent_cse=not in_scan)


class LayerBlock(nnx.Module):
    """`period` consecutive decoder layers: the body the scan repeats."""

    def __init__(self, make_layer: Callable[[int, nnx.Rngs], nnx.Module], period: int, *,
                 rngs: nnx.Rngs):
        self.layers = nnx.List([make_layer(j, rngs) for j in range(period)])

    def __call__(
        self, x_btd: jax.Array, attn_mask_bt: jax.Array, token_weight_bt: jax.Array | None,
        between: Callable[[jax.Array], jax.Array],
    ) -> tuple[jax.Array, list[MoEAux]]:
        """Returns the block's output and the aux of its MoE layers, in layer order."""
        auxes = []
        for layer in self.layers:
            x_btd, aux = layer(x_btd, attn_mask_bt, token_weight_bt)
            x_btd = between(x_btd)
            if aux is not None:
                auxes.append(aux)
        return x_btd, auxes


def stacked_blocks(
    make_layer: Callable[[int, nnx.Rngs], nnx.Module], period: int, num_blocks: int,
    rngs: nnx.Rngs,
) -> LayerBlock:
    """`num_blocks` LayerBlocks with their variables stacked on a leading axis (each its own
    initialisation and RNG streams, split from one draw of each of `rngs`' streams)."""
    # New streams rather than `nnx.split_rngs`, which writes the split keys into `rngs` itself:
    # a traced build's streams (`nn.rngs.traceable_rngs`) hold refs of fixed shape.
    block_rngs = nnx.Rngs(
        **{name: jax.random.split(stream(), num_blocks) for name, stream in rngs.items()}
    )

    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(rngs: nnx.Rngs) -> LayerBlock:
        return LayerBlock(make_layer, period, rngs=rngs)

    return build(block_rngs)


def scan_blocks(
    blocks: LayerBlock, x_btd: jax.Array, attn_mask_bt: jax.Array,
    token_weight_bt: jax.Array | None, between: Callable[[jax.Array], jax.Array], remat: str,
) -> tuple[jax.Array, MoEAux | None]:
    """Runs the stacked blocks in order; returns the output and the MoE layers' aux stacked in
    layer order (None without MoE layers)."""

    def body(block: LayerBlock, x_btd: jax.Array) -> tuple[jax.Array, list[MoEAux]]:
        return block(x_btd, attn_mask_bt, token_weight_bt, between)

    body = rematerialised(body, remat, in_scan=True)
    x_btd, auxes = nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))(blocks, x_btd)
    if not auxes:
        return x_btd, None
    # [blocks] per MoE layer of the block -> [blocks, moe per block] -> layer order.
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves, axis=1), *auxes)
    return x_btd, jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), stacked)


def block_views(blocks: LayerBlock) -> list[LayerBlock]:
    """Each block as a LayerBlock of its own (its variables sliced from the stack), for code that
    walks the layers one by one (KV-cache decoding): reads only, writes do not reach the stack."""
    graphdef, state = nnx.split(blocks)
    num_blocks = jax.tree.leaves(state)[0].shape[0]
    return [
        nnx.merge(graphdef, jax.tree.map(lambda a, b=b: a[b], state)) for b in range(num_blocks)
    ]


# The LM's layers only (in a UniMoE under `llm/`): the encoders' `layers/<i>` stay unrolled.
_UNROLLED = re.compile(r'^((?:llm/)?)layers/(\d+)/(.*)$')
_SCANNED = re.compile(r'^((?:llm/)?)blocks/layers/(\d+)/(.*)$')


def _scanned_path(path: str, period: int) -> tuple[str, int] | None:
    """Unrolled `.../layers/<i>/rest` -> (`.../blocks/layers/<i % period>/rest`, block i //
    period); None for a path outside the LM's layers."""
    match = _UNROLLED.match(path)
    if match is None:
        return None
    prefix, index, rest = match.group(1), int(match.group(2)), match.group(3)
    return f'{prefix}blocks/layers/{index % period}/{rest}', index // period


def scanned_params(
    flat: Mapping[str, Any], period: int, num_layers: int
) -> dict[str, np.ndarray]:
    """Unrolled `{.../layers/<i>/rest: array}` -> scanned `{.../blocks/layers/<j>/rest: stack}`
    (other paths unchanged); every layer of a stacked path must be present."""
    out: dict[str, Any] = {}
    groups: dict[str, dict[int, Any]] = {}
    for path, value in flat.items():
        scanned = _scanned_path(path, period)
        if scanned is None:
            out[path] = value
            continue
        key, block = scanned
        groups.setdefault(key, {})[block] = value
    num_blocks = num_layers // period
    for key, by_block in groups.items():
        missing = sorted(set(range(num_blocks)) - set(by_block))
        if missing:
            raise ValueError(f'{key}: blocks {missing} missing to stack {num_blocks} layers')
        out[key] = np.stack([np.asarray(by_block[b]) for b in range(num_blocks)])
    return out


def unrolled_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Scanned `{.../blocks/layers/<j>/rest: [blocks, ...]}` -> unrolled `{.../layers/<i>/rest}`
    (other paths unchanged). The block length is read from the paths: every layer of a block has
    parameters, so the highest `j` is the last."""
    indices = [int(m.group(2)) for m in map(_SCANNED.match, flat) if m is not None]
    period = max(indices, default=0) + 1
    out: dict[str, Any] = {}
    for path, value in flat.items():
        match = _SCANNED.match(path)
        if match is None:
            out[path] = value
            continue
        prefix, index, rest = match.group(1), int(match.group(2)), match.group(3)
        for b in range(value.shape[0]):
            out[f'{prefix}layers/{b * period + index}/{rest}'] = _block(value, b)
    return out


def _block(value: Any, b: int) -> Any:
    """Block `b` of a stacked value; an abstract model's (`jax.ShapeDtypeStruct`) stays abstract."""
    if isinstance(value, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
    return value[b]


def scanned_origin(origin: Mapping[str, str], period: int) -> dict[str, str]:
    """{unrolled path: source} -> {scanned path: sources of its layers, '+'-joined if several}."""
    by_path: dict[str, list[str]] = {}
    for path, source in origin.items():
        scanned = _scanned_path(path, period)
        sources = by_path.setdefault(path if scanned is None else scanned[0], [])
        if source not in sources:
            sources.append(source)
    return {path: '+'.join(sources) for path, sources in by_path.items()}
