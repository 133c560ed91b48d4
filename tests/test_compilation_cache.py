"""JAX's persistent compilation cache as the entry points set it (`unimoe.compilation_cache`):
a second process reads what the first compiled, in the user cache folder by default."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from unimoe import compilation_cache, config as config_lib, run

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A process setting the cache as `run_experiment` does, then compiling a small program (in
# milliseconds: JAX's default threshold of 1 s would not cache it).
_PROGRAM = """
import sys
import jax
from unimoe import compilation_cache
compilation_cache.enable(compilation_cache.default_dir() if sys.argv[1] == 'default' else sys.argv[1])
print(jax.jit(lambda x: x * 3 + 1)(jax.numpy.arange(5.0)).sum())
print(compilation_cache.summary())
"""


def _run(directory: str, xdg_cache: pathlib.Path, **jax_env: str) -> tuple[int, int]:
    """(programs read from the cache, programs written) by `_PROGRAM` in a new process whose
    JAX environment variables are `jax_env` only (not the test session's own cache)."""
    env = {k: v for k, v in os.environ.items() if 'CACHE' not in k}
    env.update(jax_env, XDG_CACHE_HOME=str(xdg_cache), PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, '-c', _PROGRAM, directory], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    if 'compilation cache: off' in result.stdout:
        return 0, 0
    found = re.search(r'(\d+) programs read, (\d+) compiled and written', result.stdout)
    assert found, result.stdout
    return int(found[1]), int(found[2])


def test_a_second_process_reads_what_the_first_compiled_in_the_user_cache(tmp_path):
    read, written = _run('default', tmp_path)
    assert read == 0 and written > 0
    assert len(list((tmp_path / 'unimoe' / 'jax').glob('*-cache'))) == written
    assert _run('default', tmp_path) == (written, 0)  # every program read, none compiled


def test_jax_s_own_cache_folder_wins_and_an_empty_folder_turns_the_cache_off(tmp_path):
    jax_dir = tmp_path / 'from_jax_env'
    # With JAX's folder JAX's thresholds stay: these small programs pass only at 0 s.
    _, written = _run(
        str(tmp_path / 'from_config'),
        tmp_path,
        JAX_COMPILATION_CACHE_DIR=str(jax_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    )
    assert len(list(jax_dir.glob('*-cache'))) == written > 0
    assert not (tmp_path / 'from_config').exists()
    assert _run('', tmp_path) == (0, 0)
    assert not (tmp_path / 'unimoe').exists()


def test_run_experiment_sets_the_configs_cache_folder_before_any_work(monkeypatch, tmp_path):
    config = config_lib.load_config(f'{ROOT / "configs" / "unimoe_tiny.py"}:mode=test')
    assert config.compilation_cache_dir == compilation_cache.default_dir()
    config.compilation_cache_dir = str(tmp_path / 'cache')
    enabled = []

    def enable(directory):
        enabled.append(directory)
        raise InterruptedError  # stop before the data is prepared

    def prepare_data(experiment):
        raise AssertionError('the data was prepared before the compilation cache was set')

    monkeypatch.setattr(compilation_cache, 'enable', enable)
    monkeypatch.setattr(run, 'prepare_data', prepare_data)
    with pytest.raises(InterruptedError):
        run.run_experiment(config, str(tmp_path / 'workdir'))
    assert enabled == [str(tmp_path / 'cache')]
