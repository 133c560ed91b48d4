import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.tiny_model import TOKEN_IDS, model_config, model_dict
from unimoe import checkpoint, factory
from unimoe.models.unimoe import ModelSpec, UniMoE, UniMoEConfig
from unimoe.parallel import sharded
from unimoe.train import optim
from unimoe.train import step as step_lib


def test_next_token_loss_counts_only_supervised_targets():
    # Vocab 2; position t predicts token t+1. Only token 2 (predicted from position 1) is supervised.
    logits = jnp.log(jnp.array([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]]))
    tokens = jnp.array([[0, 1, 0]])
    loss_mask = jnp.array([[1.0, 0.0, 1.0]])
    loss, metrics = step_lib.next_token_loss(logits, tokens, loss_mask)
    np.testing.assert_allclose(loss, -np.log(0.25), rtol=1e-6)
    assert float(metrics['token_accuracy']) == 0.0 and float(metrics['supervised_tokens']) == 1.0


def test_classification_loss_ignores_unlabelled_examples():
    logits = jnp.log(jnp.array([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]))
    loss, metrics = step_lib.classification_loss(logits, jnp.array([1, 1, -1]))
    np.testing.assert_allclose(loss, -(np.log(0.8) + np.log(0.4)) / 2, rtol=1e-6)
    np.testing.assert_allclose(metrics['accuracy'], 0.5)


def test_loss_kind_is_validated():
    with pytest.raises(ValueError, match='loss kind'):
        step_lib.LossConfig(kind='contrastive')


def test_train_step_updates_only_trainable_params_and_lowers_the_loss():
    model = UniMoE(model_config(moe=True, lora_rank=2), rngs=nnx.Rngs(0))
    trains = 'lora+router'
    graphdef, trainable, rest = nnx.split(model, factory.trainable_filter(trains), ...)
    frozen_before = jax.tree.map(
        np.array, nnx.state(model, nnx.Not(factory.trainable_filter(trains)))
    )
    optim_cfg = optim.OptimConfig(learning_rate=1e-2, total_steps=8)
    opt_state = optim.make_optimizer(optim_cfg).init(trainable)
    train_step = step_lib.make_train_step(
        sharded.make_plan(None),
        graphdef,
        trains,
        optim_cfg,
        step_lib.LossConfig(kind='chat', balance_coef=0.01),
    )
    rng = np.random.default_rng(0)
    batch = {
        'tokens': jnp.asarray(rng.integers(6, 41, size=(4, 11))),
        'loss_mask': jnp.ones((4, 11)),
        'attn_mask': jnp.ones((4, 11), bool),
    }
    losses = []
    for i in range(8):
        trainable, opt_state, rest, metrics = train_step(trainable, opt_state, rest, batch, i)
        losses.append(float(metrics['loss']))
    assert losses[-1] < losses[0] - 0.05
    assert metrics['expert_load'].shape == (2, 3)
    model = nnx.merge(graphdef, trainable, rest)
    frozen_after = nnx.state(model, nnx.Not(factory.trainable_filter(trains)))
    for (path, before), (_, after) in zip(
        nnx.to_flat_state(frozen_before), nnx.to_flat_state(frozen_after)
    ):
        if isinstance(after, nnx.Param):
            np.testing.assert_array_equal(
                np.asarray(before.get_value()),
                np.asarray(after.get_value()),
                err_msg=checkpoint.path_str(path),
            )


def test_expert_usage_by_modality_rows_are_each_modalitys_shares():
    # One MoE layer, two examples of modality 1 with (2, 0) and (1, 1) assignments to 2 experts.
    counts_lbe = jnp.array([[[2.0, 0.0], [1.0, 1.0]]])
    usage = step_lib.expert_usage_by_modality(counts_lbe, jnp.array([1, 1]))
    assert usage.shape == (len(step_lib.MODALITIES), 2)
    np.testing.assert_allclose(usage[1], [0.75, 0.25])
    np.testing.assert_array_equal(np.delete(np.asarray(usage), 1, axis=0), 0.0)


