"""`config.distributed` -> `jax.distributed.initialize` arguments (the README's launch commands)."""

import pytest

from unimoe.parallel import distributed

# What the paper configs carry, so that the command line can override each field.
CONFIG_DEFAULTS = dict(auto=False, coordinator_address='', num_processes=1)


def test_the_config_defaults_mean_one_process():
    assert distributed.initialize_arguments(CONFIG_DEFAULTS) is None
    assert distributed.initialize_arguments(None) is None


def test_auto_over_the_config_defaults_lets_jax_detect_the_cluster():
    assert distributed.initialize_arguments({**CONFIG_DEFAULTS, 'auto': True}) == {}
    with pytest.raises(ValueError, match=r"drop \['num_processes'\]"):
        distributed.initialize_arguments({**CONFIG_DEFAULTS, 'auto': True, 'num_processes': 4})


def test_explicit_cluster_takes_the_process_id_from_the_environment(monkeypatch):
    cluster = {**CONFIG_DEFAULTS, 'coordinator_address': '10.0.0.1:1234', 'num_processes': 4}
    with pytest.raises(ValueError, match=r"needs \['process_id'\].*UNIMOE_PROCESS_ID"):
        distributed.initialize_arguments(cluster)
    monkeypatch.setenv(distributed.PROCESS_ID_ENV, '3')
    assert distributed.initialize_arguments(cluster) == dict(
        coordinator_address='10.0.0.1:1234', num_processes=4, process_id=3
    )
    with pytest.raises(ValueError, match='unknown fields'):
        distributed.initialize_arguments({**cluster, 'port': 1})
