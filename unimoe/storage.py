"""A run's writes failing for want of storage: disk full, read-only, not permitted.

Such a failure is the machine's limit, not a bug: the run stops with one line naming the path,
the free space of its filesystem and what to do (`StorageError`, a `config.UserError`), after the
last good checkpoint is kept. Python raises them as `OSError`s; orbax's array writes
(TensorStore) as `ValueError`s carrying the errno as `[os_error_code='28']` and the file as
`Failed writing: "<path>"`. `check_writable` refuses a workdir before training,
`check_free_space` a checkpoint that cannot fit before a byte of it is written, and
`storage_errors` turns a failure found while writing into a `StorageError`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pathlib
import re
import shutil
import sys
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from typing import NoReturn

from unimoe.config import UserError, debug_requested

# errno -> what the user reads.
_STORAGE_ERRNOS = {
    errno.ENOSPC: 'no space left on the device',
    errno.EDQUOT: 'disk quota exceeded',
    errno.EROFS: 'the filesystem is read-only',
    errno.EACCES: 'permission denied',
    errno.EPERM: 'operation not permitted',
    errno.EFBIG: 'file too large for the filesystem or the process limit',
}
_TENSORSTORE_ERRNO = re.compile(r"\[os_error_code='(\d+)'\]")
_TENSORSTORE_PATH = re.compile(r'(?:Failed writing|Error writing local file): "([^"]+)"')
# Set once a write failed for want of storage: other writers' threads then fail too.
_failed_for_storage = threading.Event()


class StorageError(UserError):
    """A write that failed for want of storage: the path, why, its filesystem's free space."""

    def __init__(self, path: str | os.PathLike, reason: str, then: str):
        self.path, self.reason = os.fspath(path), reason
        super().__init__([f'{self.path}: {reason} ({free_space(path)}); {then}'])


def free_space(path: str | os.PathLike) -> str:
    """'1.2 GiB free of 50.0 GiB' for the filesystem holding `path` (or its nearest parent)."""
    existing = pathlib.Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        usage, inodes = shutil.disk_usage(existing), os.statvfs(existing)
    except OSError:
        return 'free space unknown'
    # A filesystem out of inodes is full however many bytes it has left.
    no_inodes = ', no free inodes' if inodes.f_files and not inodes.f_favail else ''
    return f'{_gib(usage.free)} free of {_gib(usage.total)}{no_inodes}'


def _gib(n: int) -> str:
    return f'{n / 2**30:.1f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB'


def storage_failure(error: BaseException) -> tuple[str, str | None] | None:
    """(reason, path or None) if `error` or one of its causes is a storage failure, else None."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _STORAGE_ERRNOS:
            return _STORAGE_ERRNOS[seen.errno], seen.filename
        code = _TENSORSTORE_ERRNO.search(str(seen))
        if code and int(code.group(1)) in _STORAGE_ERRNOS:
            path = _TENSORSTORE_PATH.search(str(seen))
            return _STORAGE_ERRNOS[int(code.group(1))], path.group(1) if path else None
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def storage_errors(directory: pathlib.Path, then: Callable[[], str]) -> Iterator[None]:
    """Re-raises a storage failure inside the block as `StorageError` (`then()`: what to do, e.g.
    which checkpoint is kept); other errors pass unchanged."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - OSErrors, orbax's / TensorStore's ValueErrors
        failure = storage_failure(e)
        if failure is None:
            raise
        reason, path = failure
        _failed_for_storage.set()
        raise StorageError(path or directory, reason, then()) from e


def check_writable(directory: pathlib.Path, what: str) -> None:
    """Creates `directory` and a file in it, or raises `StorageError` / `UserError` saying why."""
    if directory.exists() and not directory.is_dir():
        raise UserError([f'{what} {directory} is a file, not a directory: give a directory'])
    probe = directory / f'.write-test-{uuid.uuid4().hex}'
    with storage_errors(directory, lambda: f'make {what} {directory} writable or choose another'):
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b'')
        probe.unlink()


# What a checkpoint takes beyond its arrays' bytes (measured on the tiny models: the storage
# format's index and metadata files, a filesystem block per small file).
CHECKPOINT_OVERHEAD = (1.1, 2**20)


def check_free_space(directory: pathlib.Path, array_bytes: int, then: str) -> None:
    """Raises `StorageError` if `directory`'s filesystem lacks the room for a checkpoint of
    `array_bytes` (with `CHECKPOINT_OVERHEAD`)."""
    factor, extra = CHECKPOINT_OVERHEAD
    needed = int(array_bytes * factor) + extra
    if shutil.disk_usage(directory).free < needed:
        raise StorageError(
            directory, f'{_gib(needed)} needed for the next checkpoint', then
        )


class QuietStorageFailures(logging.Filter):
    """Drops the log records of threads whose write failed for want of storage (orbax logs each
    failed write with its traceback, asyncio each unretrieved failure): the `StorageError` the
    run stops with says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += str(record.exc_info[1])
        failed = _TENSORSTORE_ERRNO.search(text)
        return not (failed and int(failed.group(1)) in _STORAGE_ERRNOS)


def quiet_storage_failures() -> None:
    """Installs `QuietStorageFailures` on the loggers of orbax (absl's) and asyncio, and drops the
    tracebacks of writer threads (TensorBoard's) dying of an `OSError` after one failed for want
    of storage."""
    for name in ('absl', 'asyncio'):
        logging.getLogger(name).addFilter(QuietStorageFailures())
    report = threading.excepthook

    def excepthook(args: threading.ExceptHookArgs) -> None:
        if not (isinstance(args.exc_value, OSError) and _failed_for_storage.is_set()):
            report(args)

    threading.excepthook = excepthook


def exit_after_storage_failure(error: StorageError) -> NoReturn:
    """Prints the error line and exits with code 2 at once: the writers' exit handlers
    (TensorBoard's flush) would only fail again on the same full or read-only disk, each with a
    traceback."""
    if debug_requested(sys.argv):
        traceback.print_exception(error)
    print(f'error: {error}', file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)
