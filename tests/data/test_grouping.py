"""Modality-level data parallelism: single-modality global batches, no record lost per epoch."""

import grain.python as grain
import numpy as np
import pytest

from unimoe.data import grouping


def test_modality_batches_cover_every_record_once_plus_wraparound():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 4, size=103)
    batch_size = 8
    batches = grouping.modality_batches(keys, batch_size, np.random.default_rng(1))
    counts = np.bincount(keys)
    assert len(batches) == sum(-(-c // batch_size) for c in counts)
    for batch in batches:
        assert len(set(keys[batch])) == 1
    assert set(batches.ravel()) == set(range(len(keys)))
    # Only the wrap-around repeats: batch_size * ceil(c / batch_size) - c per key.
    seen = np.bincount(batches.ravel(), minlength=len(keys))
    for key, count in enumerate(counts):
        repeats = seen[keys == key].sum() - count
        assert repeats == -(-count // batch_size) * batch_size - count < batch_size
    # A key with fewer records than a batch still gets one (its records repeated).
    small = grouping.modality_batches(np.array([0, 1, 1]), 4, np.random.default_rng(0))
    assert sorted(tuple(sorted(set(b))) for b in small) == [(0,), (1, 2)]


def test_sampler_shards_line_up_with_global_batches():
    keys = np.repeat([2, 5], [10, 7])
    batch_size, shard_count = 6, 3
    per_shard = batch_size // shard_count
    samplers = [
        grouping.ModalityBatchSampler(
            keys, batch_size, grain.ShardOptions(shard_index=i, shard_count=shard_count), seed=4
        )
        for i in range(shard_count)
    ]
    per_epoch = 2 + 2  # ceil(10/6) + ceil(7/6)
    # grain asks shard s for global index j * shard_count + s as its j-th record.
    rows = [
        [samplers[s][j * shard_count + s].record_key for j in range(2 * per_epoch * per_shard)]
        for s in range(shard_count)
    ]
    global_batches = np.concatenate([np.asarray(r).reshape(-1, per_shard) for r in rows], axis=1)
    for epoch in range(2):
        epoch_batches = global_batches[epoch * per_epoch : (epoch + 1) * per_epoch]
        for batch in epoch_batches:
            assert len(set(keys[batch])) == 1
        assert set(epoch_batches.ravel()) == set(range(len(keys)))
    assert not np.array_equal(global_batches[:per_epoch], global_batches[per_epoch:])
    with pytest.raises(ValueError, match="not divisible by shard_count"):
        grouping.ModalityBatchSampler(keys, 5, grain.ShardOptions(0, 2), seed=0)
