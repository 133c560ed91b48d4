"""Scanned decoder layers on a mesh: the stacked layer axis is never sharded, and a sharded train
step of the scanned model equals the one-device step of the unrolled model at the same weights."""

import jax
import numpy as np
from flax import nnx

from tests.parallel.sharded_setup import LOSS, OPTIM, TRAINS, make_batch
from tests.tiny_model import TOKEN_IDS, model_dict, random_module
from unimoe import checkpoint, factory
from unimoe.models.unimoe import ModelSpec, UniMoE, UniMoEConfig
from unimoe.nn import sharding
from unimoe.parallel import mesh as mesh_lib, rules as rules_lib, sharded
from unimoe.train import optim, step as step_lib


def test_the_layer_axis_is_never_sharded():
    assert rules_lib.logical_axes('llm/blocks/layers/1/ffn/experts/w_gate_edf', 4) == (
        None, 'expert', 'embed', 'mlp'
    )  # fmt: skip
    assert rules_lib.logical_axes('llm/blocks/layers/0/attn/q/lora_b', 3) == (None, None, 'heads')
    # The encoders' layers are not stacked.
    assert rules_lib.logical_axes('vision/layers/0/attn/q/kernel', 2) == ('embed', 'heads')


def _model(scan: bool) -> UniMoE:
    md = model_dict()
    md.moe = dict(num_experts=4, top_k=2, router='topk_softmax')
    # 4 layers, MoE on even ones: 2 scanned blocks of (MoE, dense).
    md.llm = {**md.llm, 'num_layers': 4, 'scan_layers': scan, 'remat': 'full' if scan else 'none'}
    md.moe_layers = 'every_2'
    cfg = UniMoEConfig.for_stage(
        ModelSpec.from_dict(md),
        vocab_size=41, token_ids=TOKEN_IDS, num_labels=(5, 7), moe=True, lora_rank=2,
    )  # fmt: skip
    return UniMoE(cfg, rngs=nnx.Rngs(0))


def _step_metrics(model: UniMoE, plan: sharded.Plan | None) -> dict:
    graphdef, trainable, rest = nnx.split(model, factory.trainable_filter(TRAINS), ...)
    opt_state = optim.make_optimizer(OPTIM).init(trainable)
    state, batch = (trainable, opt_state, rest), make_batch(image=False)
    step_fn = step_lib.train_step_fn(graphdef, TRAINS, OPTIM, LOSS)
    if plan is None:
        return jax.jit(step_fn)(*state, batch, np.int32(0))[-1]
    placed = tuple(sharded.place(plan, tree) for tree in state)
    return sharded.jit_step(plan, step_fn)(*placed, sharded.shard_batch(plan, batch), np.int32(0))[-1]


def test_a_sharded_scanned_step_equals_the_unrolled_one():
    unrolled = random_module(lambda: _model(scan=False), scale=0.1)
    scanned = _model(scan=True)
    flat = {
        checkpoint.path_str(p): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(unrolled, nnx.Param))
    }
    origin = factory.load_params(scanned, [('unrolled', flat)])
    assert 'llm/blocks/layers/1/ffn/gate/kernel' in origin  # every 2nd layer is dense
    plan = sharded.Plan(
        mesh_lib.make_mesh(dict(fsdp=2, tensor=2, expert=2)), sharding.DEFAULT_RULES
    )
    expected = _step_metrics(unrolled, None)
    actual = _step_metrics(scanned, plan)
    for key in ('loss', 'ce', 'balance_loss', 'z_loss', 'grad_norm', 'expert_load'):
        np.testing.assert_allclose(actual[key], expected[key], rtol=2e-5, atol=2e-6, err_msg=key)
    stacked = nnx.state(scanned, nnx.Param)['llm']['blocks']['layers'][0]['attn']['q']['kernel']
    assert stacked.get_value().shape[0] == 2
