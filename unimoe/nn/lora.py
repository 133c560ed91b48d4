"""LoRA adapters (Hu et al. 2021) with the numerics of Hugging Face peft.

Adapter weights are `nnx.LoRAParam`, so optimizers and stage filters can select them apart from
base weights (note `nnx.LoRAParam` is a subclass of `nnx.Param`: filter LoRA first).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

# Hugging Face initializes LLaMA linears and embeddings with N(0, 0.02).
BASE_INIT_STDDEV = 0.02


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank 0 means no adapters; the update is scaled by alpha / rank as in peft."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    # Adapters on the dense FFNs of the layers that are not MoE too (Uni-MoE-audio and the
    # interleaved models: peft on every linear of the LM); attention and experts always have them.
    dense_ffn: bool = False

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"LoRAConfig.rank must be >= 0, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank > 0 else 0.0


def lora_a_init(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """peft's kaiming_uniform_(a=sqrt(5)) on A: gain sqrt(1/3) gives the bound 1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def lora_dropout(lora: LoRAConfig, rngs: nnx.Rngs) -> nnx.Dropout | None:
    """Dropout on the adapter input only (peft); None when there is nothing to drop."""
    if lora.enabled and lora.dropout > 0.0:
        return nnx.Dropout(lora.dropout, rngs=rngs)
    return None


def materialized_transpose(a_ij: jax.Array) -> jax.Array:
    """a_ij.T as an array of its own on CPU, for a weight gradient a.T @ b.

    XLA folds a plain transpose into the dot, and XLA:CPU runs a dot that contracts the row axes
    of both operands through Eigen, which packs the strided operand on every call; behind the
    barrier the transpose is a copy and the dot a plain row-major matmul (YNNPACK). Measured in
    one process on a 2-core CPU (docs/design.md, "Weight gradients"): a dense SwiGLU fwd+bwd at
    4096 x 512 -> 2048 in 0.91x the time. Other backends transpose in the matmul unit: no copy.
    """
    if jax.default_backend() != "cpu":
        return a_ij.T
    return jax.lax.optimization_barrier(a_ij.T)


@jax.custom_vjp
def matmul(x_ni: jax.Array, w_ij: jax.Array) -> jax.Array:
    """x_ni @ w_ij, with the weight gradient computed from `materialized_transpose(x)`."""
    return x_ni @ w_ij


def _matmul_fwd(x_ni, w_ij):
    return x_ni @ w_ij, (x_ni, w_ij)


def _matmul_bwd(res, dy_nj):
    x_ni, w_ij = res
    return dy_nj @ w_ij.T, materialized_transpose(x_ni) @ dy_nj


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias) + dropout(x) @ lora_a @ lora_b * scale.

    Weights are cast to the activation dtype, so the caller picks the compute dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        lora: LoRAConfig = LoRAConfig(),
        use_bias: bool = False,
        rngs: nnx.Rngs,
    ):
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                "Linear in_features and out_features must be > 0, "
                f"got {in_features}, {out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.lora_scale = lora.scale
        self.kernel = nnx.Param(
            BASE_INIT_STDDEV * jax.random.normal(rngs.params(), (in_features, out_features))
        )
        self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None
        if lora.enabled:
            self.lora_a = nnx.LoRAParam(
                lora_a_init(rngs.params(), (in_features, lora.rank), in_features)
            )
            # B starts at zero so a fresh adapter leaves the base model's function unchanged.
            self.lora_b = nnx.LoRAParam(jnp.zeros((lora.rank, out_features)))
        else:
            self.lora_a = None
            self.lora_b = None
        self.lora_dropout = lora_dropout(lora, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear expects last axis {self.in_features}, got input shape {x.shape}"
            )
        # Leading axes are flattened first: XLA:CPU runs the weight gradient of a 3-D x (two
        # contracting axes, batch and sequence) ~1.5x slower than the same 2-D matmul.
        lead = x.shape[:-1]
        x_nd = x.reshape(-1, self.in_features)
        y = matmul(x_nd, self.kernel[...].astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        if self.lora_a is not None:
            x_drop = self.lora_dropout(x) if self.lora_dropout is not None else x
            x_drop = x_drop.reshape(-1, self.in_features)
            delta = (x_drop @ self.lora_a[...].astype(x.dtype)) @ self.lora_b[...].astype(x.dtype)
            y = y + delta * self.lora_scale
        return y.reshape(*lead, self.out_features)

    def merge_adapters(self) -> None:
        """Folds the adapter into `kernel` and zeroes `lora_b`."""
        if self.lora_a is None:
            return
        self.kernel[...] = self.kernel[...] + self.lora_a[...] @ self.lora_b[...] * self.lora_scale
        self.lora_b[...] = jnp.zeros_like(self.lora_b[...])


def merge_lora(module: nnx.Module) -> None:
    """Folds every LoRA adapter under `module` into its base weight, in place.

    Any submodule that defines `merge_adapters()` (LoRA `Linear`, LoRA expert banks) takes part.
    The merged model computes the same function (dropout aside), and further training of the
    adapters starts again from a zero update.
    """
    for _, node in nnx.iter_modules(module):
        merge = getattr(node, "merge_adapters", None)
        if callable(merge):
            merge()
