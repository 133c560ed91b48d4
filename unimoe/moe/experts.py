"""Expert banks: E SwiGLU FFNs stored as stacked weights, optionally with per-expert LoRA.

Expert e computes down(silu(x @ w_gate_edf[e]) * (x @ w_up_edf[e])), the same convention as the
dense `unimoe.models.llm.MLP`, so a dense FFN copied into slot e (gate.kernel -> w_gate_edf[e],
up.kernel -> w_up_edf[e], down.kernel -> w_down_efd[e]) is that FFN exactly (upcycling).

Two entry points serve the dispatch strategies:
- `grouped(x_md, group_sizes_e)`: rows already sorted by expert, expert e owning a contiguous run
  of group_sizes_e[e] rows (dropless dispatch);
- `batched(x_ecd)`: a fixed-size block of rows per expert (capacity dispatch, dense oracle).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from unimoe.models.lora import BASE_INIT_STDDEV, LoRAConfig, lora_a_init, lora_dropout


# (activations, per-expert weights [E, in, out]) -> activations; grouped or batched.
Matmul = Callable[[jax.Array, jax.Array], jax.Array]


def _ragged_matmul(x_md: jax.Array, w_eij: jax.Array, group_sizes_e: jax.Array) -> jax.Array:
    return jax.lax.ragged_dot(x_md, w_eij.astype(x_md.dtype), group_sizes_e)


def _batched_matmul(x_eci: jax.Array, w_eij: jax.Array) -> jax.Array:
    return jnp.einsum("eci,eij->ecj", x_eci, w_eij.astype(x_eci.dtype))


def _tiled_matmul(x_tci: jax.Array, w_eij: jax.Array, tile_expert_t: jax.Array) -> jax.Array:
    return _batched_matmul(x_tci, w_eij[tile_expert_t])


GROUPED_IMPLS = ("ragged_dot", "tiles")


def tile_layout(
    group_sizes_e: jax.Array, num_rows: int, tile: int
) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """Where each expert-sorted row goes when every group is padded to whole tiles.

    Returns (dest_m: padded row of sorted row m, valid_m: row m belongs to a group,
    tile_expert_t: the expert owning tile t, num_tiles). The padded size is static: at most
    tile - 1 padding rows per group. Rows past sum(group_sizes) (none in dropless dispatch) go
    after the last group; callers zero them.
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
    tile_expert_t = jnp.minimum(
        jnp.searchsorted(padded_ends_e, jnp.arange(num_tiles) * tile, side="right"),
        num_experts - 1,
    )
    return dest_m, valid_m, tile_expert_t, num_tiles