def test_metric_axes_name_moe_layers_by_their_decoder_layer_and_usage_by_modality():
    md = model_dict()
    md.llm.num_layers = 3
    md.moe_layers = 'every_2'  # MoE FFNs in decoder layers 0 and 2
    cfg = UniMoEConfig.for_stage(
        ModelSpec.from_dict(md),
        vocab_size=41, token_ids=TOKEN_IDS, num_labels=(5, 7), moe=True, lora_rank=0
    )
    model = nnx.eval_shape(lambda: UniMoE(cfg, rngs=nnx.Rngs(0)))
    axes = step_lib.metric_axes(model)
    assert axes['router_entropy'] == axes['dropped_fraction'] == (('layer0', 'layer2'),)
    assert axes['expert_load'] == (('layer0', 'layer2'), 'expert')
    assert axes['expert_usage_by_modality'] == (step_lib.MODALITIES, 'expert')


def test_router_bias_is_updated_by_the_step_from_the_load_not_by_the_optimizer():
    md = model_dict()
    md.moe = dict(num_experts=3, top_k=2, router='sigmoid_bias', bias_update_rate=0.125)
    cfg = UniMoEConfig.for_stage(
        ModelSpec.from_dict(md),
        vocab_size=41, token_ids=TOKEN_IDS, num_labels=(5, 7), moe=True, lora_rank=0
    )
    model = UniMoE(cfg, rngs=nnx.Rngs(0))
    trains = 'router'
    graphdef, trainable, rest = nnx.split(model, factory.trainable_filter(trains), ...)
    assert not any('router_bias' in checkpoint.path_str(p) for p, _ in nnx.to_flat_state(trainable))
    optim_cfg = optim.OptimConfig(learning_rate=1e-2, total_steps=2)
    opt_state = optim.make_optimizer(optim_cfg).init(trainable)
    train_step = step_lib.make_train_step(
        sharded.make_plan(None), graphdef, trains, optim_cfg, step_lib.LossConfig()
    )
    rng = np.random.default_rng(1)
    batch = {
        'tokens': jnp.asarray(rng.integers(6, 41, size=(3, 7))),
        'loss_mask': jnp.ones((3, 7)),
        'attn_mask': jnp.ones((3, 7), bool),
    }
    trainable, opt_state, rest, metrics = train_step(trainable, opt_state, rest, batch, 0)
    load_le = np.asarray(metrics['expert_load'])
    biases = [
        layer.ffn.router_bias.get_value()
        for layer in nnx.merge(graphdef, trainable, rest).llm.layers
    ]
    for load_e, bias_e in zip(load_le, biases, strict=True):
        expected = 0.125 * np.sign(load_e.mean() - load_e)
        np.testing.assert_allclose(bias_e, expected, atol=1e-7)
    assert np.abs(np.stack(biases)).max() > 0


def test_both_balance_losses_anneal_over_the_decay_steps():
    model = UniMoE(model_config(moe=True), rngs=nnx.Rngs(0))
    cfg = step_lib.LossConfig(
        kind='chat',
        balance_coef=0.1,
        balance_coef_end=0.0,
        dcmoe_coef=0.5,
        dcmoe_coef_end=0.1,
        balance_decay_steps=10,
    )
    rng = np.random.default_rng(1)
    batch = {
        'tokens': jnp.asarray(rng.integers(6, 41, size=(2, 9))),
        'loss_mask': jnp.ones((2, 9)),
        'attn_mask': jnp.ones((2, 9), bool),
    }
    loss_at = nnx.jit(lambda m, step: step_lib.compute_loss(m, batch, cfg, step))
    loss_0, m_0 = loss_at(model, 0)
    loss_5, m_5 = loss_at(model, 5)
    np.testing.assert_allclose([m_0['balance_weight'], m_0['dcmoe_weight']], [0.1, 0.5])
    np.testing.assert_allclose([m_5['balance_weight'], m_5['dcmoe_weight']], [0.05, 0.3])
    # Same model and batch: the losses differ by the change of the two weights only.
    expected = 0.05 * m_0['balance_loss'] + 0.2 * m_0['dcmoe_balance_loss']
    np.testing.assert_allclose(loss_0 - loss_5, expected, rtol=1e-4)
    assert m_0['dcmoe_balance_loss'] > 0
    with pytest.raises(ValueError, match='dcmoe_coef_end'):
        step_lib.LossConfig(dcmoe_coef=0.5, dcmoe_coef_end=0.1)


