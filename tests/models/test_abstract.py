"""Abstract (shape-only) builds match the real model, parameter by parameter."""

import jax
from flax import nnx

from tests.tiny_model import model_config
from unimoe.models.abstract import abstract_module
from unimoe.models.unimoe import UniMoE


def _shapes(model: nnx.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    return {
        '/'.join(map(str, path)): (tuple(v.get_value().shape), str(v.get_value().dtype))
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def test_abstract_module_has_the_real_modules_params():
    cfg = model_config(moe=True, lora_rank=2)
    abstract = abstract_module(lambda rngs: UniMoE(cfg, rngs=rngs))
    real = UniMoE(cfg, rngs=nnx.Rngs(0))
    assert _shapes(abstract) == _shapes(real)
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
