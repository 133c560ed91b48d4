"""Checkpoints of one stage directory: train state + grain iterator position, and a DONE marker.

A thin wrapper over `orbax.checkpoint.CheckpointManager`. Each step is written to a temporary
directory and renamed when complete, so a save killed half-way leaves the previous checkpoint as
the latest one. The data iterator is stored beside the state so a resumed run continues the same
sample order.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import grain.python as pygrain
import jax
import orbax.checkpoint as ocp

DONE_FILE = 'DONE.json'
_STATE = 'state'
_DATA = 'data'


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
        items = {_STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[_DATA] = pygrain.PyGrainCheckpointSave(data_iterator)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

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
        """Blocks until an asynchronous save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
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
