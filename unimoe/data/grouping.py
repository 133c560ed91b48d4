"""Modality-level data parallelism: every global batch holds records of one modality combination.

Uni-MoE's `group_by_modality_length` sampler (docs/design.md, "Modality-level data parallelism") buckets the
records per modality type, cuts each bucket into batches of the global (all-device) batch size
and shuffles the batches of all buckets together, so each optimizer step sees one modality
combination. It drops each type's last batch, even a full one; here the last partial batch of a
type is completed with that type's first records of the epoch instead, so every record is seen
every epoch (at most batch_size - 1 of them twice per type).

Shards (hosts) all compute the same global batches from the same seed and each takes its own
contiguous rows of every batch, so a global batch is single-modality across hosts too.
"""

from __future__ import annotations

import sys

import grain.python as grain
import numpy as np


def modality_batches(
    keys: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    *,
    lengths: np.ndarray | None = None,
    length_window: int = 0,
) -> np.ndarray:
    """One epoch of batches: int64 [num_batches, batch_size] record indices, one key per batch.

    Per key: shuffle its records; with `lengths`, sort each window of `length_window` batches by
    length, longest first (Uni-MoE's length grouping); cut into batches, the last one completed
    by wrapping around to the key's first records. Then the batches of all keys are shuffled.
    """
    keys = np.asarray(keys)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if keys.ndim != 1 or len(keys) == 0:
        raise ValueError(
            f"keys must be a non-empty 1-D array (one key per record), got {keys.shape}"
        )
    batches = []
    for key in np.unique(keys):
        members = rng.permutation(np.flatnonzero(keys == key))
        if lengths is not None and length_window > 0:
            window = batch_size * length_window
            for start in range(0, len(members), window):
                part = members[start : start + window]
                members[start : start + window] = part[np.argsort(-lengths[part], kind="stable")]
        num_batches = -(-len(members) // batch_size)
        # np.resize repeats the array cyclically: the wrap-around fill.
        batches.append(
            np.resize(members, num_batches * batch_size).reshape(num_batches, batch_size)
        )
    all_batches = np.concatenate(batches).astype(np.int64)
    return all_batches[rng.permutation(len(all_batches))]


def shard_rows(batches: np.ndarray, shard_index: int, shard_count: int) -> np.ndarray:
    """This shard's rows of every global batch, flattened in batch order."""
    batch_size = batches.shape[1]
    if batch_size % shard_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by shard_count={shard_count}")
    per_shard = batch_size // shard_count
    return batches[:, shard_index * per_shard : (shard_index + 1) * per_shard].reshape(-1)


class ModalityBatchSampler:
    """A grain sampler (for `grain.DataLoader`) over epochs of `modality_batches`, forever.

    grain's loader asks shard s for global index j * shard_count + s as its j-th record; that
    record is row j % per_shard of this shard's slice of global batch j // per_shard, so the
    loader's per-shard batches of batch_size / shard_count rows line up with the global batches.
    Pass the same `shard_options` to the loader.
    """

    def __init__(
        self, keys: np.ndarray, batch_size: int, shard_options: grain.ShardOptions, seed: int
    ):
        self._keys = np.asarray(keys)
        self._batch_size = batch_size
        self._shard_options = shard_options
        self._seed = seed
        self._per_shard = batch_size // shard_options.shard_count
        first = modality_batches(self._keys, batch_size, np.random.default_rng((seed, 0)))
        shard_rows(first, shard_options.shard_index, shard_options.shard_count)  # checks sizes
        self._batches_per_epoch = len(first)
        self._cached: tuple[int, np.ndarray] = (0, first)

    def __len__(self) -> int:
        return sys.maxsize

    def __repr__(self) -> str:
        return (
            f"ModalityBatchSampler(records={len(self._keys)}, batch_size={self._batch_size}, "
            f"shard_options={self._shard_options!r}, seed={self._seed})"
        )

    def _epoch(self, epoch: int) -> np.ndarray:
        if self._cached[0] != epoch:
            rng = np.random.default_rng((self._seed, epoch))
            self._cached = (epoch, modality_batches(self._keys, self._batch_size, rng))
        return self._cached[1]

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if index < 0:
            raise IndexError(f"sampler index must be >= 0, got {index}")
        position, shard = divmod(index, self._shard_options.shard_count)
        batch, row = divmod(position, self._per_shard)
        epoch, batch = divmod(batch, self._batches_per_epoch)
        record_key = self._epoch(epoch)[batch, shard * self._per_shard + row]
        rng = np.random.Generator(np.random.Philox(key=self._seed + index))
        return grain.RecordMetadata(index=index, record_key=int(record_key), rng=rng)
