import math
import pathlib
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from unimoe.train import metrics


def tensorboard_scalars(logdir: pathlib.Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the TensorBoard event files in `logdir` (TFRecord framing: length,
    its CRC, the Event proto, its CRC)."""
    scalars = {}
    for path in sorted(logdir.glob('events.out.tfevents.*')):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from('<Q', data, offset)
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_jsonl_records_and_tensorboard_events(tmp_path):
    axes = {'expert_load': (('layer1', 'layer3'), 'expert'), 'entropy': ('layer',)}
    with metrics.MetricsWriter(
        tmp_path, total_steps=5, desc='s1', disable_progress=True, axes=axes
    ) as writer:
        writer.write(1, {'loss': jnp.float32(2.5), 'lr': np.float64(0.125), 'tokens': 96})
        writer.update(1)
        writer.write(
            2,
            {
                'loss': jnp.asarray(1.5, jnp.bfloat16),
                'expert_load': jnp.asarray([[0.25, 0.75], [0.5, 0.5]]),
                'entropy': np.asarray([0.5, 1.0, 0.0]),
            },
        )
        writer.update(1)
    assert metrics.read_metrics(tmp_path) == [
        {'step': 1, 'loss': 2.5, 'lr': 0.125, 'tokens': 96.0},
        {
            'step': 2,
            'loss': 1.5,
            'expert_load': [[0.25, 0.75], [0.5, 0.5]],
            'entropy': [0.5, 1.0, 0.0],
        },
    ]
    assert len(list(tmp_path.glob('events.out.tfevents.*'))) == 1
    # Element-wise tags name each axis by its declared labels or prefix.
    assert tensorboard_scalars(tmp_path) == {
        'loss': {1: 2.5, 2: 1.5},
        'lr': {1: 0.125},
        'tokens': {1: 96.0},
        'expert_load/layer1/expert0': {2: 0.25},
        'expert_load/layer1/expert1': {2: 0.75},
        'expert_load/layer3/expert0': {2: 0.5},
        'expert_load/layer3/expert1': {2: 0.5},
        'entropy/layer0': {2: 0.5},
        'entropy/layer1': {2: 1.0},
        'entropy/layer2': {2: 0.0},
    }


def test_reopening_appends(tmp_path):
    for step in (3, 4):
        with metrics.MetricsWriter(
            tmp_path, total_steps=4, desc='x', disable_progress=True, initial_step=step - 1
        ) as writer:
            writer.write(step, {'loss': 1.0})
    assert [r['step'] for r in metrics.read_metrics(tmp_path)] == [3, 4]


@pytest.mark.parametrize(
    'scalars',
    [
        {'loss': jnp.float32(math.nan)},
        {'loss': 1.0, 'balance_loss': np.float32(math.inf)},
        {'loss': 1.0, 'aux_loss': np.asarray([0.1, math.nan])},
    ],
)
def test_non_finite_loss_raises_naming_the_step_and_writes_nothing(tmp_path, scalars):
    with metrics.MetricsWriter(
        tmp_path, total_steps=9, desc='x', disable_progress=True, axes={'aux_loss': ('layer',)}
    ) as writer:
        writer.write(1, {'loss': 3.0})
        with pytest.raises(FloatingPointError, match='step 7'):
            writer.write(7, scalars)
    assert metrics.read_metrics(tmp_path) == [{'step': 1, 'loss': 3.0}]


def test_non_finite_non_loss_metric_is_logged(tmp_path):
    with metrics.MetricsWriter(tmp_path, total_steps=2, desc='x', disable_progress=True) as writer:
        writer.write(1, {'loss': 1.0, 'grad_norm': math.inf})
    assert metrics.read_metrics(tmp_path) == [{'step': 1, 'loss': 1.0, 'grad_norm': math.inf}]


def test_progress_bar_counts_steps_and_shows_loss(tmp_path, capsys):
    with metrics.MetricsWriter(tmp_path, total_steps=4, desc='stage1') as writer:
        writer.write(2, {'loss': 0.5})
        writer.update(2)
    err = capsys.readouterr().err
    assert 'stage1' in err and '2/4' in err and 'loss=0.5000' in err


@pytest.mark.parametrize(
    'scalars, field',
    [
        ({'big': np.zeros((2, 2, 2))}, 'big'),  # no axes named
        ({'huge': np.zeros(metrics.MAX_ARRAY_SIZE + 1)}, 'huge'),
        ({'load': np.zeros(2)}, 'load'),  # two axes named
        ({'usage': np.zeros((2, 3))}, r"shape \(2, 3\), axes \('expert', \('a', 'b'\)\)"),
        ({'step': 3}, 'step'),
    ],
)
def test_bad_metrics_raise_value_error(tmp_path, scalars, field):
    axes = {'huge': ('i',), 'load': ('layer', 'expert'), 'usage': ('expert', ('a', 'b'))}
    with metrics.MetricsWriter(
        tmp_path, total_steps=2, desc='x', disable_progress=True, axes=axes
    ) as writer:
        with pytest.raises(ValueError, match=field):
            writer.write(1, scalars)

