"""One train step of the tiny model on 8 simulated devices equals the single-device step."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests.parallel.sharded_setup import LOSS, OPTIM, TRAINS, initial_state, make_batch, tiny_config
from unimoe import checkpoint
from unimoe.models.llm import DecoderLM
from unimoe.nn import sharding
from unimoe.parallel import mesh as mesh_lib, rules as rules_lib, sharded
from unimoe.train import step as step_lib

# float32: the partitioned program sums in another order (per-shard partial sums, all-reduces).
RTOL, ATOL = 2e-5, 2e-6
MESHES = {
    'data8': dict(data=8),
    'data2_expert4': dict(data=2, expert=4),
    'fsdp2_tensor2_expert2': dict(fsdp=2, tensor=2, expert=2),
}


@pytest.fixture(scope='module')
def setup():
    graphdef, (trainable, opt_state, rest) = initial_state()
    batch = make_batch()
    step = jax.jit(step_lib.train_step_fn(graphdef, TRAINS, OPTIM, LOSS))
    reference = step(trainable, opt_state, rest, batch, np.int32(0))
    return graphdef, (trainable, opt_state, rest), batch, reference


def optim_moment(opt_state):
    """AdamW's first moment (`mu`) inside the optax chain state."""
    (found,) = [
        s.mu
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, 'mu'))
        if hasattr(s, 'mu')
    ]
    return found


def assert_trees_close(actual, expected):
    flat_a = jax.tree_util.tree_leaves_with_path(actual)
    flat_e = jax.tree_util.tree_leaves(expected)
    assert len(flat_a) == len(flat_e)
    for (path, a), e in zip(flat_a, flat_e):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(e), rtol=RTOL, atol=ATOL, err_msg=jax.tree_util.keystr(path)
        )


@pytest.mark.parametrize('mesh_name', list(MESHES))
def test_sharded_step_matches_one_device(setup, mesh_name):
    graphdef, state, batch, reference = setup
    plan = sharded.Plan(mesh_lib.make_mesh(MESHES[mesh_name]), sharding.DEFAULT_RULES)
    placed = tuple(sharded.place(plan, tree) for tree in state)
    global_batch = sharded.shard_batch(plan, batch)
    assert global_batch['tokens'].addressable_shards[0].data.shape == (8 // plan.batch_shards, 16)

    step = sharded.jit_step(plan, step_lib.train_step_fn(graphdef, TRAINS, OPTIM, LOSS))
    trainable, opt_state, rest, metrics = step(*placed, global_batch, np.int32(0))
    ref_trainable, ref_opt_state, _, ref_metrics = reference
    for key in ('loss', 'ce', 'balance_loss', 'z_loss', 'grad_norm', 'expert_load'):
        np.testing.assert_allclose(
            metrics[key], ref_metrics[key], rtol=RTOL, atol=ATOL, err_msg=key
        )
    assert_trees_close(trainable, ref_trainable)
    # The gradients: after one step AdamW's first moment is (1 - b1) * the clipped gradient (the
    # clip factor is the same, `grad_norm` matches), its second (1 - b2) * its square.
    mu, ref_mu = optim_moment(opt_state), optim_moment(ref_opt_state)
    assert len(jax.tree.leaves(mu)) == len(jax.tree.leaves(trainable))
    assert_trees_close(mu, ref_mu)
    assert_trees_close(opt_state, ref_opt_state)
    # The state stays sharded as the rules say after the step.
    flat = {checkpoint.path_str(p): v.get_value() for p, v in nnx.to_flat_state(trainable)}
    sizes = dict(plan.mesh.shape)
    for path in (
        'llm/layers/0/ffn/experts/w_gate_edf',
        'llm/layers/1/attn/q/kernel',
        'llm/embed/embedding',
        'vision/layers/0/mlp/fc1/kernel',
    ):
        names = rules_lib.logical_axes(path, flat[path].ndim)
        expected = sharding.partition_spec(names, flat[path].shape, sizes, plan.rules)
        assert flat[path].sharding.spec == expected, path


def test_rules_shard_the_fsdp_tensor_expert_mesh_as_written():
    mesh = mesh_lib.make_mesh(MESHES['fsdp2_tensor2_expert2'])
    sizes = dict(mesh.shape)
    spec = lambda path, shape: sharding.partition_spec(  # noqa: E731
        rules_lib.logical_axes(path, len(shape)), shape, sizes, sharding.DEFAULT_RULES
    )
    assert spec('llm/layers/0/ffn/experts/w_gate_edf', (4, 24, 20)) == P('expert', 'fsdp', 'tensor')
    assert spec('llm/layers/0/ffn/experts/w_down_efd', (4, 20, 24)) == P('expert', 'tensor', 'fsdp')
    assert spec('llm/layers/0/attn/o/kernel', (24, 24)) == P('tensor', 'fsdp')
    # 41 rows: the vocabulary is not divisible by tensor=2, so only the width is sharded.
    assert spec('llm/embed/embedding', (41, 24)) == P(None, 'fsdp')
    assert spec('llm/final_norm/scale', (24,)) == P(None)
    with pytest.raises(ValueError, match='matches no entry'):
        rules_lib.logical_axes('llm/new_block/weird_weight', 2)


def test_init_module_creates_sharded_params_equal_to_the_unsharded_init():
    plan = sharded.Plan(mesh_lib.make_mesh(MESHES['data2_expert4']), sharding.DEFAULT_RULES)
    cfg = tiny_config().llm
    lm = sharded.init_module(plan, lambda rngs: DecoderLM(cfg, rngs=rngs), seed=3)
    bank = lm.layers[0].ffn.experts.w_up_edf.get_value()
    assert bank.sharding.spec == P('expert', None, None)
    assert bank.addressable_shards[0].data.shape == (1, 24, 20)
    sharded_params = dict(nnx.to_flat_state(nnx.state(lm, nnx.Param)))
    # The same initialisers without shardings (jitted too: eager init compiles op by op).
    unsharded = jax.jit(lambda: nnx.state(DecoderLM(cfg, rngs=nnx.Rngs(3)), nnx.Param))()
    for path, value in nnx.to_flat_state(unsharded):
        np.testing.assert_allclose(
            sharded_params[path].get_value(),
            value.get_value(),
            rtol=1e-6,
            atol=1e-7,
            err_msg=checkpoint.path_str(path),
        )


def test_mesh_shape_resolves_minus_one_and_rejects_bad_sizes():
    assert mesh_lib.mesh_shape(dict(data=-1, expert=4), 8) == dict(
        data=2, fsdp=1, expert=4, tensor=1
    )
    with pytest.raises(ValueError, match='multiply'):
        mesh_lib.mesh_shape(dict(data=3), 8)
    with pytest.raises(ValueError, match='unknown axes'):
        mesh_lib.mesh_shape(dict(model=8), 8)
    with pytest.raises(ValueError, match='at most one'):
        mesh_lib.mesh_shape(dict(data=-1, fsdp=-1), 8)
