"""Test set-up before JAX starts: 8 simulated CPU devices (sharding tests need them), and one
persistent compilation cache for the session, shared with the subprocesses the tests start."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests build the same tiny models and steps, in this process (as new function objects, which
# jit's in-memory cache does not match) and in `python -m unimoe.main` / notebook subprocesses.
# Caching every executable by its HLO (JAX's persistent cache, thresholds at 0) compiles each once
# per session: a fresh process built the tiny model in 19 s without it and 1.8 s with it. The cache
# starts empty in every session, so no run depends on an earlier one.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="unimoe_test_jax_cache_")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402  (after the environment above, before any JAX import)


@pytest.fixture(scope='session')
def builtin_test_data(tmp_path_factory) -> str:
    """The built-in dataset's small `test` config, generated once per test session."""
    from unimoe.data import builtin

    data_dir = tmp_path_factory.mktemp('unimoe_builtin')
    builtin.prepare(data_dir, 'test')
    return str(data_dir)


@pytest.fixture(scope='session')
def tiny_recipe_run(builtin_test_data, tmp_path_factory):
    """(config, workdir, results table) of the tiny recipe at test size (`configs/unimoe_tiny.py:mode=test`),
    trained and evaluated once per session: the end-to-end test checks it, and the notebooks start
    from a copy of it (their `run_experiment` calls then skip the finished stages). Read-only:
    copy it before changing anything."""
    import pathlib

    from unimoe import config as config_lib
    from unimoe import run

    path = pathlib.Path(__file__).parent.parent / 'configs' / 'unimoe_tiny.py'
    config = config_lib.load_config(f'{path}:mode=test')
    config.data.data_dir = builtin_test_data
    workdir = tmp_path_factory.mktemp('tiny_recipe') / 'run'
    table = run.run_experiment(config, str(workdir))
    return config, workdir, table


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Groups for `pytest -n 2 --dist loadgroup` (what `make test` runs): a test file's tests run
    in one worker, so its module fixtures are built once; every test using the session's tiny
    recipe run shares one group, so that run is trained once.

    xdist's worker turns these marks into the `@group` suffix of the node ids in its own hook of
    the same name, so ours runs first (`tryfirst`). With pytest 9.2 that suffix is lost (setup.cfg
    pins pytest below it): every test was then scheduled alone, and both workers trained the tiny
    recipe (two 190 s runs, measured).
    """
    for item in items:
        if item.get_closest_marker('xdist_group') is not None:
            continue
        group = 'tiny_recipe' if 'tiny_recipe_run' in item.fixturenames else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
