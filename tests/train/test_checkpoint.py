import grain.python as pygrain
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from unimoe.checkpoint import DAMAGED_DIR_SUFFIX, CheckpointMismatchError, Checkpointer


def _state(offset: int):
    return {
        'params': {
            'w': (jnp.arange(15.0).reshape(3, 5) + offset).astype(jnp.bfloat16),
            'b': jnp.full((5,), 0.5 + offset, jnp.float32),
        },
        'step': jnp.asarray(offset, jnp.int32),
        'ids': np.arange(7, dtype=np.int32) * (offset + 1),
    }


def _assert_state_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert np.asarray(a).dtype == np.asarray(e).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def _loader():
    return pygrain.DataLoader(
        data_source=pygrain.RangeDataSource(0, 23, 1),
        sampler=pygrain.IndexSampler(23, num_epochs=None, shuffle=True, seed=0),
        operations=[pygrain.Batch(batch_size=3)],
        worker_count=0,
    )


def test_round_trip_of_nested_bf16_and_int_state(tmp_path):
    with Checkpointer(tmp_path / 'stage', async_save=True) as ckpt:
        assert ckpt.latest_step() is None
        state = _state(2)
        assert ckpt.save(7, state)
        ckpt.wait()
        restored = ckpt.restore(7, jax.eval_shape(lambda: _state(0)))
    _assert_state_equal(restored, state)
    assert restored['params']['w'].dtype == jnp.bfloat16


def test_restored_iterator_yields_the_batch_after_the_save(tmp_path):
    iterator = iter(_loader())
    for _ in range(4):
        next(iterator)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(4, _state(4), iterator)
        ckpt.wait()
    following = [next(iterator) for _ in range(3)]

    fresh = iter(_loader())
    first_of_fresh = next(fresh)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.restore(4, jax.eval_shape(lambda: _state(0)), fresh)
    for batch in following:
        np.testing.assert_array_equal(next(fresh), batch)
    # Guards against a test that passes because every position yields the same batch.
    assert not np.array_equal(first_of_fresh, following[0])


def test_latest_step_respects_max_to_keep_and_survives_reopen(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in (1, 3, 5, 9):
            ckpt.save(step, _state(step))
        ckpt.wait()
        assert ckpt.latest_step() == 9
        assert ckpt.all_steps() == [5, 9]
    with Checkpointer(tmp_path, max_to_keep=2) as reopened:
        assert reopened.latest_step() == 9
        # Saving an existing step again (a run resumed at its last step) keeps the first save.
        assert not reopened.save(9, _state(100), force=True)
        _assert_state_equal(reopened.restore_raw(9), jax.device_get(_state(9)))
        with pytest.raises(ValueError, match='step 3'):
            reopened.restore(3, jax.eval_shape(lambda: _state(0)))


def test_interrupted_save_leaves_last_good_checkpoint(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(2, _state(2))
    # What a save killed mid-write leaves behind: orbax's temporary directory, never renamed.
    (tmp_path / '4.orbax-checkpoint-tmp-123').mkdir()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 2
        _assert_state_equal(ckpt.restore_raw(), jax.device_get(_state(2)))


def test_restore_raw_returns_numpy_values_of_the_latest_step(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _state(1))
        ckpt.save(6, _state(6), iter(_loader()))
        ckpt.wait()
        raw = ckpt.restore_raw()
        raw_first = ckpt.restore_raw(1)
    for leaf in jax.tree.leaves(raw):
        assert isinstance(leaf, np.ndarray)
    assert raw['params']['w'].dtype == ml_dtypes.bfloat16
    _assert_state_equal(raw, jax.device_get(_state(6)))
    _assert_state_equal(raw_first, jax.device_get(_state(1)))


def test_restore_raw_of_empty_directory_raises(tmp_path):
    with Checkpointer(tmp_path) as ckpt, pytest.raises(ValueError, match='no checkpoint'):
        ckpt.restore_raw()


def test_restore_with_iterator_when_none_was_saved_raises(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _state(1))
        ckpt.wait()
        with pytest.raises(ValueError, match='without a data iterator'):
            ckpt.restore(1, jax.eval_shape(lambda: _state(0)), iter(_loader()))


def test_mark_done_writes_summary_atomically(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        assert not ckpt.is_done()
        with pytest.raises(FileNotFoundError):
            ckpt.read_done()
        ckpt.mark_done({'final_step': 9, 'loss': 1.25})
        assert ckpt.is_done()
        assert ckpt.read_done() == {'final_step': 9, 'loss': 1.25}
    assert sorted(p.name for p in tmp_path.iterdir() if 'DONE' in p.name) == ['DONE.json']


def test_a_checkpoint_of_another_model_is_named_as_such_and_left_in_place(tmp_path):
    with Checkpointer(tmp_path / 'stage', async_save=False) as ckpt:
        ckpt.save(2, _state(0), force=True)
        ckpt.save(4, _state(1), force=True)
    changed = jax.eval_shape(lambda: _state(0))
    changed['params']['w'] = jax.ShapeDtypeStruct((3, 6), jnp.bfloat16)  # a wider layer
    changed['params']['new'] = jax.ShapeDtypeStruct((2,), jnp.float32)  # a new parameter
    del changed['params']['b']  # a parameter the model no longer has
    with Checkpointer(tmp_path / 'stage') as ckpt:
        with pytest.raises(CheckpointMismatchError) as error:
            ckpt.restore_latest(changed)
        assert ckpt.all_steps() == [2, 4]
    lines = error.value.problems
    assert lines[0].startswith(f"{tmp_path / 'stage'} step 4 was saved by a different model (3 ")
    assert lines[1:] == [
        'params/w: the model has (3, 6), the checkpoint (3, 5)',
        'params/b: the model lacks it',
        'params/new: the checkpoint lacks it',
    ]
    assert not (tmp_path / f'stage{DAMAGED_DIR_SUFFIX}').exists()  # nothing moved aside
    # The same model restores it.
    with Checkpointer(tmp_path / 'stage') as ckpt:
        step, state = ckpt.restore_latest(jax.eval_shape(lambda: _state(0)))
    assert step == 4
    _assert_state_equal(state, _state(1))
