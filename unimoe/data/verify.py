"""Checks downloaded dataset files against `data/checksums.tsv` (size and sha256 per file).

The table is in TFDS's url-checksums format (`URL<TAB>size<TAB>sha256<TAB>filename`) and is read
and computed with TFDS's own functions. Files are looked up by their filename anywhere under the
directory given. `--record OUT.tsv` writes the same line for every other file found, so a dataset
without published checksums (most of Uni-MoE's) can be pinned on first download and verified on
every later machine.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

from etils import epath
from tensorflow_datasets.core.download import checksums

DEFAULT_TABLE = pathlib.Path(__file__).resolve().parents[2] / 'data' / 'checksums.tsv'


@dataclasses.dataclass(frozen=True)
class FileStatus:
    filename: str
    status: str  # 'ok' | 'mismatch' | 'missing'
    detail: str = ''


def _files_by_name(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    found: dict[str, pathlib.Path] = {}
    for path in sorted(directory.rglob('*')):
        if path.is_file():
            found.setdefault(path.name, path)
    return found


def verify_dir(directory: str | os.PathLike, table: str | os.PathLike = DEFAULT_TABLE):
    """(status of every file the table names, paths of the files it does not name)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f'verify: {directory} is not a directory')
    expected = checksums.load_url_infos(table)
    found = _files_by_name(directory)
    statuses, named = [], set()
    for url, info in sorted(expected.items()):
        name = info.filename or url.rsplit('/', 1)[-1]
        named.add(name)
        if name not in found:
            statuses.append(FileStatus(name, 'missing', url))
            continue
        actual = checksums.compute_url_info(found[name])
        if actual == info:
            statuses.append(FileStatus(name, 'ok'))
        else:
            statuses.append(
                FileStatus(
                    name,
                    'mismatch',
                    f'{found[name]}: size {int(actual.size)} sha256 {actual.checksum}, expected '
                    f'size {int(info.size)} sha256 {info.checksum} (from {url})',
                )
            )
    others = [path for name, path in found.items() if name not in named]
    return statuses, others


def record(paths: list[pathlib.Path], directory: pathlib.Path, out: str | os.PathLike) -> None:
    """Appends (or updates) `out` with the size and sha256 of `paths`, keyed by their path."""
    infos = {
        path.relative_to(directory).as_posix(): checksums.compute_url_info(path) for path in paths
    }
    checksums.save_url_infos(epath.Path(out), infos)
