"""Training metrics: `metrics.jsonl`, TensorBoard event files and a tqdm progress bar."""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorboardX
import tqdm

METRICS_FILE = 'metrics.jsonl'
# Arrays are logged element-wise; larger ones belong in a separate artifact, not a scalar log.
MAX_ARRAY_SIZE = 1024
# How an array metric's elements are tagged in TensorBoard, one entry per axis: a prefix the index
# is appended to ('expert' -> expert0, expert1, ...) or the labels of its positions (('text',
# 'image', ...)). `expert_load` [L_moe, E] of MoE layers 1 and 3 has (('layer1', 'layer3'),
# 'expert'): tags `expert_load/layer3/expert0`. Declared by whoever makes the metric, since only
# it knows what an axis is (the decoder layers of an [L_moe] array are not 0..L_moe-1).
Axes = Sequence[str | Sequence[str]]


class MetricsWriter:
    """Logs `write(step, scalars)` to `<logdir>/metrics.jsonl` and TensorBoard; shows progress.

    Values may be Python/numpy/jax scalars or small arrays whose axes `axes[name]` names (`Axes`):
    an array without them is refused rather than tagged by guesswork. A non-finite value under a
    key containing `loss` raises `FloatingPointError`, before anything of that step is written.

    `initial_step` is the step training (re)starts after: records of later steps already in the
    log were written by a run killed after its last checkpoint, and are dropped (the resumed run
    writes them again), so `metrics.jsonl` has each step once; TensorBoard hides the killed
    run's events after it (`purge_step`).
    """

    def __init__(
        self,
        logdir: str | os.PathLike,
        *,
        total_steps: int,
        desc: str,
        disable_progress: bool = False,
        initial_step: int = 0,
        axes: Mapping[str, Axes] | None = None,
    ):
        if total_steps < 1:
            raise ValueError(f'MetricsWriter.total_steps must be >= 1, got {total_steps}')
        if not 0 <= initial_step <= total_steps:
            raise ValueError(
                f'MetricsWriter.initial_step must be in [0, {total_steps}], got {initial_step}'
            )
        self.axes = dict(axes or {})
        self.logdir = pathlib.Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        _drop_records_after(self.logdir / METRICS_FILE, initial_step)
        # Append, so a resumed run continues the same log.
        self._jsonl = open(self.logdir / METRICS_FILE, 'a', encoding='utf-8')
        self._tensorboard = tensorboardX.SummaryWriter(
            str(self.logdir), purge_step=initial_step + 1
        )
        self._progress = tqdm.tqdm(
            total=total_steps,
            initial=initial_step,
            desc=desc,
            disable=disable_progress,
            dynamic_ncols=True,
        )

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Logs one step's metrics; raises `FloatingPointError` on a non-finite loss."""
        record: dict[str, Any] = {'step': int(step)}
        tagged_values: list[tuple[str, float]] = []
        for name, value in scalars.items():
            if name == 'step':
                raise ValueError(
                    "MetricsWriter.write: 'step' is reserved; pass it as the step argument"
                )
            array = np.asarray(value, dtype=np.float64)
            if array.ndim == 0:
                record[name] = float(array)
                tagged_values.append((name, float(array)))
            else:
                record[name] = array.tolist()
                labels = self._axis_labels(name, array.shape)
                for index in np.ndindex(array.shape):
                    tag = '/'.join([name] + [axis[i] for axis, i in zip(labels, index)])
                    tagged_values.append((tag, float(array[index])))

        bad_losses = {
            name: value
            for name, value in tagged_values
            if 'loss' in name and not math.isfinite(value)
        }
        if bad_losses:
            raise FloatingPointError(f'non-finite loss at step {step}: {bad_losses}')

        self._jsonl.write(json.dumps(record) + '\n')
        self._jsonl.flush()
        for tag, value in tagged_values:
            self._tensorboard.add_scalar(tag, value, global_step=int(step))
        if 'loss' in record:
            self._progress.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)

    def _axis_labels(self, name: str, shape: tuple[int, ...]) -> list[list[str]]:
        """The TensorBoard label of every position of every axis of metric `name`."""
        axes = self.axes.get(name)
        if axes is None or math.prod(shape) > MAX_ARRAY_SIZE:
            raise ValueError(
                f'MetricsWriter.write: metric {name!r} has shape {shape}; only scalars and arrays '
                f'of at most {MAX_ARRAY_SIZE} elements whose axes are named (MetricsWriter axes=) '
                'are logged'
            )
        labels = [
            [f'{axis}{i}' for i in range(size)] if isinstance(axis, str) else list(axis)
            for axis, size in zip(axes, shape)
        ]
        if len(axes) != len(shape) or [len(axis) for axis in labels] != list(shape):
            raise ValueError(f'MetricsWriter: metric {name!r} has shape {shape}, axes {axes}')
        return labels

    def update(self, steps: int = 1) -> None:
        """Advances the progress bar by `steps` training steps."""
        self._progress.update(steps)

    def flush(self) -> None:
        self._jsonl.flush()
        self._tensorboard.flush()

    def close(self) -> None:
        self._progress.close()
        self._tensorboard.close()
        self._jsonl.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _drop_records_after(path: pathlib.Path, step: int) -> None:
    """Rewrites `path` (atomically) without the records of steps after `step`; a line cut short by
    a kill is dropped too (it is the file's last, written after the last checkpoint)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding='utf-8').splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                continue
            raise ValueError(f'{path}, line {number}: not a JSON record: {line!r:.200}') from None
        if record['step'] <= step:
            kept.append(line if line.endswith('\n') else line + '\n')
    if len(kept) < len(lines):
        tmp_path = path.with_name(path.name + '.tmp')
        tmp_path.write_text(''.join(kept), encoding='utf-8')
        os.replace(tmp_path, path)


def read_metrics(logdir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of `<logdir>/metrics.jsonl`, in the order written."""
    with open(pathlib.Path(logdir) / METRICS_FILE, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]
