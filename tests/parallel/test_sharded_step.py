"""One train step of the tiny model on 8 simulated devices equals the single-device step."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests.tiny_model import TOKEN_IDS, model_dict, random_module
from unimoe.models.llm import DecoderLM
from unimoe.models.unimoe import UniMoE, UniMoEConfig
from unimoe.parallel import mesh as mesh_lib, rules as rules_lib, sharded
from unimoe.train import optim, stages, step as step_lib

# Everything but the probe heads trains, so gradients flow through every kind of sharded weight.
TRAINS = 'llm+vision+audio+connectors'
OPTIM = optim.OptimConfig(learning_rate=1e-3, total_steps=4)
LOSS = step_lib.LossConfig(kind='chat', balance_coef=0.01, z_coef=0.001)
# float32: the partitioned program sums in another order (per-shard partial sums, all-reduces).
RTOL, ATOL = 2e-5, 2e-6
MESHES = {
    'data8': dict(data=8),
    'data2_expert4': dict(data=2, expert=4),
    'fsdp2_tensor2_expert2': dict(fsdp=2, tensor=2, expert=2),
}


def tiny_config() -> UniMoEConfig:
    md = model_dict()
    md.moe = dict(num_experts=4, top_k=2, router='topk_softmax')
    return UniMoEConfig.from_dict(
        md, vocab_size=41, token_ids=TOKEN_IDS, num_labels=(5, 7), moe=True, lora_rank=2
    )


def make_batch() -> dict[str, np.ndarray]:
    """8 rows: 9 image placeholders (the ViT's patches) then text, some rows right-padded."""
    rng = np.random.default_rng(0)
    batch, seq = 8, 16
    tokens = rng.integers(6, 41, size=(batch, seq)).astype(np.int32)
    tokens[:, :9] = TOKEN_IDS['image_token_id']
    attn_mask = np.ones((batch, seq), bool)
    attn_mask[::3, 13:] = False
    return {
        'tokens': tokens,
        'attn_mask': attn_mask,
        'loss_mask': (attn_mask & (np.arange(seq) >= 9)).astype(np.float32),
        'image': rng.normal(size=(batch, 12, 12, 3)).astype(np.float32),
    }


@pytest.fixture(scope='module')
def setup():
    model = random_module(lambda: UniMoE(tiny_config(), rngs=nnx.Rngs(0)), scale=0.1)
    graphdef, trainable, rest = nnx.split(model, stages.trainable_filter(TRAINS), ...)
    opt_state = optim.make_optimizer(OPTIM).init(trainable)
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
    plan = sharded.Plan(mesh_lib.make_mesh(MESHES[mesh_name]), rules_lib.DEFAULT_RULES)
    placed = tuple(sharded.place(plan, tree) for tree in state)
    global_batch = sharded.shard_batch(plan, batch)
    assert global_batch['tokens'].addressable_shards[0].data.shape == (8 // plan.batch_shards, 16)

    step = sharded.jit_step(
        plan,
        step_lib.train_step_fn(graphdef, TRAINS, OPTIM, LOSS),
        placed,
        global_batch,
        donate=False,  # `placed` may alias the reference state's buffers on device 0
    )
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
    flat = {stages.path_str(p): v.get_value() for p, v in nnx.to_flat_state(trainable)}
    sizes = dict(plan.mesh.shape)
    for path in (
        'llm/layers/0/ffn/experts/w_gate_edf',
        'llm/layers/1/attn/q/kernel',
        'llm/embed/embedding',
        'vision/layers/0/mlp/fc1/kernel',
    ):
        names = rules_lib.logical_axes(path, flat[path].ndim)
        expected = rules_lib.partition_spec(names, flat[path].shape, sizes, plan.rules)
        assert flat[path].sharding.spec == expected, path


def test_rules_shard_the_fsdp_tensor_expert_mesh_as_written():
    mesh = mesh_lib.make_mesh(MESHES['fsdp2_tensor2_expert2'])
    sizes = dict(mesh.shape)
    spec = lambda path, shape: rules_lib.partition_spec(  # noqa: E731
        rules_lib.logical_axes(path, len(shape)), shape, sizes, rules_lib.DEFAULT_RULES
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
    plan = sharded.Plan(mesh_lib.make_mesh(MESHES['data2_expert4']), rules_lib.DEFAULT_RULES)
    cfg = tiny_config().llm
    lm = sharded.init_module(plan, lambda: DecoderLM(cfg, rngs=nnx.Rngs(3)))
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
            err_msg=stages.path_str(path),
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
