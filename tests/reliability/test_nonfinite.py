"""The non-finite guard: a NaN step changes nothing; 'stop' names the steps and parameters,
'skip' counts them and goes on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.reliability.conftest import CHECKPOINT_EVERY, STEPS
from tests.tiny_model import model_config
from unimoe import checkpoint, factory
from unimoe.models.unimoe import UniMoE
from unimoe.parallel import sharded
from unimoe.train import metrics, nonfinite, optim
from unimoe.train import step as step_lib


def _host(tree):
    return jax.tree.map(np.array, tree)


@pytest.fixture(scope='module')
def three_steps():
    """Steps 1-3 of a ViT classifier; step 2's batch has a NaN pixel."""
    model = UniMoE(model_config(), rngs=nnx.Rngs(0))
    graphdef, trainable, rest = nnx.split(model, factory.trainable_filter('vision'), ...)
    optim_cfg = optim.OptimConfig(learning_rate=1e-2, total_steps=8)
    opt_state = optim.make_optimizer(optim_cfg).init(trainable)
    train_step = step_lib.make_train_step(
        sharded.make_plan(None),
        graphdef,
        'vision',
        optim_cfg,
        step_lib.LossConfig(kind='classify_image'),
    )
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 4, 12, 12, 3)).astype(np.float32)
    images[1, 2, 5, 5, 0] = np.nan
    states, all_metrics = [_host((trainable, opt_state))], []
    for i in range(3):
        batch = {'image': jnp.asarray(images[i]), 'image_label': jnp.array([0, 1, 2, 3])}
        trainable, opt_state, rest, step_metrics = train_step(trainable, opt_state, rest, batch, i)
        states.append(_host((trainable, opt_state)))
        all_metrics.append(dict(step_metrics))
    return states, all_metrics, nonfinite.leaf_paths(trainable)


def _equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_a_nan_step_leaves_params_and_optimizer_unchanged(three_steps):
    states, all_metrics, _ = three_steps
    assert not _equal(states[1], states[0])  # step 1 trained
    assert _equal(states[2], states[1])  # step 2 (NaN) changed nothing, optimizer count included
    assert not _equal(states[3], states[2])  # step 3 trained again
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(states[3]))
    assert bool(all_metrics[1]['nonfinite_loss']) and np.all(all_metrics[1]['nonfinite_grads'])
    assert not bool(all_metrics[0]['nonfinite_loss'])
    assert not np.any(all_metrics[0]['nonfinite_grads'])


def test_stop_names_the_step_range_the_bad_step_and_parameters(three_steps):
    _, all_metrics, paths = three_steps
    guard = nonfinite.NonFiniteGuard('stop', paths, 's0')
    for step, step_metrics in enumerate(all_metrics, 1):
        guard.add(step, dict(step_metrics))
    with pytest.raises(
        nonfinite.NonFiniteError,
        match=r"stage 's0': non-finite values in steps 1-3 .*step 2: loss and gradients of "
        rf"{len(paths)} parameter\(s\): image_head/bias, .*vision/.* and {len(paths) - 8} more",
    ):
        guard.check()


def test_skip_counts_the_bad_steps(three_steps):
    _, all_metrics, paths = three_steps
    guard = nonfinite.NonFiniteGuard('skip', paths, 's0', skipped_steps=4)
    guard.add(1, dict(all_metrics[0]))
    guard.add(2, dict(all_metrics[1]))
    assert guard.check() == [2]
    guard.add(3, dict(all_metrics[2]))
    assert guard.check() == [] and guard.skipped_steps == 5


# Poisons records of the batches of steps 5 and 7 (the built-in loader's order is fixed by the
# stage's seed): NaN loss and gradients there.
POISON = '--poison_every=23'
BAD_STEPS = [5, 7]


@pytest.mark.slow
def test_stop_mode_ends_the_run_before_a_checkpoint_past_the_bad_step(runner, tmp_path):
    result = runner(tmp_path, POISON)
    assert result.returncode == 1
    assert (
        "NonFiniteError: stage 's': non-finite values in steps 5-5 (checked every log_every "
        'steps and before each checkpoint): step 5: loss and gradients of '
    ) in result.stderr
    assert 'llm/embed/embedding' in result.stderr
    assert [r['step'] for r in metrics.read_metrics(tmp_path / 's')] == [1, 2, 3, 4]
    with checkpoint.Checkpointer(tmp_path / 's' / 'checkpoints') as ckpt:
        assert ckpt.all_steps() == [CHECKPOINT_EVERY]


@pytest.mark.slow
def test_skip_mode_counts_skipped_steps_and_finishes(runner, tmp_path):
    result = runner(tmp_path, POISON, '--config.nonfinite=skip')
    assert result.returncode == 0, result.stderr[-3000:]
    logged = metrics.read_metrics(tmp_path / 's')
    assert [r['step'] for r in logged] == list(range(1, STEPS + 1))
    assert [r['step'] for r in logged if 'loss' not in r] == BAD_STEPS
    assert [r['nonfinite_steps'] for r in logged] == [0, 0, 0, 0, 1, 1, 2, 2]
    assert all(np.isfinite(r['loss']) for r in logged if 'loss' in r)
    with checkpoint.Checkpointer(tmp_path / 's' / 'checkpoints') as ckpt:
        assert int(ckpt.restore_raw(STEPS)['counters']['nonfinite_steps']) == len(BAD_STEPS)
