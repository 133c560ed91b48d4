"""JAX's persistent compilation cache for the entry points (`run.run_experiment`, which
`python -m unimoe.main` and the notebooks call, and `python -m unimoe.eval`): a second run reads
the executables of the first from disk instead of compiling them again.

On by default in a user cache folder (`default_dir`); `config.compilation_cache_dir` moves it and
'' turns it off. A folder JAX already has (the `JAX_COMPILATION_CACHE_DIR` environment variable,
as the test suite sets, or an earlier `jax.config.update` in a notebook) is kept with its
thresholds: JAX opens its cache once per process, at the first compile after a folder is set.
"""

from __future__ import annotations

import collections
import functools
import os

import jax

# Written whatever their compile time or size: on the project's CPU, 84 of the 93 programs of the
# tiny recipe compile in under JAX's default threshold of 1 s each, 13.8 s together (a warm run
# would compile them again), and reading one costs milliseconds. A JAX environment variable of
# the same name (`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`) still wins.
_THRESHOLDS = {
    'jax_persistent_cache_min_compile_time_secs': 0.0,
    'jax_persistent_cache_min_entry_size_bytes': -1,  # -1: no size floor, none chosen by JAX
}
# jax.monitoring events counted for `summary` (a miss is recorded when the entry is written).
_HITS, _WRITES = '/jax/compilation_cache/cache_hits', '/jax/compilation_cache/cache_misses'
_counts: collections.Counter[str] = collections.Counter()


def default_dir() -> str:
    """`$XDG_CACHE_HOME/unimoe/jax`, else `~/.cache/unimoe/jax`."""
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'unimoe', 'jax')


def enable(directory: str) -> str | None:
    """Caches compiled programs in `directory` ('' : not at all), unless JAX already has a cache
    folder; returns the folder in use (None: none). Programs compiled before are not cached."""
    _count_cache_events()
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    if not directory:
        return None
    path = os.path.expanduser(directory)
    jax.config.update('jax_compilation_cache_dir', path)
    for name, value in _THRESHOLDS.items():
        if name.upper() not in os.environ:
            jax.config.update(name, value)
    return path


def summary() -> str:
    """What the cache did in this process so far, e.g. 'compilation cache DIR: 210 programs read,
    3 compiled and written'."""
    if not jax.config.jax_compilation_cache_dir:
        return 'compilation cache: off'
    return (
        f'compilation cache {jax.config.jax_compilation_cache_dir}: {_counts[_HITS]} programs '
        f'read, {_counts[_WRITES]} compiled and written'
    )


@functools.cache  # one listener per process
def _count_cache_events() -> None:
    jax.monitoring.register_event_listener(_count_event)


def _count_event(event: str, **kwargs) -> None:
    del kwargs
    if event in (_HITS, _WRITES):
        _counts[event] += 1
