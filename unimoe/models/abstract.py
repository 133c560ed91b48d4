"""Shape-only ("abstract") builds of modules: parameters as `jax.ShapeDtypeStruct`, no memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from flax import nnx

from unimoe.nn.rngs import traceable_rngs

ModuleT = TypeVar('ModuleT', bound=nnx.Module)


def abstract_module(build: Callable[[nnx.Rngs], ModuleT], seed: int = 0) -> ModuleT:
    """`build(rngs)` under `nnx.eval_shape`: the module with every array a ShapeDtypeStruct.

    `rngs` are `nn.rngs.traceable_rngs`: with plain ones the build is quadratic in the number of
    parameters (40 s for the paper-scale UniMoE instead of 1.5 s).
    """
    return nnx.eval_shape(lambda: build(traceable_rngs(seed)))
