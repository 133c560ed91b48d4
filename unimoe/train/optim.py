"""AdamW with linear warmup + cosine decay and global-norm clipping."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer hyper-parameters; `total_steps` counts warmup steps too."""

    learning_rate: float
    total_steps: int
    warmup_steps: int = 0
    end_lr_factor: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.999

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f'OptimConfig.learning_rate must be > 0, got {self.learning_rate}')
        if self.total_steps < 1:
            raise ValueError(f'OptimConfig.total_steps must be >= 1, got {self.total_steps}')
        # optax's cosine part needs at least one decay step after the warmup.
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(
                f'OptimConfig.warmup_steps must be in [0, total_steps={self.total_steps}), '
                f'got {self.warmup_steps}'
            )
        if not 0.0 <= self.end_lr_factor <= 1.0:
            raise ValueError(
                f'OptimConfig.end_lr_factor must be in [0, 1], got {self.end_lr_factor}'
            )
        if self.weight_decay < 0:
            raise ValueError(f'OptimConfig.weight_decay must be >= 0, got {self.weight_decay}')
        if not self.grad_clip > 0:
            raise ValueError(f'OptimConfig.grad_clip must be > 0, got {self.grad_clip}')
        for name in ('b1', 'b2'):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f'OptimConfig.{name} must be in [0, 1), got {value}')


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """0 -> lr linearly over `warmup_steps`, then cosine to `end_lr_factor * lr` at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_steps,
        end_value=cfg.end_lr_factor * cfg.learning_rate,
    )


def decay_mask(params) -> object:
    """True for leaves that get weight decay: matrices and larger, not norm scales or biases."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with the warmup-cosine schedule and masked decay."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(
            learning_rate=learning_rate_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        ),
    )
