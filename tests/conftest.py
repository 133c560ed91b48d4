"""Test set-up: 8 simulated CPU devices (sharding tests need them) before JAX starts."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402  (after the environment above, before any JAX import)


@pytest.fixture(scope='session')
def builtin_test_data(tmp_path_factory) -> str:
    """The built-in dataset's small `test` config, generated once per test session."""
    from unimoe.data import builtin

    data_dir = tmp_path_factory.mktemp('unimoe_builtin')
    builtin.prepare(data_dir, 'test')
    return str(data_dir)
