"""Checkpoints of one stage directory: train state + grain iterator position, and a DONE marker.

A thin wrapper over `orbax.checkpoint.CheckpointManager`. Each step is written to a temporary
directory and renamed when complete, so a save killed half-way leaves the previous checkpoint as
the latest one (the leftover temporary directory is deleted when the directory is opened again).
The data iterator is stored beside the state so a resumed run continues the same sample order.
`restore_latest` falls back past damaged checkpoints (truncated or deleted array files, garbage
metadata), naming the step and the file, and moves them aside. A readable checkpoint of another
model (a config changed on an existing workdir) is not damage: `CheckpointMismatchError` lists
the arrays whose shapes differ, read from the metadata before any array, and nothing is moved.

Parameters travel between stages, converted checkpoints and the model by their '/'-joined paths
(`path_str`, `flat_params`).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain.python as pygrain
import jax
import numpy as np
import orbax.checkpoint as ocp

from unimoe import storage
from unimoe.config import ConfigError

log = logging.getLogger(__name__)

DONE_FILE = 'DONE.json'
# Damaged checkpoints are moved here, beside the checkpoint directory, for inspection.
DAMAGED_DIR_SUFFIX = '_damaged'
_STATE = 'state'
_DATA = 'data'
# Files orbax and grain write as JSON; a garbage one is reported by name.
_JSON_FILES = ('_CHECKPOINT_METADATA', '_METADATA', '_sharding', '*.json', 'process_*')


# Differing arrays listed by `CheckpointMismatchError` (the count says how many in all).
_MAX_LISTED = 8


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{'/'-joined path: shape} of a state's array leaves (dict keys, attribute names and
    indices: a stored nnx Variable's 'value' key and an abstract one's `.value` read alike). RNG
    keys are left out: stored as their uint32 data, their shapes differ by design."""

    def key(entry: Any) -> str:
        for name in ('key', 'name', 'idx'):
            if hasattr(entry, name):
                return str(getattr(entry, name))
        return str(entry)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        '/'.join(key(k) for k in path): tuple(leaf.shape)
        for path, leaf in leaves
        if hasattr(leaf, 'shape') and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    }


class DamagedCheckpointError(ValueError):
    """The checkpoint of `step` cannot be restored; `str()` names the step, the file and why."""

    def __init__(self, step: int, path: str | os.PathLike, reason: str):
        self.step, self.path, self.reason = step, os.fspath(path), reason
        super().__init__(f'checkpoint step {step} is damaged: {self.path}: {reason}')


class CheckpointMismatchError(ConfigError):
    """A readable checkpoint saved by another model (the config changed since): nothing is moved
    aside. One line per differing array (path, shape the model expects, shape stored)."""

    def __init__(self, step: int, directory: pathlib.Path, differences: list[str]):
        super().__init__(
            [
                f"{directory} step {step} was saved by a different model ({len(differences)} "
                "arrays differ): the config changed since it was written; run that config again, "
                "or start this one in a new --workdir (the checkpoint is left as it is)",
                *differences[:_MAX_LISTED],
            ]
        )


