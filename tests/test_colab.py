"""Installing the checkout on a Colab runtime: the notebook extra, and JAX with the runtime's
accelerator plugin rather than the CPU build."""

import subprocess
import sys

import pytest

from unimoe import colab


@pytest.mark.parametrize(
    'installed, jax',
    [
        ({'jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda12-pjrt'}, ['jax[cuda12]']),
        ({'jax', 'jax-cuda13-plugin'}, ['jax[cuda13]']),
        ({'jax', 'libtpu'}, ['jax[tpu]']),
        ({'jax', 'jaxlib', 'numpy'}, []),  # a CPU runtime: the plain pinned jax
    ],
)
def test_install_command_keeps_the_runtimes_accelerator(installed, jax):
    assert colab.install_command('/content/unimoe', installed) == [
        sys.executable, '-m', 'pip', 'install', '-q', '-e', '/content/unimoe[notebook]', *jax
    ]


def test_installed_distributions_are_canonical_names():
    installed = colab.installed_distributions()
    assert {'jax', 'ml-collections', 'orbax-checkpoint'} <= installed  # ml_collections on disk


def fake_runtime(monkeypatch, installed: set[str], imported: list[str]) -> list:
    commands = []
    monkeypatch.setattr(colab, 'installed_distributions', lambda: installed)
    monkeypatch.setattr(subprocess, 'run', lambda cmd, check: commands.append(cmd))
    for name in colab.RESTART_IF_IMPORTED:
        monkeypatch.delitem(sys.modules, name, raising=False)
    for name in imported:
        monkeypatch.setitem(sys.modules, name, sys)
    return commands


def test_install_is_skipped_once_unimoe_is_installed(monkeypatch):
    commands = fake_runtime(monkeypatch, {'unimoe', 'jax'}, ['jax'])
    colab.install('/content/unimoe')  # the cell run again, or after the restart
    assert commands == []


def test_install_runs_pip_and_asks_for_a_restart_when_jax_was_imported(monkeypatch):
    commands = fake_runtime(monkeypatch, {'jax', 'libtpu'}, ['jax'])
    with pytest.raises(RuntimeError, match=r"\['jax'\] were imported before the install"):
        colab.install('/content/unimoe')
    assert commands == [colab.install_command('/content/unimoe', {'libtpu'})]
    commands = fake_runtime(monkeypatch, {'jax'}, [])
    colab.install('/content/unimoe')  # nothing imported yet: no restart needed
    assert len(commands) == 1
