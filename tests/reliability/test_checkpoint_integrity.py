"""Damaged checkpoints: named (step, file, why), skipped for the previous good one, moved aside;
a structure mismatch (a changed model) moves nothing."""

import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from unimoe import checkpoint
from unimoe.train import metrics


def _state(offset: float) -> dict:
    return {'w': jnp.arange(4096.0).reshape(64, 64) + offset, 'b': jnp.full((3,), offset)}


@pytest.fixture
def two_steps(tmp_path):
    with checkpoint.Checkpointer(tmp_path / 'ckpt') as ckpt:
        for step in (1, 2):
            ckpt.save(step, _state(step))
        ckpt.wait()
    return tmp_path / 'ckpt'


def _largest_array_file(step_dir):
    return max((p for p in step_dir.rglob('d/*') if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    path = _largest_array_file(step_dir)
    os.truncate(path, path.stat().st_size // 2)


DAMAGES = {
    'truncated array file': (_truncate, r'ckpt/2: ValueError: .*Error reading'),
    'deleted array file': (lambda d: _largest_array_file(d).unlink(), r'ckpt/2: ValueError: '),
    'garbage metadata': (
        lambda d: (d / 'state' / '_METADATA').write_text('{"tree'),
        r'ckpt/2/state/_METADATA: unreadable metadata',
    ),
    'garbage step metadata': (
        lambda d: (d / '_CHECKPOINT_METADATA').write_bytes(b'\0\0'),
        r'ckpt/2/_CHECKPOINT_METADATA: unreadable metadata',
    ),
    'missing state': (lambda d: shutil.rmtree(d / 'state'), r'ckpt/2/state: missing'),
}


@pytest.mark.parametrize('damage', sorted(DAMAGES))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(two_steps, damage, caplog):
    apply, message = DAMAGES[damage]
    apply(two_steps / '2')
    with checkpoint.Checkpointer(two_steps) as ckpt:
        step, state = ckpt.restore_latest({'w': _state(0)['w'], 'b': _state(0)['b']})
        assert step == 1 and ckpt.all_steps() == [1]
    np.testing.assert_array_equal(state['w'], _state(1)['w'])
    warning = next(m for r in caplog.records if 'is damaged' in (m := r.getMessage()))
    assert 'checkpoint step 2 is damaged' in warning
    assert re.search(message, warning), warning
    moved = list((two_steps.parent / 'ckpt_damaged').iterdir())
    assert [p.name.split('.')[0] for p in moved] == ['2']


def test_when_nothing_restores_every_step_is_named_and_nothing_moved(two_steps):
    for step in ('1', '2'):
        (two_steps / step / 'state' / '_METADATA').write_text('garbage')
    with checkpoint.Checkpointer(two_steps) as ckpt:
        with pytest.raises(checkpoint.DamagedCheckpointError, match=r'step 2 .*step 1 is damaged'):
            ckpt.restore_latest(_state(0))
        assert ckpt.all_steps() == [1, 2]


def test_a_changed_state_structure_is_an_error_not_damage(two_steps):
    with checkpoint.Checkpointer(two_steps) as ckpt:
        with pytest.raises(checkpoint.DamagedCheckpointError, match='no checkpoint .* restores'):
            ckpt.restore_latest({'w': jnp.zeros((64, 64)), 'extra': jnp.zeros(2)})
        assert ckpt.all_steps() == [1, 2]


def test_no_checkpoint_is_none(tmp_path):
    with checkpoint.Checkpointer(tmp_path / 'empty') as ckpt:
        assert ckpt.restore_latest(_state(0)) is None


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    lines = [json.dumps({'step': s, 'loss': 1.0 / s}) for s in range(1, 6)]
    # A kill mid-write leaves the last line cut short.
    (tmp_path / metrics.METRICS_FILE).write_text('\n'.join(lines) + '\n{"step": 6, "lo')
    with metrics.MetricsWriter(
        tmp_path, total_steps=9, desc='x', disable_progress=True, initial_step=3
    ) as writer:
        writer.write(4, {'loss': 0.5})
    assert [r['step'] for r in metrics.read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert metrics.read_metrics(tmp_path)[-1]['loss'] == 0.5


def test_a_garbage_line_before_the_end_is_an_error_naming_it(tmp_path):
    (tmp_path / metrics.METRICS_FILE).write_text('{"step": 1}\nxx\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r'metrics.jsonl, line 2: not a JSON record'):
        metrics.MetricsWriter(tmp_path, total_steps=9, desc='x', disable_progress=True)
