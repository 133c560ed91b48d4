"""Expert banks: E SwiGLU FFNs stored as stacked weights, optionally with per-expert LoRA.

Expert e computes down(silu(x @ w_gate_edf[e]) * (x @ w_up_edf[e])), the same convention as the
dense `unimoe.models.llm.MLP`, so a dense FFN copied into slot e (gate.kernel -> w_gate_edf[e],
up.kernel -> w_up_edf[e], down.kernel -> w_down_efd[e]) is that FFN exactly (upcycling).

Three entry points serve the dispatch strategies:
- `grouped(x_md, group_sizes_e)`: rows already sorted by expert, expert e owning a contiguous run
  of group_sizes_e[e] rows (dropless dispatch);
- `gathered(x_sd, source_tc, weight_tc, tile_expert_t)`: rows gathered into whole tiles per
  expert by index, outputs weighted and added back per source row (dropless dispatch fused into
  the expert loop, `dispatch.dropless_tiled_dispatch`);
- `batched(x_ecd)`: a fixed-size block of rows per expert (capacity dispatch, dense oracle).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from unimoe.moe.gmm import (
    BACKENDS,
    default_tile,
    gathered_swiglu,
    grouped_matmul,
    tile_layout,
    tiled_matmul,
)
from unimoe.nn.lora import BASE_INIT_STDDEV, LoRAConfig, lora_a_init, lora_dropout


# (activations, per-expert weights [E, in, out]) -> activations; grouped or batched.
Matmul = Callable[[jax.Array, jax.Array], jax.Array]


def _batched_matmul(x_eci: jax.Array, w_eij: jax.Array) -> jax.Array:
    return jnp.einsum("eci,eij->ecj", x_eci, w_eij.astype(x_eci.dtype))


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
    def num_experts(self) -> int:
        """From the weights: inside expert parallelism's shard_map, the device's local experts."""
        return self.w_gate_edf.shape[0]

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
            y = y + self._lora_update(matmul, x, lora_a, lora_b)
        return y

    def _lora_update(
        self, matmul: Matmul, x: jax.Array, lora_a: nnx.LoRAParam, lora_b: nnx.LoRAParam
    ) -> jax.Array:
        return matmul(matmul(self._drop(x), lora_a[...]), lora_b[...]) * self.lora_scale

    def _swiglu(self, matmul: Matmul, x: jax.Array, *, fuse_gate_up: bool = False) -> jax.Array:
        if fuse_gate_up:
            # One [E, D, 2F] matmul instead of two: the rows are read once and each per-tile
            # matmul is twice as wide, which matters for narrow (fine-grained) experts.
            w_gate_up_edf = jnp.concatenate([self.w_gate_edf[...], self.w_up_edf[...]], axis=-1)
            gate, up = jnp.split(matmul(x, w_gate_up_edf), 2, axis=-1)
            if self.has_lora:
                gate = gate + self._lora_update(
                    matmul, x, self.lora_gate_a_edr, self.lora_gate_b_erf
                )
                up = up + self._lora_update(matmul, x, self.lora_up_a_edr, self.lora_up_b_erf)
        else:
            gate = self._project(
                matmul, x, self.w_gate_edf, self.lora_gate_a_edr, self.lora_gate_b_erf
            )
            up = self._project(matmul, x, self.w_up_edf, self.lora_up_a_edr, self.lora_up_b_erf)
        hidden = jax.nn.silu(gate) * up
        return self._project(
            matmul, hidden, self.w_down_efd, self.lora_down_a_efr, self.lora_down_b_erd
        )

    def grouped(
        self,
        x_md: jax.Array,
        group_sizes_e: jax.Array,
        *,
        backend: str = "tiles",
        tile: int | None = None,
    ) -> jax.Array:
        """Rows sorted by expert, group_sizes_e[e] rows for expert e -> y_md.

        Rows past sum(group_sizes_e) come back zero. `backend` is one of `gmm.BACKENDS`
        (`gmm.resolve_backend` picks it): "ragged_dot" or "pallas" (`gmm.grouped_matmul`), or
        "tiles" (each group padded to whole tiles of `tile` rows, default `tile_for(M, E)`, and a
        loop over tiles).
        """
        if x_md.ndim != 2 or x_md.shape[-1] != self.dim:
            raise ValueError(f"ExpertBank.grouped expects x [M, {self.dim}], got {x_md.shape}")
        if group_sizes_e.shape != (self.num_experts,):
            raise ValueError(
                f"group_sizes must be [{self.num_experts}] (num_experts), got {group_sizes_e.shape}"
            )
        if backend not in BACKENDS:
            raise ValueError(f"grouped backend must be one of {BACKENDS}, got {backend!r}")
        if backend != "tiles":
            matmul = functools.partial(grouped_matmul, group_sizes_e=group_sizes_e, backend=backend)
            return self._swiglu(matmul, x_md)
        num_rows = x_md.shape[0]
        if tile is None:
            tile = self.tile_for(num_rows, self.num_experts)
        if tile < 1:
            raise ValueError(f"ExpertBank.grouped tile must be >= 1, got {tile}")
        dest_m, valid_m, tile_expert_t, num_tiles = tile_layout(group_sizes_e, num_rows, tile)
        num_padded = num_tiles * tile
        # Padded row p reads sorted row source_p (num_rows = a padding row); rows past the
        # groups are in no tile and come back zero.
        dest_m = jnp.where(valid_m, dest_m, num_padded)
        source_p = jnp.full((num_padded,), num_rows).at[dest_m].set(jnp.arange(num_rows))
        source_tc = source_p.reshape(num_tiles, tile)
        y_md = self.gathered(x_md, source_tc, jnp.ones(source_tc.shape), tile_expert_t)
        return y_md.astype(x_md.dtype)

    def tile_for(self, num_rows: int, num_experts: int) -> int:
        """Rows per tile for `gathered` at M rows over E experts: the fused SwiGLU multiplies chunks of
        tiles at once, so smaller tiles (less padding) cost it nothing; the per-tile LoRA matmuls
        amortise their loop overhead over larger ones."""
        return default_tile(num_rows, num_experts, max_tile=128 if self.has_lora else 64)

    def gathered(
        self,
        x_sd: jax.Array,
        source_tc: jax.Array,
        weight_tc: jax.Array,
        tile_expert_t: jax.Array,
    ) -> jax.Array:
        """Tile row (t, c) runs expert tile_expert_t[t] (E = none) on x_sd[source_tc[t, c]] and
        adds weight_tc[t, c] times the result to that source row: y_sd, float32.

        Without LoRA the gather, the whole FFN and the weighted add run in one loop over
        experts (`gmm.gathered_swiglu`). With LoRA the tiles are gathered first and run through
        tiled matmuls per projection (the adapters and their dropout sit between them).
        """
        if not self.has_lora:
            return gathered_swiglu(
                x_sd,
                self.w_gate_edf[...],
                self.w_up_edf[...],
                self.w_down_efd[...],
                source_tc,
                weight_tc,
                tile_expert_t,
            )
        x_tcd = jnp.take(x_sd, source_tc, axis=0, mode="fill", fill_value=0)
        matmul = functools.partial(tiled_matmul, tile_expert_t=tile_expert_t)
        y_tcd = self._swiglu(matmul, x_tcd, fuse_gate_up=True)
        y_pd = (y_tcd.astype(jnp.float32) * weight_tc[..., None]).reshape(-1, self.dim)
        return jnp.zeros_like(x_sd, jnp.float32).at[source_tc.reshape(-1)].add(y_pd, mode="drop")

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
