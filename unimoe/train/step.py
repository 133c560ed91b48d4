"""Losses and the pure, jitted train step over `nnx.split` state."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from unimoe.models.unimoe import UniMoE
from unimoe.train import optim, stages

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]

LOSS_KINDS = ('chat', 'lm_text', 'classify_image', 'classify_audio')


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """`kind` is one of LOSS_KINDS (it equals the data mode the stage reads)."""

    kind: str = 'chat'
    balance_coef: float = 0.0
    z_coef: float = 0.0

    def __post_init__(self):
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"loss kind {self.kind!r} is not one of {LOSS_KINDS}")


def next_token_loss(
    logits_btv: jax.Array, tokens_bt: jax.Array, loss_mask_bt: jax.Array
) -> tuple[jax.Array, Metrics]:
    """Mean cross-entropy of token t+1 given positions <= t, over supervised tokens only."""
    logits = logits_btv[:, :-1].astype(jnp.float32)
    targets = tokens_bt[:, 1:]
    weights = loss_mask_bt[:, 1:].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    denom = jnp.maximum(weights.sum(), 1.0)
    correct = (logits.argmax(-1) == targets).astype(jnp.float32)
    return (ce * weights).sum() / denom, {
        'token_accuracy': (correct * weights).sum() / denom,
        'supervised_tokens': weights.sum(),
    }


def classification_loss(logits_bc: jax.Array, labels_b: jax.Array) -> tuple[jax.Array, Metrics]:
    """Cross-entropy over the examples that have a label (label >= 0)."""
    valid = (labels_b >= 0).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits_bc.astype(jnp.float32), jnp.maximum(labels_b, 0)
    )
    denom = jnp.maximum(valid.sum(), 1.0)
    correct = (logits_bc.argmax(-1) == labels_b).astype(jnp.float32)
    return (ce * valid).sum() / denom, {'accuracy': (correct * valid).sum() / denom}


def compute_loss(model: UniMoE, batch: Batch, cfg: LossConfig) -> tuple[jax.Array, Metrics]:
    if cfg.kind == 'classify_image':
        return classification_loss(model.classify_image(batch['image']), batch['image_label'])
    if cfg.kind == 'classify_audio':
        return classification_loss(model.classify_audio(batch['audio_mel']), batch['audio_label'])
    logits, aux = model(batch)
    ce, metrics = next_token_loss(logits, batch['tokens'], batch['loss_mask'])
    loss = ce + cfg.balance_coef * aux['balance_loss'] + cfg.z_coef * aux['z_loss']
    return loss, {
        **metrics,
        'ce': ce,
        'balance_loss': aux['balance_loss'],
        'z_loss': aux['z_loss'],
        'expert_load': aux['expert_load'],
    }


TrainStep = Callable[[nnx.State, Any, nnx.State, Batch], tuple[nnx.State, Any, nnx.State, Metrics]]


@functools.lru_cache(maxsize=None)
def make_train_step(
    graphdef: nnx.GraphDef, trains: str, optim_cfg: optim.OptimConfig, loss_cfg: LossConfig
) -> TrainStep:
    """Jitted `step(trainable, opt_state, rest, batch)`; cached so same-shaped stages compile once.

    `trainable` are the Params selected by `trains` (see `stages.trainable_filter`); `rest` is
    everything else (frozen params, RNG state for dropout). Buffers are donated: callers must use the
    returned state.
    """
    tx = optim.make_optimizer(optim_cfg)
    is_trainable = stages.trainable_filter(trains)

    def step(trainable, opt_state, rest, batch):
        def loss_fn(trainable, rest):
            # copy=True makes fresh Variables at this trace level, so dropout may advance its RNG count.
            model = nnx.merge(graphdef, trainable, rest, copy=True)
            loss, metrics = compute_loss(model, batch, loss_cfg)
            # Dropout advanced its RNG counters: hand the new `rest` back out of the pure function.
            _, _, new_rest = nnx.split(model, is_trainable, ...)
            return loss, (metrics, new_rest)

        (loss, (metrics, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, rest)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return (
            trainable,
            opt_state,
            rest,
            {**metrics, 'loss': loss, 'grad_norm': optax.tree.norm(grads)},
        )

    return jax.jit(step, donate_argnums=(0, 1, 2))
