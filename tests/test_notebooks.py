"""The Colab notebooks: each .ipynb matches its jupytext .py, and runs top to bottom (tiny mode)."""

import os
import pathlib
import shutil
import subprocess
import sys
import types

import jupytext
import nbclient
import nbformat
import pytest

from unimoe import colab

COLAB = pathlib.Path(__file__).parent.parent / 'colab'
NOTEBOOKS = sorted(p.stem for p in COLAB.glob('*.py'))


def code_cells(notebook: nbformat.NotebookNode) -> list[str]:
    return [cell.source.strip() for cell in notebook.cells if cell.cell_type == 'code']


def test_every_notebook_is_paired_with_its_script():
    assert NOTEBOOKS, 'no notebooks found'
    for name in NOTEBOOKS:
        paired = COLAB / f'{name}.ipynb'
        assert paired.exists(), f'{paired} missing: run `jupytext --sync colab/{name}.py`'
        script = jupytext.read(COLAB / f'{name}.py')
        assert code_cells(nbformat.read(paired, as_version=4)) == code_cells(script), (
            f'{paired} is out of date with {name}.py: run `jupytext --sync colab/{name}.py`'
        )


def setup_cell(name: str) -> str:
    return code_cells(jupytext.read(COLAB / f'{name}.py'))[0]


def test_every_notebook_starts_with_the_same_colab_setup_cell():
    first = {name: setup_cell(name) for name in NOTEBOOKS}
    assert 'REPO_URL = os.environ.get("UNIMOE_REPO_URL"' in first[NOTEBOOKS[0]]
    assert 'colab.install(CHECKOUT)' in first[NOTEBOOKS[0]]
    assert all(cell == first[NOTEBOOKS[0]] for cell in first.values()), first


def run_setup_cell_on_colab(monkeypatch, repo_url: str | None) -> list[tuple]:
    """Runs the setup cell as on a fresh Colab runtime (google.colab imported, no checkout);
    returns what it did, doing none of it."""
    calls = []
    monkeypatch.setitem(sys.modules, 'google.colab', types.ModuleType('google.colab'))
    monkeypatch.setattr(sys, 'path', list(sys.path))
    monkeypatch.setattr(os.path, 'isdir', lambda path: False)
    monkeypatch.setattr(subprocess, 'run', lambda cmd, check: calls.append(('run', cmd, check)))
    monkeypatch.setattr(os, 'chdir', lambda path: calls.append(('chdir', path)))
    monkeypatch.setattr(colab, 'install', lambda checkout: calls.append(('install', checkout)))
    if repo_url is None:
        monkeypatch.delenv('UNIMOE_REPO_URL', raising=False)
    else:
        monkeypatch.setenv('UNIMOE_REPO_URL', repo_url)
    exec(setup_cell(NOTEBOOKS[0]), {})
    return calls


def test_the_setup_cell_clones_changes_into_the_checkout_and_installs_on_colab(monkeypatch):
    calls = run_setup_cell_on_colab(monkeypatch, 'https://example.org/unimoe.git')
    checkout = '/content/unimoe'
    assert calls == [
        ('run', ['git', 'clone', '--depth=1', 'https://example.org/unimoe.git', checkout], True),
        ('chdir', checkout),
        ('install', checkout),
    ]


def test_the_setup_cell_refuses_the_placeholder_url(monkeypatch):
    with pytest.raises(ValueError, match='UNIMOE_REPO_URL'):
        run_setup_cell_on_colab(monkeypatch, None)


@pytest.fixture(scope='module')
def shared_workdir(tiny_recipe_run, tmp_path_factory) -> pathlib.Path:
    """One run directory for all notebooks, starting as a copy of the session's tiny recipe run
    (the quickstart's config, trained by the same `run.run_experiment`; the end-to-end test checks
    it): the notebooks' own `run_experiment` calls skip its finished stages and reuse its scores,
    and later notebooks reuse what earlier ones add."""
    workdir = tmp_path_factory.mktemp('notebook_run') / 'run'
    shutil.copytree(tiny_recipe_run[1], workdir)
    return workdir


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, builtin_test_data, shared_workdir, monkeypatch):
    notebook = nbformat.read(COLAB / f'{name}.ipynb', as_version=4)
    # As papermill does: a cell after the one tagged "parameters" overrides its values.
    index = next(
        i for i, c in enumerate(notebook.cells) if 'parameters' in c.metadata.get('tags', [])
    )
    overrides = f'TINY = True\nWORKDIR = {str(shared_workdir)!r}'
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(overrides))
    monkeypatch.setenv('UNIMOE_DATA_DIR', builtin_test_data)
    monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name='python3',
        resources={'metadata': {'path': str(COLAB.parent)}},
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    errors = [
        out for cell in notebook.cells for out in cell.get('outputs', [])
        if out.get('output_type') == 'error'
    ]  # fmt: skip
    assert not errors