class ExpertBank(nnx.Module):
    """E SwiGLU experts; LoRA (when lora.rank > 0) on gate, up and down of every expert.

    As in Uni-MoE 8E's `LlamaMLPLoRA`, the down-projection adapter reads the intermediate
    activation silu(gate) * up.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        ffn_dim: int,
        *,
        lora: LoRAConfig = LoRAConfig(),
        rngs: nnx.Rngs,
    ):
        for name, value in (("num_experts", num_experts), ("dim", dim), ("ffn_dim", ffn_dim)):
            if value <= 0:
                raise ValueError(f"ExpertBank.{name} must be > 0, got {value}")
        self.num_experts = num_experts
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.lora_scale = lora.scale

        def base(shape: tuple[int, ...]) -> nnx.Param:
            return nnx.Param(BASE_INIT_STDDEV * jax.random.normal(rngs.params(), shape))

        self.w_gate_edf = base((num_experts, dim, ffn_dim))
        self.w_up_edf = base((num_experts, dim, ffn_dim))
        self.w_down_efd = base((num_experts, ffn_dim, dim))

        def adapter_a(fan_in: int) -> nnx.LoRAParam | None:
            if not lora.enabled:
                return None
            shape = (num_experts, fan_in, lora.rank)
            return nnx.LoRAParam(lora_a_init(rngs.params(), shape, fan_in))

        def adapter_b(fan_out: int) -> nnx.LoRAParam | None:
            if not lora.enabled:
                return None
            return nnx.LoRAParam(jnp.zeros((num_experts, lora.rank, fan_out)))

        self.lora_gate_a_edr = adapter_a(dim)
        self.lora_gate_b_erf = adapter_b(ffn_dim)
        self.lora_up_a_edr = adapter_a(dim)
        self.lora_up_b_erf = adapter_b(ffn_dim)
        self.lora_down_a_efr = adapter_a(ffn_dim)
        self.lora_down_b_erd = adapter_b(dim)
        self.lora_dropout = lora_dropout(lora, rngs)

    @property
    def has_lora(self) -> bool:
        return self.lora_gate_a_edr is not None

    def _drop(self, x: jax.Array) -> jax.Array:
        return self.lora_dropout(x) if self.lora_dropout is not None else x

    def _project(
        self,
        matmul: Matmul,
        x: jax.Array,
        w_base: nnx.Param,
        lora_a: nnx.LoRAParam | None,
        lora_b: nnx.LoRAParam | None,
    ) -> jax.Array:
        """Base projection plus, when present, the scaled LoRA update on dropout(x)."""
        y = matmul(x, w_base[...])
        if lora_a is not None:
            y = y + matmul(matmul(self._drop(x), lora_a[...]), lora_b[...]) * self.lora_scale
        return y

    def _swiglu(self, matmul: Matmul, x: jax.Array) -> jax.Array:
        gate = self._project(matmul, x, self.w_gate_edf, self.lora_gate_a_edr, self.lora_gate_b_erf)
        up = self._project(matmul, x, self.w_up_edf, self.lora_up_a_edr, self.lora_up_b_erf)
        hidden = jax.nn.silu(gate) * up
        return self._project(
            matmul, hidden, self.w_down_efd, self.lora_down_a_efr, self.lora_down_b_erd
        )

    def grouped(
        self, x_md: jax.Array, group_sizes_e: jax.Array, *, impl: str = "tiles", tile: int = 128
    ) -> jax.Array:
        """Rows sorted by expert, group_sizes_e[e] rows for expert e -> y_md.

        `impl` picks the grouped matmul: "ragged_dot" (`jax.lax.ragged_dot`; native on TPU, but on
        CPU it computes every group densely, E times the work) or "tiles": pad each group to
        whole tiles of `tile` rows and run one batched matmul over tiles against the gathered
        weights of each tile's expert (at most E * (tile - 1) padded rows, no dense waste; the
        gathered weights cost num_tiles / E times the bank's memory, fine at CPU scale).
        """
        if x_md.ndim != 2 or x_md.shape[-1] != self.dim:
            raise ValueError(f"ExpertBank.grouped expects x [M, {self.dim}], got {x_md.shape}")
        if group_sizes_e.shape != (self.num_experts,):
            raise ValueError(
                f"group_sizes must be [{self.num_experts}] (num_experts), got {group_sizes_e.shape}"
            )
        if impl == "ragged_dot":
            return self._swiglu(
                functools.partial(_ragged_matmul, group_sizes_e=group_sizes_e), x_md
            )
        if impl != "tiles":
            raise ValueError(f"grouped impl must be one of {GROUPED_IMPLS}, got {impl!r}")
        num_rows = x_md.shape[0]
        dest_m, valid_m, tile_expert_t, num_tiles = tile_layout(group_sizes_e, num_rows, tile)
        x_md = jnp.where(valid_m[:, None], x_md, 0)
        x_pd = jnp.zeros((num_tiles * tile, self.dim), x_md.dtype)
        x_tcd = x_pd.at[dest_m].set(x_md, unique_indices=True).reshape(num_tiles, tile, self.dim)
        matmul = functools.partial(_tiled_matmul, tile_expert_t=tile_expert_t)
        # Padding rows are zero and SwiGLU(0) = 0, so they never leak into real rows.
        y_tcd = self._swiglu(matmul, x_tcd)
        return y_tcd.reshape(num_tiles * tile, self.dim)[dest_m]

    def batched(self, x_ecd: jax.Array) -> jax.Array:
        """A block of C rows per expert: x_ecd [E, C, D] -> y_ecd."""
        if x_ecd.ndim != 3 or x_ecd.shape[0] != self.num_experts or x_ecd.shape[-1] != self.dim:
            raise ValueError(
                f"ExpertBank.batched expects x [{self.num_experts}, C, {self.dim}], "
                f"got {x_ecd.shape}"
            )
        return self._swiglu(_batched_matmul, x_ecd)

    def merge_adapters(self) -> None:
        """Folds each expert's adapters into its base weights and zeroes the B matrices."""
        if not self.has_lora:
            return
        for w_base, lora_a, lora_b in (
            (self.w_gate_edf, self.lora_gate_a_edr, self.lora_gate_b_erf),
            (self.w_up_edf, self.lora_up_a_edr, self.lora_up_b_erf),
            (self.w_down_efd, self.lora_down_a_efr, self.lora_down_b_erd),
        ):
            delta = jnp.einsum("eir,erj->eij", lora_a[...], lora_b[...]) * self.lora_scale
            w_base[...] = w_base[...] + delta
            lora_b[...] = jnp.zeros_like(lora_b[...])
