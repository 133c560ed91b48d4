"""Fused routing for the MoE layer: the Pallas kernel of `unimoe.kernels.routing` where it runs,
its XLA reference (the `routing.py` router, bincount and a stable sort) elsewhere, and one VJP.

The backward pass (to the logits, through the weights) is the VJP of the XLA reference, which
makes the same choices as the kernel.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from unimoe.kernels import routing as kernel
from unimoe.kernels.gmm import GPU_PLATFORMS
from unimoe.moe import routing
from unimoe.moe.dispatch import stable_expert_order

F32 = jnp.float32
FUSED_ROUTERS = kernel.FUSED_ROUTERS
RouterSpec = kernel.RouterSpec
Routing = kernel.Routing


def _sort_outputs(columns_nk: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    experts_m = jnp.minimum(columns_nk, num_experts).reshape(-1)
    rank_m = stable_expert_order(experts_m, num_experts)[1]
    group_sizes_e = jnp.bincount(experts_m, length=num_experts)
    return group_sizes_e.astype(jnp.int32), rank_m.astype(jnp.int32)


def _reference_weights(spec: RouterSpec, logits_nc: jax.Array) -> tuple[jax.Array, jax.Array]:
    if spec.router == "topk_softmax":
        return routing.route_topk_softmax(logits_nc, spec.k)
    if spec.router == "softmax_topk":
        return routing.route_softmax_topk(logits_nc, spec.k, spec.renormalize)
    weights_nk, columns_nk, _ = routing.route_top_p(logits_nc, spec.top_p, spec.k)
    return weights_nk, columns_nk


def route_reference(logits_nc: jax.Array, spec: RouterSpec) -> Routing:
    """`route` in XLA: the `routing.py` router, bincount and a stable sort."""
    spec.check(logits_nc.shape[-1])
    weights_nk, columns_nk = _reference_weights(spec, logits_nc)
    return Routing(weights_nk, columns_nk, *_sort_outputs(columns_nk, spec.num_experts))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _route(spec: RouterSpec, block_tokens: int, interpret, logits_nc: jax.Array) -> Routing:
    return kernel.route_pallas(spec, block_tokens, interpret, logits_nc)


def _route_fwd(spec, block_tokens, interpret, logits_nc):
    return kernel.route_pallas(spec, block_tokens, interpret, logits_nc), logits_nc


def _route_bwd(spec, block_tokens, interpret, logits_nc, d_out):
    # Only the weights carry a gradient; the reference makes the same choices as the kernel.
    _, vjp = jax.vjp(lambda x: _reference_weights(spec, x)[0], logits_nc)
    return vjp(d_out.weights_nk)


_route.defvjp(_route_fwd, _route_bwd)


def route(
    logits_nc: jax.Array,
    spec: RouterSpec,
    *,
    block_tokens: int = 256,
    interpret: Any = None,
    platform: str | None = None,
) -> Routing:
    """Fused routing (module docstring); logits are read as float32 whatever their dtype.

    `platform` defaults to the default backend: TPU runs the Mosaic kernel, CPU the same kernel
    in interpret mode (`interpret` True or a `pltpu.InterpretParams`), GPU the XLA reference.
    """
    spec.check(logits_nc.shape[-1])
    if logits_nc.ndim != 2:
        raise ValueError(f"router logits must be [N, C], got shape {logits_nc.shape}")
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    platform = platform or jax.default_backend()
    if platform in GPU_PLATFORMS:
        return route_reference(logits_nc, spec)
    if interpret is None:
        interpret = platform == "cpu"
    if platform == "cpu" and not interpret:
        raise ValueError("Pallas kernels run on CPU only in interpret mode (interpret=True)")
    return _route(spec, block_tokens, interpret, logits_nc.astype(F32))