class Checkpointer:
    """Saves and restores `{state, data iterator}` per step under `directory`.

    `data_iterator` arguments are grain iterators (`iter(grain.python.DataLoader(...))`).
    """

    def __init__(
        self, directory: str | os.PathLike, *, max_to_keep: int = 2, async_save: bool = True
    ):
        if max_to_keep < 1:
            raise ValueError(f'Checkpointer.max_to_keep must be >= 1, got {max_to_keep}')
        # orbax needs an absolute path.
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                # Leftovers of a save that was killed are never valid checkpoints.
                cleanup_tmp_directories=True,
            ),
        )

    def save(
        self, step: int, state: Any, data_iterator: Iterator | None = None, *, force: bool = False
    ) -> bool:
        """Starts saving `state` (a pytree of arrays) and the iterator position; returns if it saved.

        With `async_save` the arrays are copied to host before this returns, so the caller may
        donate or overwrite them; call `wait()` before relying on the files. A step that already has
        a checkpoint is not written again (a run resumed at its final step saves that step again).
        """
        if step in self._manager.all_steps():
            return False
        # Each process writes about its share; refused before a byte is written, the previous
        # checkpoint untouched (and complete: orbax would wait for it first anyway).
        self.wait()
        needed = sum(x.nbytes for x in jax.tree.leaves(state)) // jax.process_count()
        storage.check_free_space(self.directory, needed, self.kept_message())
        items = {_STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[_DATA] = pygrain.PyGrainCheckpointSave(data_iterator)
        with storage.storage_errors(self.directory, self.kept_message):
            return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def kept_message(self) -> str:
        """What a user reads after a write failed: which checkpoint is kept, how to go on."""
        complete = [s for s in self.all_steps() if self._step_dir(s).is_dir()]
        if not complete:
            return 'no checkpoint of it was complete yet: free space and run again to start over'
        return (
            f'the last good checkpoint (step {max(complete)}) is kept: free space, or move the '
            'workdir, and run the same command again to resume from it'
        )

    def latest_step(self) -> int | None:
        """The newest step saved (including one still being written asynchronously), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore(self, step: int, abstract_state: Any, data_iterator: Iterator | None = None) -> Any:
        """Restores the state into the structure/dtypes/shardings of `abstract_state`.

        `abstract_state` is typically `jax.eval_shape(init_fn)`. If `data_iterator` is given, its
        position is set in place to the one saved at `step`.
        """
        self._check_step(step)
        items = {_STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            if not (self._step_dir(step) / _DATA).is_dir():
                raise ValueError(
                    f'Checkpointer.restore: step {step} in {self.directory} was saved without a data '
                    'iterator, but data_iterator was given'
                )
            items[_DATA] = pygrain.PyGrainCheckpointRestore(data_iterator)
        return self._manager.restore(step, args=ocp.args.Composite(**items))[_STATE]

    def restore_latest(
        self, abstract_state: Any, data_iterator: Iterator | None = None
    ) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that restores, or None if there is none.

        A checkpoint that fails to restore is logged (step, file, reason) and the previous one
        tried. Once one restores, the newer failed ones are moved to `<directory>_damaged/` so
        the steps are saved afresh. If none restores, raises `DamagedCheckpointError` for the
        newest, listing all, and moves nothing. A checkpoint whose stored shapes differ from
        `abstract_state`'s raises `CheckpointMismatchError` at once and moves nothing.
        """
        failures: list[DamagedCheckpointError] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                self.verify_files(step)
                self.check_shapes(step, abstract_state)
                state = self.restore(step, abstract_state, data_iterator)
            except CheckpointMismatchError:
                raise  # readable, but of another model: not damage
            except Exception as e:  # orbax / tensorstore raise bare Exceptions, KeyErrors, ...
                failure = e if isinstance(e, DamagedCheckpointError) else self._damage(step, e)
                log.warning('%s; trying the previous checkpoint', failure)
                failures.append(failure)
                continue
            for failure in failures:
                self._move_aside(failure.step)
            return step, state
        if failures:
            newest = failures[0]
            raise DamagedCheckpointError(
                newest.step,
                newest.path,
                f'{newest.reason}; no checkpoint in {self.directory} restores: '
                + '; '.join(str(f) for f in failures[1:]),
            ) from newest
        return None

    def verify_files(self, step: int) -> None:
        """Raises `DamagedCheckpointError` naming the first missing part or unparsable metadata
        file of `step` (array data is checked by restoring it)."""
        step_dir = self._step_dir(step)
        if not (step_dir / _STATE).is_dir():
            raise DamagedCheckpointError(step, step_dir / _STATE, 'missing')
        for pattern in _JSON_FILES:
            for path in sorted(p for p in step_dir.rglob(pattern) if p.is_file()):
                try:
                    json.loads(path.read_bytes())
                except (OSError, ValueError) as e:
                    raise DamagedCheckpointError(step, path, f'unreadable metadata ({e})') from e

    def check_shapes(self, step: int, abstract_state: Any) -> None:
        """Raises `CheckpointMismatchError` if the arrays stored at `step` differ in shape from
        `abstract_state`'s, or its parameters by path, before any array is read."""
        handler = ocp.StandardCheckpointHandler()  # reads the metadata files, no array
        try:
            stored = _leaf_shapes(handler.metadata(self._step_dir(step) / _STATE))
        finally:
            handler.close()
        expected = _leaf_shapes(abstract_state)
        differences = [
            f'{path}: the model has {shape}, the checkpoint {stored[path]}'
            for path, shape in expected.items()
            if path in stored and stored[path] != shape
        ]
        for path in sorted(set(expected) ^ set(stored)):  # parameters only: other trees' paths
            if path.startswith('params/'):  # (optimizer states) may be spelt differently
                where = 'the checkpoint lacks it' if path in expected else 'the model lacks it'
                differences.append(f'{path}: {where}')
        if differences:
            raise CheckpointMismatchError(step, self.directory, differences)

    def _damage(self, step: int, error: BaseException) -> DamagedCheckpointError:
        # The innermost cause names the array and file (tensorstore: 'Error reading
        # "params.llm...kernel.value/0.0" in OCDBT database at local file ...'); orbax's wrapper
        # prints the whole TensorStore spec instead.
        root = error
        while root.__cause__ is not None:
            root = root.__cause__
        reason = f'{type(root).__name__}: {str(root).splitlines()[0] if str(root) else ""}'
        return DamagedCheckpointError(step, self._step_dir(step), reason)

    def _move_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            target = self.directory.with_name(self.directory.name + DAMAGED_DIR_SUFFIX)
            target.mkdir(exist_ok=True)
            destination = target / f'{step}.{time.time_ns()}'
            os.replace(self._step_dir(step), destination)
            log.warning('moved the damaged checkpoint of step %d to %s', step, destination)
        self._manager.reload()

    def restore_raw(self, step: int | None = None) -> Any:
        """The saved state (default: latest step) as numpy arrays, in the structure it was saved with.

        For initialising a later stage from this stage's weights without building its train state.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise ValueError(f'Checkpointer.restore_raw: no checkpoint in {self.directory}')
        self._check_step(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore()})
        )
        return jax.device_get(restored[_STATE])

    def wait(self) -> None:
        """Blocks until an asynchronous save has been committed (`StorageError` if it failed for
        want of storage)."""
        with storage.storage_errors(self.directory, self.kept_message):
            self._manager.wait_until_finished()

    def close(self) -> None:
        with storage.storage_errors(self.directory, self.kept_message):
            self._manager.close()

    def mark_done(self, summary: dict) -> None:
        """Records that the stage finished, with a JSON-serialisable `summary`."""
        self.wait()
        if jax.process_index() != 0:
            return
        path = self.directory / DONE_FILE
        tmp_path = path.with_name(path.name + '.tmp')
        tmp_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + '\n')
        os.replace(tmp_path, path)

    def is_done(self) -> bool:
        return (self.directory / DONE_FILE).is_file()

    def read_done(self) -> dict:
        path = self.directory / DONE_FILE
        if not path.is_file():
            raise FileNotFoundError(f'{path} does not exist: the stage has not finished')
        return json.loads(path.read_text())

    def final_params(self) -> tuple[dict[str, np.ndarray], list[str]]:
        """A finished stage's parameters at its final step: all of them ({path: array}, `flat_params`)
        and the paths it defined (DONE.json's `defined_params`: trained or taken from its sources;
        the others are its random init)."""
        done = self.read_done()
        params = flat_params(self.restore_raw(done['final_step'])['params'])
        return params, list(done['defined_params'])

    def _step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def _check_step(self, step: int) -> None:
        steps = self.all_steps()
        if step not in steps:
            raise ValueError(
                f'Checkpointer: no checkpoint for step {step} in {self.directory}; saved steps: {steps}'
            )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def path_str(path: Sequence[Any]) -> str:
    return '/'.join(str(p) for p in path)


def flat_params(raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flattens a raw (target-less) restored param tree into {'a/b/c': array}."""
    flat: dict[str, np.ndarray] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for key, child in node.items():
                visit(f'{prefix}/{key}' if prefix else str(key), child)
        else:
            flat[prefix.removesuffix('/value')] = np.asarray(node)

    visit('', raw)
    return flat
