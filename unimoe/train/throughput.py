"""Step time, tokens per second and MFU of a stage's steps between two log steps.

What the training log gets (`StepMeter.rates`, on each logged step but the first of a run):
- `step_time_s`: wall-clock seconds per step since the previous log step, data loading and
  checkpoint dispatch included; the first step of a run (it compiles) is never in it;
- `examples_per_s`: examples (the stage's global batch size per step) per second;
- `tokens_per_s`: non-padding positions of the LM's input (text and media tokens, `attn_mask`)
  per second, all processes (this process's count x process count: the processes' batches have
  the same shape, their padding may differ); only for stages whose loss reads text;
- `mfu`: model FLOPs utilisation, `tokens_per_s` x training FLOPs per token
  (`accounting.account_model`: the LM only, PaLM's 6N + attention, so encoder FLOPs are not in it)
  / the dense bf16 peak of the mesh's devices. Only where every device is a recognised
  accelerator (`PEAK_BF16_FLOPS`): on a CPU it is left out, not estimated.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from unimoe import accounting
from unimoe.config import StageConfig
from unimoe.models.unimoe import UniMoE

# Dense bf16 peak FLOP/s of one device (datasheets), by a substring of its `device_kind`; the
# first match wins, so variants come before their family. TPU v4 and later: one device per chip.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ('H100 PCIe', 756e12),
    ('H100 NVL', 835e12),
    ('H100', 989e12),  # SXM ('NVIDIA H100 80GB HBM3')
    ('H200', 989e12),
    ('A100', 312e12),
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),  # v5e
    ('TPU v5', 459e12),  # v5p
    ('TPU v6 lite', 918e12),  # v6e (Trillium)
)
# The keys `StepMeter.rates` may log: wall-clock measures, unlike every other metric of a step.
RATES = ('step_time_s', 'examples_per_s', 'tokens_per_s', 'mfu')
# Loss kinds (`step.LOSS_KINDS`) whose batches run text through the LM.
TEXT_LOSS_KINDS = ('chat', 'lm_text')


def peak_flops(devices: Iterable[Any]) -> float | None:
    """The summed dense bf16 peak of `devices`, or None unless every one is recognised."""
    total = 0.0
    for device in devices:
        peak = next((p for kind, p in PEAK_BF16_FLOPS if kind in device.device_kind), None)
        if peak is None:
            return None
        total += peak
    return total


class StepMeter:
    """Counts a run's steps and tokens and reports their rates between log steps.

    `batch_size` is the global batch; `flops_per_token` (None for stages without text: no
    `tokens_per_s`) and `peak` (FLOP/s of the devices, None if unknown) give `mfu`.
    """

    def __init__(self, *, batch_size: int, flops_per_token: float | None, peak: float | None):
        self.batch_size, self.flops_per_token, self.peak = batch_size, flops_per_token, peak
        # This process's token count stands for each process's: their batches have one shape.
        self._processes = jax.process_count()
        self._restart()

    def _restart(self) -> None:
        self._started, self._steps, self._tokens = time.perf_counter(), 0, 0

    def count(self, batch: Mapping[str, np.ndarray]) -> None:
        """Counts one step's host batch (this process's shard)."""
        self._steps += 1
        if self.flops_per_token is not None:
            self._tokens += int(np.count_nonzero(batch['attn_mask']))

    def restart_after(self, outputs: Any) -> float:
        """Waits for `outputs` (the first step's, so its compilation stays out of every rate);
        returns the seconds since the meter (re)started and restarts it."""
        jax.block_until_ready(outputs)
        seconds = time.perf_counter() - self._started
        self._restart()
        return seconds

    def rates(self) -> dict[str, float]:
        """The rates since the last restart (empty when no step was counted), then restarts.
        Call it after reading the step's metrics back: that waits for the steps counted."""
        seconds, steps = time.perf_counter() - self._started, self._steps
        if not steps:
            return {}
        rates = {
            'step_time_s': seconds / steps,
            'examples_per_s': self.batch_size * steps / seconds,
        }
        if self.flops_per_token is not None:
            rates['tokens_per_s'] = self._tokens * self._processes / seconds
            if self.peak is not None:
                rates['mfu'] = rates['tokens_per_s'] * self.flops_per_token / self.peak
        self._restart()
        return rates


def stage_meter(
    model: UniMoE, stage: StageConfig, seq_len: int, devices: Iterable[Any]
) -> StepMeter:
    """The meter of a stage training `model` on the mesh of `devices`."""
    flops = None
    if stage.mode in TEXT_LOSS_KINDS:
        flops = accounting.account_model(model, stage.trains, seq_len).train_flops_per_token
    return StepMeter(batch_size=stage.batch_size, flops_per_token=flops, peak=peak_flops(devices))
