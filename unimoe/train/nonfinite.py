"""Host side of the non-finite guard: count skipped steps, or stop naming what went bad.

The train step (`step.train_step_fn`) never applies an update whose loss or gradients
are NaN / Inf, and returns per-step flags. Fetching them every step would synchronise host and
device, so the trainer hands each step's flags to `NonFiniteGuard.add` (device arrays, not read)
and calls `check()` where it reads the device anyway: every `log_every` steps, before each
checkpoint and at the end. With `mode='stop'` a check that finds a bad step raises
`NonFiniteError`, naming the steps it covered, the bad ones, and whether the loss and which
parameters' gradients were non-finite; with `mode='skip'` it only counts them.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import jax
import numpy as np

from unimoe.train import step as step_lib

MODES = ('skip', 'stop')
# Parameter paths named per bad step in the error; the rest are counted.
_MAX_PATHS = 8


class NonFiniteError(FloatingPointError):
    """A train step had a non-finite loss or gradient and the config says to stop."""


def leaf_paths(tree: Any) -> list[str]:
    """'/'-joined paths of `tree`'s leaves, in `jax.tree.leaves` order ('llm/embed/embedding')."""
    paths = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path]
        paths.append('/'.join(k for k in keys if k != 'value'))
    return paths


class NonFiniteGuard:
    """Collects the train step's non-finite flags of each step and checks them in batches."""

    def __init__(self, mode: str, grad_paths: list[str], stage: str, skipped_steps: int = 0):
        if mode not in MODES:
            raise ValueError(f"config.nonfinite={mode!r} must be one of {MODES}")
        self.mode, self.grad_paths, self.stage = mode, grad_paths, stage
        # Steps skipped since the stage started (restored from the checkpoint on resume).
        self.skipped_steps = skipped_steps
        self._pending: list[tuple[int, Any]] = []
        self._last_checked = 0

    def add(self, step: int, metrics: MutableMapping[str, Any]) -> None:
        """Takes the flags of `step` (1-based) out of the step's `metrics`."""
        self._pending.append((step, {k: metrics.pop(k) for k in step_lib.NONFINITE_KEYS}))

    def check(self) -> list[int]:
        """The bad steps since the last check (also counted in `skipped_steps`); in 'stop' mode,
        raises `NonFiniteError` if there is one."""
        if not self._pending:
            return []
        first = self._last_checked + 1
        pending, self._pending = jax.device_get(self._pending), []
        self._last_checked = pending[-1][0]
        bad = [
            (step, flags)
            for step, flags in pending
            if flags['nonfinite_loss'] or np.any(flags['nonfinite_grads'])
        ]
        self.skipped_steps += len(bad)
        if bad and self.mode == 'stop':
            details = '; '.join(self._describe(step, flags) for step, flags in bad)
            raise NonFiniteError(
                f"stage {self.stage!r}: non-finite values in steps {first}-{self._last_checked} "
                f"(checked every log_every steps and before each checkpoint): {details}. Those "
                "updates were not applied, so the last checkpoint is finite. Lower the learning "
                "rate or fix the data, or set config.nonfinite='skip' to drop such steps"
            )
        return [step for step, _ in bad]

    def _describe(self, step: int, flags: dict[str, np.ndarray]) -> str:
        parts = ['loss'] if flags['nonfinite_loss'] else []
        bad_paths = [p for p, b in zip(self.grad_paths, flags['nonfinite_grads']) if b]
        if bad_paths:
            more = len(bad_paths) - _MAX_PATHS
            named = ', '.join(bad_paths[:_MAX_PATHS]) + (f' and {more} more' if more > 0 else '')
            parts.append(f'gradients of {len(bad_paths)} parameter(s): {named}')
        return f"step {step}: {' and '.join(parts)}"
