import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from unimoe.train import optim


def test_schedule_warmup_then_cosine_at_hand_picked_steps():
    cfg = optim.OptimConfig(learning_rate=0.1, total_steps=12, warmup_steps=4, end_lr_factor=0.1)
    schedule = optim.learning_rate_schedule(cfg)
    # Cosine runs over the 8 steps after warmup, from 0.1 to 0.01.
    expected = {
        0: 0.0,
        1: 0.025,
        2: 0.05,
        4: 0.1,
        6: 0.01 + 0.045 * (1 + math.cos(math.pi / 4)),
        8: 0.055,
        12: 0.01,
        30: 0.01,
    }
    for step, lr in expected.items():
        assert float(schedule(step)) == pytest.approx(lr, rel=1e-5, abs=1e-8), step


def test_schedule_without_warmup_starts_at_peak():
    schedule = optim.learning_rate_schedule(optim.OptimConfig(learning_rate=2.0, total_steps=4))
    np.testing.assert_allclose(
        [float(schedule(s)) for s in range(5)],
        [2.0, 1 + math.cos(math.pi / 4), 1.0, 1 - math.cos(math.pi / 4), 0.0],
        rtol=1e-5,
        atol=1e-6,
    )


def test_decay_mask_excludes_1d_and_scalar_leaves():
    params = {
        'w': jnp.ones((3, 5)),
        'b': jnp.ones(5),
        'norm': {'scale': jnp.ones(5)},
        'experts': jnp.ones((2, 3, 5)),
        'count': jnp.ones(()),
    }
    assert optim.decay_mask(params) == {
        'w': True,
        'b': False,
        'norm': {'scale': False},
        'experts': True,
        'count': False,
    }


def _reference_adamw(params, grads_seq, cfg, decay):
    """Plain numpy clip + AdamW (optax conventions: eps=1e-8 outside the sqrt, lr of step t-1)."""
    schedule = optim.learning_rate_schedule(cfg)
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    for t, grads in enumerate(grads_seq, start=1):
        norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in grads.values()))
        scale = min(1.0, cfg.grad_clip / norm)
        lr = float(schedule(t - 1))
        for k in params:
            g = np.asarray(grads[k], np.float64) * scale
            m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g
            v[k] = cfg.b2 * v[k] + (1 - cfg.b2) * g * g
            m_hat, v_hat = m[k] / (1 - cfg.b1**t), v[k] / (1 - cfg.b2**t)
            step = m_hat / (np.sqrt(v_hat) + 1e-8) + cfg.weight_decay * params[k] * decay[k]
            params[k] = params[k] - lr * step
    return params


def test_make_optimizer_matches_reference_clip_adamw():
    cfg = optim.OptimConfig(
        learning_rate=0.5,
        total_steps=5,
        warmup_steps=1,
        weight_decay=0.3,
        grad_clip=0.7,
        b1=0.8,
        b2=0.95,
    )
    rng = np.random.default_rng(0)
    params = {
        'w': rng.normal(size=(3, 5)).astype(np.float32),
        'b': rng.normal(size=(5,)).astype(np.float32),
    }
    # Grad scales differ by 100x across steps, so clipping changes the Adam moments.
    grads_seq = [
        {k: (s * rng.normal(size=p.shape)).astype(np.float32) for k, p in params.items()}
        for s in (100.0, 0.01, 1.0)
    ]
    tx = optim.make_optimizer(cfg)
    state = tx.init(params)
    current = jax.tree.map(jnp.asarray, params)
    for grads in grads_seq:
        updates, state = tx.update(grads, state, current)
        current = optax.apply_updates(current, updates)
    expected = _reference_adamw(params, grads_seq, cfg, decay={'w': 1.0, 'b': 0.0})
    for k in params:
        np.testing.assert_allclose(current[k], expected[k], rtol=1e-5, atol=1e-6)


def test_make_optimizer_on_nnx_param_state_decays_only_kernels():
    model = nnx.Linear(3, 5, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    cfg = optim.OptimConfig(learning_rate=0.1, total_steps=3, weight_decay=0.5)
    tx = optim.make_optimizer(cfg)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    # Zero gradients: the only update is decoupled decay -lr * wd * p on the kernel.
    np.testing.assert_allclose(updates['kernel'][...], -0.05 * params['kernel'][...], rtol=1e-6)
    np.testing.assert_array_equal(updates['bias'][...], np.zeros(5))


@pytest.mark.parametrize(
    'field, value',
    [
        ('learning_rate', 0.0),
        ('total_steps', 0),
        ('warmup_steps', 10),
        ('warmup_steps', -1),
        ('end_lr_factor', 1.5),
        ('weight_decay', -0.1),
        ('grad_clip', 0.0),
        ('b1', 1.0),
        ('b2', -0.1),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    kwargs = {'learning_rate': 1e-3, 'total_steps': 10, field: value}
    with pytest.raises(ValueError, match=field):
        optim.OptimConfig(**kwargs)