def test_micro_batches_accumulate_the_full_batch_gradient():
    """Two micro-batches of the same supervised token count give the full batch's update (the
    dense model, no dropout: the loss is then the mean of the micro-batches' means)."""
    model = UniMoE(model_config(moe=False, lora_rank=2), rngs=nnx.Rngs(0))
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if 'lora_b' in checkpoint.path_str(path):  # LoRA B starts at zero: give it gradients' use
            variable.set_value(0.1 * jnp.ones(variable.get_value().shape))
    trains = 'lora'
    graphdef, trainable, rest = nnx.split(model, factory.trainable_filter(trains), ...)
    optim_cfg = optim.OptimConfig(learning_rate=1e-2, total_steps=8)
    opt_state = optim.make_optimizer(optim_cfg).init(trainable)
    rng = np.random.default_rng(0)
    batch = {
        'tokens': jnp.asarray(rng.integers(6, 41, size=(4, 11))),
        'loss_mask': jnp.ones((4, 11)).at[:, :3].set(0.0),
        'attn_mask': jnp.ones((4, 11), bool),
    }
    results = {}
    for micro_batches in (1, 2, 4):
        step = jax.jit(
            step_lib.train_step_fn(
                graphdef, trains, optim_cfg, step_lib.LossConfig(kind='chat'), micro_batches
            )
        )
        results[micro_batches] = step(trainable, opt_state, rest, batch, np.int32(0))
    full_trainable, _, _, full_metrics = results[1]
    for micro_batches in (2, 4):
        new_trainable, _, _, metrics = results[micro_batches]
        np.testing.assert_allclose(metrics['loss'], full_metrics['loss'], rtol=1e-5)
        np.testing.assert_allclose(metrics['grad_norm'], full_metrics['grad_norm'], rtol=1e-4)
        assert float(metrics['supervised_tokens']) == float(full_metrics['supervised_tokens'])
        for (path, a), (_, b) in zip(
            nnx.to_flat_state(new_trainable), nnx.to_flat_state(full_trainable)
        ):
            np.testing.assert_allclose(
                a.get_value(), b.get_value(), rtol=1e-5, atol=1e-6, err_msg=str(path)
            )
    assert float(full_metrics['grad_norm']) > 0


def test_frozen_matrices_in_the_compute_dtype_change_no_number():
    """A bf16 LM's frozen float32 matrices held in bf16 (`factory.frozen_in_compute_dtype`): the
    same loss and gradients bit for bit, since every use casts them to bf16 anyway."""
    md = model_dict()
    md.llm = {**md.llm, 'dtype': 'bfloat16'}
    md.moe = dict(num_experts=4, top_k=2)
    cfg = UniMoEConfig.for_stage(
        ModelSpec.from_dict(md), vocab_size=41, token_ids=TOKEN_IDS, num_labels=(5, 7),
        moe=True, lora_rank=2,
    )  # fmt: skip
    model = UniMoE(cfg, rngs=nnx.Rngs(0))
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if 'lora_b' in checkpoint.path_str(path):
            variable.set_value(0.1 * jnp.ones(variable.get_value().shape))
    trains = 'lora+router+connectors'
    graphdef, trainable, rest = nnx.split(model, factory.trainable_filter(trains), ...)
    compact = factory.frozen_in_compute_dtype(rest, 'bfloat16')
    dtypes = {checkpoint.path_str(p): v.get_value().dtype for p, v in nnx.to_flat_state(compact)}
    assert dtypes['llm/layers/0/ffn/experts/w_up_edf'] == jnp.bfloat16
    assert dtypes['llm/layers/0/attn/q/kernel'] == jnp.bfloat16
    assert dtypes['llm/final_norm/scale'] == jnp.float32  # vectors keep theirs
    encoder = [d for path, d in dtypes.items() if path.startswith('vision/') and 'kernel' in path]
    assert encoder and all(d == jnp.float32 for d in encoder)  # the encoders keep theirs
    rng = np.random.default_rng(0)
    batch = {
        'tokens': jnp.asarray(rng.integers(6, 41, size=(4, 11))),
        'loss_mask': jnp.ones((4, 11)),
        'attn_mask': jnp.ones((4, 11), bool),
    }
    loss_fn = step_lib.make_loss_fn(
        graphdef, trains, step_lib.LossConfig(kind='chat', balance_coef=0.01)
    )
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, _), grads = value_and_grad(trainable, rest, batch, np.int32(0))
    (compact_loss, _), compact_grads = value_and_grad(trainable, compact, batch, np.int32(0))
    assert float(compact_loss) == float(loss)
    for a, b in zip(jax.tree.leaves(compact_grads), jax.tree.leaves(grads)):
        np.testing.assert_array_equal(a, b)
