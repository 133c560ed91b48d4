"""Runs `python -m unimoe.main` in this process, optionally interrupting it at a chosen point.

  python tests/reliability/driver.py [--kill_after_step=N | --kill_in_save=N |
      --sigterm_at_step=N | --fill_disk_after_step=N] --config=CONFIG.py --workdir=DIR

The interruptions are real: SIGKILL (no handler can run) right after step N's metrics line is
written and the checkpoints before it are committed, SIGKILL inside orbax's commit of step N's checkpoint (after its files are written,
before the rename that publishes it), SIGTERM to this process after step N's metrics line, or
SIGINT to its whole process group (a terminal's Ctrl-C, which data-loader workers get too);
`--poison_every` puts NaNs into some records (for the non-finite guard); `--fill_disk_after_step`
fills the workdir's filesystem after step N (ENOSPC from the next write).
"""

import os
import signal
import zlib

# Before jax starts (tests/conftest.py's 8 fake devices are not wanted here).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from orbax.checkpoint._src.path import atomicity  # noqa: E402
from unimoe import checkpoint, main as main_lib  # noqa: E402
from unimoe.data import pipeline  # noqa: E402
from unimoe.train import metrics  # noqa: E402

_KILL_AFTER_STEP = flags.DEFINE_integer('kill_after_step', 0, 'SIGKILL after this step is logged')
_KILL_IN_SAVE = flags.DEFINE_integer('kill_in_save', 0, 'SIGKILL while committing this step')
_SIGTERM_AT_STEP = flags.DEFINE_integer('sigterm_at_step', 0, 'SIGTERM after this step is logged')
_SIGINT_GROUP_AT_STEP = flags.DEFINE_integer(
    'sigint_group_at_step', 0, 'SIGINT to the whole process group (Ctrl-C) after this step'
)
_FILL_DISK_AFTER_STEP = flags.DEFINE_integer(
    'fill_disk_after_step', 0, 'fill the workdir\'s filesystem (a file beside it) after this step'
)
_POISON_EVERY = flags.DEFINE_integer(
    'poison_every', 0, 'NaN loss_mask in the records whose crc32(id) % N == 0'
)


def _after_logging(step: int, action) -> None:
    """`action()` once `step` is logged and earlier checkpoints are committed (an asynchronous
    save still in flight would make which checkpoint survives a matter of timing)."""
    write, save = metrics.MetricsWriter.write, checkpoint.Checkpointer.save
    checkpointers = []

    def save_and_remember(self, *args, **kwargs):
        checkpointers.append(self)
        return save(self, *args, **kwargs)

    def write_then_act(self, logged_step, scalars):
        write(self, logged_step, scalars)
        if logged_step == step:
            for ckpt in checkpointers:
                ckpt.wait()
            action()

    checkpoint.Checkpointer.save = save_and_remember
    metrics.MetricsWriter.write = write_then_act


def _signal(signum: int, *, group: bool = False) -> None:
    if group:  # as a terminal's Ctrl-C: data-loader workers get it too
        os.killpg(os.getpgrp(), signum)
    else:
        os.kill(os.getpid(), signum)


def _fill_disk(workdir: str) -> None:
    """Fills the workdir's filesystem with `<workdir>.filler` (another program taking the space),
    so the next write fails with ENOSPC."""
    with open(workdir.rstrip('/') + '.filler', 'wb') as filler:
        try:
            while True:
                filler.write(b'\0' * 65536)
                filler.flush()
        except OSError:
            pass


def _kill_in_commit(step: int) -> None:
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_or_die(self):
        if self.get_final().name == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die


def _poison_records(every: int) -> None:
    """A NaN in some records' loss mask: the loss and every gradient of their batch become NaN,
    as real data (a corrupt feature) or an overflow would make them. Chosen by record id, so the
    same batches are bad whatever the reader threads' order."""
    preprocess = pipeline._Preprocess.map

    def map_and_poison(self, record):
        example = preprocess(self, record)
        if example and zlib.crc32(pipeline._text(record['id']).encode()) % every == 0:
            example['loss_mask'] = np.full_like(example['loss_mask'], np.nan)
        return example

    pipeline._Preprocess.map = map_and_poison


def main(argv):
    if _KILL_AFTER_STEP.value:
        _after_logging(_KILL_AFTER_STEP.value, lambda: _signal(signal.SIGKILL))
    if _SIGTERM_AT_STEP.value:
        _after_logging(_SIGTERM_AT_STEP.value, lambda: _signal(signal.SIGTERM))
    if _SIGINT_GROUP_AT_STEP.value:
        _after_logging(_SIGINT_GROUP_AT_STEP.value, lambda: _signal(signal.SIGINT, group=True))
    if _FILL_DISK_AFTER_STEP.value:
        _after_logging(_FILL_DISK_AFTER_STEP.value, lambda: _fill_disk(flags.FLAGS.workdir))
    if _POISON_EVERY.value:
        _poison_records(_POISON_EVERY.value)
    if _KILL_IN_SAVE.value:
        _kill_in_commit(_KILL_IN_SAVE.value)
    main_lib.main(argv)


if __name__ == '__main__':
    app.run(main)
