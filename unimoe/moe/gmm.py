"""The grouped matmul: rows sorted by expert times that expert's weight matrix.

`resolve_backend` is the one place `MoEConfig.kernel_impl` becomes a backend; `ExpertBank.grouped`
runs the chosen one (`grouped_matmul` for "ragged_dot" and "pallas", the tile loops here for
"tiles").

Axis letters: M rows (expert-sorted assignments), E experts (groups), I in / J out features,
P padded rows, T tiles, C rows per tile.

- "pallas": the `unimoe.kernels.gmm` kernel (Mosaic on TPU, Triton or Mosaic GPU on GPU,
  interpret mode on CPU: tests only).
- "ragged_dot": `jax.lax.ragged_dot`. Native on TPU/GPU, but on CPU it masks the rows into an
  [E, M, I] operand and computes every group densely (E times the work).
- "tiles": pad each group to whole tiles of C rows (at most C - 1 padding rows per group) and
  loop over the tiles with `lax.scan`, each tile reading its expert's weights in place. The
  backward pass is a custom VJP: d_x tile by tile, and d_w accumulated into the [E, I, J]
  gradient carry with an in-place add, so no per-tile copy of the weights is ever materialised
  (a batched einsum over gathered weights costs num_tiles / E copies of the bank, and its
  weight gradient a scatter-add of as many [I, J] blocks).
  Zeros in loop branches and carries are `zeros_like` an operand so that, inside `shard_map`,
  they vary over the same mesh axes as the computed values (check_vma).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from unimoe.kernels import gmm as pallas_gmm
from unimoe.nn.lora import materialized_transpose

BACKENDS = ("tiles", "ragged_dot", "pallas")
# 'xla': the platform's XLA backend; 'auto': Pallas on TPU and GPU, XLA on CPU.
KERNEL_IMPLS = ("auto", "xla", *BACKENDS)
# Below this many assignments per expert the CPU's XLA backend is ragged_dot, not the tile loops.
# benchmarks/generate.py (decode: M = 2 and 16 rows over E = 4), ms per call: b1 61.9 -> 18.3,
# b8 95.5 -> 57.4 with 16; 4 left b8's decode on tiles (81.6 ms), 64 moved b1's prefill to
# ragged_dot too (23.4 ms).
SMALL_GROUP_ROWS = 16


def resolve_backend(
    kernel_impl: str,
    num_rows: int,
    num_experts: int,
    platform: str | None = None,
    *,
    under_mesh: bool = False,
) -> str:
    """`MoEConfig.kernel_impl` -> one of BACKENDS for M = num_rows assignments over E experts on
    `platform` (default: JAX's default backend).

    On CPU the XLA backend is "tiles" (ragged_dot computes every group densely there), except
    below SMALL_GROUP_ROWS rows per expert (a decode step): there the dense pass is a few rows
    while the tile loops' fixed cost is not. Not `under_mesh`: ragged_dot has no sharding rule
    for explicit mesh axes (jax 0.10.2).
    """
    if kernel_impl not in KERNEL_IMPLS:
        raise ValueError(f"kernel_impl must be one of {KERNEL_IMPLS}, got {kernel_impl!r}")
    on_cpu = (platform or jax.default_backend()) == "cpu"
    if kernel_impl == "auto":
        kernel_impl = "xla" if on_cpu else "pallas"
    if kernel_impl != "xla":
        return kernel_impl
    if not on_cpu:
        return "ragged_dot"
    few_rows = num_rows < SMALL_GROUP_ROWS * num_experts
    return "ragged_dot" if few_rows and not under_mesh else "tiles"


def grouped_matmul(
    x_mi: jax.Array, w_eij: jax.Array, group_sizes_e: jax.Array, backend: str
) -> jax.Array:
    """x_mi's rows, group_sizes_e[e] of them for expert e in order, times w_eij[e]: the
    "ragged_dot" and "pallas" backends ("tiles" runs on whole tiles: `ExpertBank.grouped`)."""
    if backend == "ragged_dot":
        return jax.lax.ragged_dot(x_mi, w_eij.astype(x_mi.dtype), group_sizes_e)
    if backend == "pallas":
        return pallas_gmm.gmm(x_mi, w_eij, group_sizes_e)
    raise ValueError(f"grouped_matmul runs 'ragged_dot' or 'pallas', got {backend!r}")


def default_tile(num_rows: int, num_experts: int, max_tile: int = 128) -> int:
    """Rows per tile for the "tiles" backend, from the static M and E.

    About a quarter of a balanced group, a power of two in [8, max_tile]: smaller tiles waste
    fewer padding rows, larger ones amortise the per-tile loop overhead. Measured on a 2-core CPU
    (benchmarks/HISTORY.md): for per-tile matmuls 128 beat 64 and 256 at both M=8192, E=8 and
    M=32768, E=64; `gathered_swiglu`, which multiplies whole chunks of an expert's tiles at once,
    runs best with 64 (`ExpertBank.tile_for`).
    """
    target = max(num_rows // (4 * num_experts), 1)
    return int(min(max_tile, max(8, 1 << (target.bit_length() - 1))))


# Rows per matmul in `gathered_swiglu`'s chunks. Measured fwd+bwd on a 2-core CPU against a dense
# SwiGLU of equal FLOPs (docs/design.md, "Grouped matmul on CPU"): 512-row chunks of 64-row tiles
# took E=64, k=8, F=128 from 1.94x to 1.24x and E=8, k=2, F=1024 from 1.08x to 1.00x.
CHUNK_ROWS = 512


@jax.custom_vjp
def gather_rows(x_sd: jax.Array, index_r: jax.Array, readers_sk: jax.Array) -> jax.Array:
    """y_rd[r] = x_sd[index_r[r]], zero where index_r[r] is out of range.

    readers_sk[s] lists the rows r that read source row s (out of range = none), so the backward
    pass is another gather plus a sum over k rather than XLA's scatter-add (as MaxText does).
    """
    return jnp.take(x_sd, index_r, axis=0, mode="fill", fill_value=0)


def _gather_rows_fwd(x_sd, index_r, readers_sk):
    return gather_rows(x_sd, index_r, readers_sk), (index_r, readers_sk)


def _gather_rows_bwd(res, dy_rd):
    index_r, readers_sk = res
    dx_skd = jnp.take(dy_rd, readers_sk, axis=0, mode="fill", fill_value=0)
    return jnp.sum(dx_skd, axis=1), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def tile_layout(
    group_sizes_e: jax.Array, num_rows: int, tile: int
) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """Where each expert-sorted row goes when every group is padded to whole tiles.

    Returns (dest_m: padded row of sorted row m, valid_m: row m belongs to a group,
    tile_expert_t: the expert owning tile t, or E for the tiles past the last group, num_tiles).
    The padded size is static: at most tile - 1 padding rows per group. Rows past
    sum(group_sizes) (sentinel assignments of dropless dispatch) go after the last group, into
    tiles of expert E, which `tiled_matmul` skips.
    """
    num_experts = group_sizes_e.shape[0]
    num_tiles = -(-(num_rows + num_experts * (tile - 1)) // tile)
    padded_sizes_e = -(-group_sizes_e // tile) * tile
    ends_e = jnp.cumsum(group_sizes_e)
    padded_ends_e = jnp.cumsum(padded_sizes_e)
    rows_m = jnp.arange(num_rows)
    group_m = jnp.searchsorted(ends_e, rows_m, side="right")
    valid_m = group_m < num_experts
    group_m = jnp.minimum(group_m, num_experts - 1)
    rank_m = rows_m - (ends_e[group_m] - group_sizes_e[group_m])
    dest_m = jnp.where(
        valid_m,
        padded_ends_e[group_m] - padded_sizes_e[group_m] + rank_m,
        padded_ends_e[-1] + rows_m - ends_e[-1],
    )
    tile_expert_t = jnp.searchsorted(padded_ends_e, jnp.arange(num_tiles) * tile, side="right")
    return dest_m, valid_m, tile_expert_t, num_tiles


def _tile_scan(x_tci: jax.Array, w_eij: jax.Array, tile_expert_t: jax.Array) -> jax.Array:
    w_eij = jnp.asarray(w_eij)
    num_experts, out_dim = w_eij.shape[0], w_eij.shape[-1]

    def step(_, xs):
        x_ci, expert = xs
        # The static tile count allows tile - 1 padding rows per group; the tiles that padding
        # did not use (expert E) cost nothing.
        y_cj = jax.lax.cond(
            expert < num_experts,
            lambda: x_ci @ w_eij[expert],
            lambda: jnp.zeros_like(x_ci, shape=(x_ci.shape[0], out_dim)),
        )
        return None, y_cj

    return jax.lax.scan(step, None, (x_tci, tile_expert_t))[1]


@jax.custom_vjp
def tiled_matmul(x_tci: jax.Array, w_eij: jax.Array, tile_expert_t: jax.Array) -> jax.Array:
    """y_tcj[t] = x_tci[t] @ w_eij[tile_expert_t[t]], one tile at a time."""
    return _tile_scan(x_tci, w_eij.astype(x_tci.dtype), tile_expert_t)


def _tiled_matmul_fwd(x_tci, w_eij, tile_expert_t):
    return tiled_matmul(x_tci, w_eij, tile_expert_t), (x_tci, w_eij, tile_expert_t)


def _accumulate_block(
    dw_eij: jax.Array, expert: jax.Array, block_ij: jax.Array, num_experts: int
) -> jax.Array:
    """dw_eij[expert] += block_ij, in place (XLA updates one [I, J] block, not the bank).

    Sentinel tiles (expert E) bring a zero block, added to expert E - 1: outside any `cond`,
    so the carry is never copied by a conditional that returns it.
    """
    expert = jnp.minimum(expert, num_experts - 1)
    old_ij = jax.lax.dynamic_index_in_dim(dw_eij, expert, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(dw_eij, old_ij + block_ij, expert, axis=0)


def _tiled_matmul_bwd(res, dy_tcj):
    x_tci, w_eij, tile_expert_t = res
    num_experts = w_eij.shape[0]
    w_t_eji = jnp.swapaxes(w_eij, 1, 2).astype(dy_tcj.dtype)
    dx_tci = _tile_scan(dy_tcj, w_t_eji, tile_expert_t)

    def accumulate(dw_eij, xs):
        x_ci, dy_cj, expert = xs
        block_ij = jax.lax.cond(
            expert < num_experts,
            lambda: (x_ci.T @ dy_cj).astype(jnp.float32),
            lambda: jnp.zeros_like(x_ci, jnp.float32, shape=w_eij.shape[1:]),
        )
        return _accumulate_block(dw_eij, expert, block_ij, num_experts), None

    dw_eij = jnp.zeros_like(w_eij, jnp.float32)
    dw_eij = jax.lax.scan(accumulate, dw_eij, (x_tci, dy_tcj, tile_expert_t))[0]
    return dx_tci.astype(x_tci.dtype), dw_eij.astype(w_eij.dtype), None


tiled_matmul.defvjp(_tiled_matmul_fwd, _tiled_matmul_bwd)


def _expert_tile_ranges(tile_expert_t: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """First and one-past-last tile of each expert; tiles are sorted by expert (`tile_layout`)."""
    experts_e = jnp.arange(num_experts, dtype=tile_expert_t.dtype)
    first_e = jnp.searchsorted(tile_expert_t, experts_e, side="left")
    end_e = jnp.searchsorted(tile_expert_t, experts_e, side="right")
    return first_e, end_e


def _expert_loops(first, end, chunk_tiles: int, num_tiles: int, step, carry):
    """step(t0, n, carry) over tiles [first, end) of one expert: whole chunks of `chunk_tiles`
    tiles first (one [chunk_tiles * C, D] matmul each), then the remaining tiles one by one.

    When exactly one tile would be left over, the last chunk takes it (chunk_tiles + 1 tiles):
    balanced routing puts most groups just over a whole number of chunks (512 +- 22 rows per
    expert at E=64, k=8, N=4096: 28 of 64 experts had 9 tiles of 64), and a lone tile runs at
    about half the chunk's speed per row. num_tiles (static, all experts) bounds the slices.
    """
    if chunk_tiles == 1:
        return jax.lax.fori_loop(first, end, lambda t, c: step(t, 1, c), carry)
    num_chunks = (end - first) // chunk_tiles

    def chunk(n: int):
        # t0 from the loop index: a body that does not depend on it would be hoisted out of
        # the 0-or-1-trip loop below by XLA and run for every expert.
        return lambda j, c: step(first + j * chunk_tiles, n, c)

    if chunk_tiles + 1 > num_tiles:  # no group can have chunk_tiles + 1 tiles
        carry = jax.lax.fori_loop(0, num_chunks, chunk(chunk_tiles), carry)
        singles_from = first + num_chunks * chunk_tiles
    else:
        long_last = ((end - first) % chunk_tiles == 1) & (num_chunks > 0)
        num_short = num_chunks - long_last.astype(num_chunks.dtype)
        carry = jax.lax.fori_loop(0, num_short, chunk(chunk_tiles), carry)
        carry = jax.lax.fori_loop(num_short, num_chunks, chunk(chunk_tiles + 1), carry)
        singles_from = first + num_chunks * chunk_tiles + long_last
    return jax.lax.fori_loop(singles_from, end, lambda t, c: step(t, 1, c), carry)


def _read(a_t: jax.Array, t0: jax.Array, n: int) -> jax.Array:
    """Tiles [t0, t0 + n) of a_t [T, C, ...], flattened to rows [n * C, ...]."""
    rows = jax.lax.dynamic_slice_in_dim(a_t, t0, n, 0)
    return rows.reshape(n * a_t.shape[1], *a_t.shape[2:])


def _write(a_t: jax.Array, rows: jax.Array, t0: jax.Array) -> jax.Array:
    """a_t with the tiles from t0 on replaced by `rows` (whole tiles of them)."""
    n = rows.shape[0] // a_t.shape[1]
    return jax.lax.dynamic_update_slice_in_dim(a_t, rows.reshape(n, *a_t.shape[1:]), t0, 0)


def _matmul_t(a_ri: jax.Array, w_ji: jax.Array) -> jax.Array:
    """a_ri @ w_ji.T without materialising the transpose (the weights stay as stored)."""
    return jax.lax.dot_general(a_ri, w_ji, (((1,), (1,)), ((), ())))


def _take(x_sd: jax.Array, index_r: jax.Array) -> jax.Array:
    return jnp.take(x_sd, index_r, axis=0, mode="fill", fill_value=0)


def gathered_swiglu(
    x_sd: jax.Array,
    w_gate_edf: jax.Array,
    w_up_edf: jax.Array,
    w_down_efd: jax.Array,
    source_tc: jax.Array,
    weight_tc: jax.Array,
    tile_expert_t: jax.Array,
    chunk_rows: int = CHUNK_ROWS,
) -> jax.Array:
    """Dispatch, expert SwiGLU and combine in one pass: y_sd float32 with

        y_sd[s] = sum over (t, c) with source_tc[t, c] == s of
                  weight_tc[t, c] * SwiGLU_e(x_sd[s]),  e = tile_expert_t[t] < E.

    Row c of tile t reads source row source_tc[t, c] (out of range: a padding row, which reads
    zeros and writes nothing); tiles are sorted by expert and those of expert E are skipped, as
    `tile_layout` makes them. For MoE dispatch, s is a token, and each of its K assignments is one
    (t, c) with its router weight; with identity sources and unit weights this is the tiled
    grouped SwiGLU.

    One loop over experts with an inner loop over that expert's tiles: each step gathers its
    rows from x_sd, runs the FFN, and scatter-adds the weighted rows into y_sd, so the [N*K, D]
    copies of the tokens (in tiles, and back in assignment order for the combine) never exist;
    only the gate and up activations ([N*K, F] each) are kept, and only when a VJP is taken.
    Each expert's weights are sliced once per call, and an expert's tiles are contiguous, so the
    inner loop multiplies chunks of chunk_rows // C tiles at once while whole chunks remain, then
    single tiles (a lone leftover tile joins the last chunk): small tiles bound the padding,
    chunks run the matmuls at the shapes where the CPU is fastest. The custom VJP has the same
    loops: d_x scatter-added, each expert's weight gradient summed in the inner loop's carry, and
    d_weight = <d_y, expert output> from the d_hidden it computes anyway.
    Gate and up run as one [D, 2F] matmul, the pair concatenated per expert inside the loop.
    Measurements: docs/design.md, "Grouped matmul on CPU".
    """
    if source_tc.shape != weight_tc.shape or source_tc.shape[0] != tile_expert_t.shape[0]:
        raise ValueError(
            f"source {source_tc.shape} and weight {weight_tc.shape} must both be "
            f"[T={tile_expert_t.shape[0]}, C]"
        )
    # At most all the tiles: a larger chunk would never run, but its slice must still fit.
    chunk_tiles = max(1, min(chunk_rows // source_tc.shape[1], source_tc.shape[0]))
    return _gathered_swiglu(
        x_sd,
        w_gate_edf,
        w_up_edf,
        w_down_efd,
        source_tc.astype(jnp.int32),
        weight_tc.astype(jnp.float32),
        tile_expert_t,
        chunk_tiles,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _gathered_swiglu(x_sd, w_gate, w_up, w_down, source_tc, weight_tc, tile_expert_t, chunk_tiles):
    args = (x_sd, w_gate, w_up, w_down, source_tc, weight_tc, tile_expert_t)
    return _gathered_swiglu_loops(*args, chunk_tiles, keep_activations=False)[0]


def _gathered_swiglu_fwd(*args):
    y_sd, activations = _gathered_swiglu_loops(*args, keep_activations=True)
    return y_sd, (*args[:7], *activations)


def _expert_weights(w_gate_df, w_up_df, w_down_fd, dtype):
    """One expert's gate and up projections side by side [D, 2F] (one matmul for both) and its
    down projection, in the compute dtype."""
    return jnp.concatenate([w_gate_df, w_up_df], axis=-1).astype(dtype), w_down_fd.astype(dtype)


def _gathered_swiglu_loops(
    x_sd,
    w_gate_edf,
    w_up_edf,
    w_down_efd,
    source_tc,
    weight_tc,
    tile_expert_t,
    chunk_tiles,
    *,
    keep_activations: bool,
):
    """(y_sd, the gate and up activations [T, C, F] if keep_activations else ())."""
    num_experts, _, ffn_dim = w_gate_edf.shape
    num_tiles = source_tc.shape[0]
    dtype = x_sd.dtype
    first_e, end_e = _expert_tile_ranges(tile_expert_t, num_experts)

    def expert_step(carry, xs):
        *weights, first, end = xs
        w_gate_up_d2f, w_down_fd = _expert_weights(*weights, dtype)

        def step(t0, n, carry):
            y_sd, *activations = carry
            source_r = _read(source_tc, t0, n)
            gate_up_r2f = _take(x_sd, source_r) @ w_gate_up_d2f
            gate_rf, up_rf = gate_up_r2f[:, :ffn_dim], gate_up_r2f[:, ffn_dim:]
            y_rd = (jax.nn.silu(gate_rf) * up_rf) @ w_down_fd
            y_rd = y_rd.astype(jnp.float32) * _read(weight_tc, t0, n)[:, None]
            y_sd = y_sd.at[source_r].add(y_rd, mode="drop")
            if not keep_activations:
                return (y_sd,)
            gate_tcf, up_tcf = activations
            return y_sd, _write(gate_tcf, gate_rf, t0), _write(up_tcf, up_rf, t0)

        return _expert_loops(first, end, chunk_tiles, num_tiles, step, carry), None

    # Tiles of the sentinel expert E are in no expert's range and are never computed. Gate and
    # up are kept apart: each half of a [rows, 2F] buffer stays under glibc's 32 MB mmap
    # threshold at the fine-grained benchmark shape (docs/design.md, "huge pages").
    carry = (jnp.zeros_like(x_sd, jnp.float32),)
    if keep_activations:
        carry += (jnp.zeros_like(x_sd, shape=(*source_tc.shape, ffn_dim)),) * 2
    xs = (w_gate_edf, w_up_edf, w_down_efd, first_e, end_e)
    y_sd, *activations = jax.lax.scan(expert_step, carry, xs)[0]
    return y_sd, tuple(activations)


def _gathered_swiglu_bwd(chunk_tiles, res, dy_sd):
    x_sd, w_gate_edf, w_up_edf, w_down_efd, source_tc, weight_tc, tile_expert_t, *acts = res
    gate_tcf, up_tcf = acts
    num_experts, _, ffn_dim = w_gate_edf.shape
    num_tiles = source_tc.shape[0]
    dtype = x_sd.dtype
    f32 = jnp.float32
    dy_sd = dy_sd.astype(f32)
    first_e, end_e = _expert_tile_ranges(tile_expert_t, num_experts)

    def expert_step(carry, xs):
        *weights, first, end = xs
        w_gate_up_d2f, w_down_fd = _expert_weights(*weights, dtype)

        def step(t0, n, carry):
            dx_sd, d_weight_tc, dw_gate_up_d2f, dw_down_fd = carry
            source_r, weight_r1 = _read(source_tc, t0, n), _read(weight_tc, t0, n)[:, None]
            x_rd, dy_rd = _take(x_sd, source_r), _take(dy_sd, source_r)
            gate_rf, up_rf = _read(gate_tcf, t0, n), _read(up_tcf, t0, n)
            sig_rf = jax.nn.sigmoid(gate_rf)
            silu_rf = gate_rf * sig_rf
            hidden_rf = silu_rf * up_rf
            # d_y of the unweighted expert output: its product with the output is d_weight.
            d_out_rf = _matmul_t(dy_rd.astype(dtype), w_down_fd)
            d_weight_r = jnp.sum(d_out_rf.astype(f32) * hidden_rf.astype(f32), axis=-1)
            d_hidden_rf = d_out_rf * weight_r1.astype(dtype)
            # The weight scales the [rows, F] side: F <= D for fine-grained experts.
            weighted_hidden_rf = hidden_rf * weight_r1.astype(dtype)
            d_gate_up_r2f = jnp.concatenate(
                [
                    d_hidden_rf * up_rf * sig_rf * (1 + gate_rf * (1 - sig_rf)),
                    d_hidden_rf * silu_rf,
                ],
                axis=-1,
            )
            dx_rd = _matmul_t(d_gate_up_r2f, w_gate_up_d2f).astype(f32)
            return (
                dx_sd.at[source_r].add(dx_rd, mode="drop"),
                _write(d_weight_tc, d_weight_r, t0),
                dw_gate_up_d2f + (materialized_transpose(x_rd) @ d_gate_up_r2f).astype(f32),
                dw_down_fd
                + (materialized_transpose(weighted_hidden_rf) @ dy_rd.astype(dtype)).astype(f32),
            )

        dx_sd, d_weight_tc = carry
        zeros = (jnp.zeros_like(w_gate_up_d2f, f32), jnp.zeros_like(w_down_fd, f32))
        dx_sd, d_weight_tc, dw_gate_up_d2f, dw_down_fd = _expert_loops(
            first, end, chunk_tiles, num_tiles, step, (dx_sd, d_weight_tc, *zeros)
        )
        # Each weight gradient leaves the loop in its own [E, ...] bank (no [E, D, 2F] buffer
        # split afterwards).
        dw = (dw_gate_up_d2f[:, :ffn_dim], dw_gate_up_d2f[:, ffn_dim:], dw_down_fd)
        return (dx_sd, d_weight_tc), tuple(d.astype(w_down_efd.dtype) for d in dw)

    carry = (jnp.zeros_like(x_sd, f32), jnp.zeros_like(weight_tc))
    xs = (w_gate_edf, w_up_edf, w_down_efd, first_e, end_e)
    (dx_sd, d_weight_tc), (dw_gate, dw_up, dw_down) = jax.lax.scan(expert_step, carry, xs)
    return dx_sd.astype(dtype), dw_gate, dw_up, dw_down, None, d_weight_tc, None


_gathered_swiglu.defvjp(_gathered_swiglu_fwd, _gathered_swiglu_bwd)
