"""The package layering (setup.cfg [importlinter]) holds, and no two modules import each other."""

import configparser
import os
import pathlib
import shutil
import subprocess
import sys

import grimp

ROOT = pathlib.Path(__file__).resolve().parents[1]


def lint_imports(package_parent: pathlib.Path) -> subprocess.CompletedProcess:
    """import-linter on the `unimoe` found under `package_parent`, with the repository's contracts."""
    return subprocess.run(
        [sys.executable, '-c', 'import sys, importlinter.cli as c; sys.exit(c.lint_imports('
         f'config_filename={str(ROOT / "setup.cfg")!r}, no_cache=True, no_logo=True))'],
        env={**os.environ, 'PYTHONPATH': str(package_parent)},
        cwd=package_parent,
        capture_output=True,
        text=True,
    )


def declared_layers() -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / 'setup.cfg')
    layers = parser['importlinter:contract:layers']['layers'].split()
    return [name for name in layers if name != '|']


def test_the_layers_contract_is_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert '1 kept, 0 broken' in result.stdout


def test_an_import_up_the_layers_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / 'unimoe', tmp_path / 'unimoe', ignore=shutil.ignore_patterns('__pycache__'))
    lora = tmp_path / 'unimoe' / 'nn' / 'lora.py'
    lora.write_text(lora.read_text() + '\nfrom unimoe.moe import layer  # noqa: E402,F401\n')
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'unimoe.nn.lora -> unimoe.moe.layer' in result.stdout


def test_every_package_and_top_level_module_is_in_a_layer():
    names = {
        f'unimoe.{p.stem}' if p.is_file() else f'unimoe.{p.name}'
        for p in (ROOT / 'unimoe').iterdir()
        if (p.suffix == '.py' and p.stem != '__init__') or (p / '__init__.py').is_file()
    }
    assert names == set(declared_layers())


def test_no_module_imports_itself_through_others():
    # Imports under `if TYPE_CHECKING:` are annotations only: they run nothing.
    graph = grimp.build_graph('unimoe', exclude_type_checking_imports=True)
    cycles = set()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            # A package's __init__ importing its own submodules is not a cycle between files.
            if imported.startswith(module + '.') or module.startswith(imported + '.'):
                continue
            if graph.chain_exists(importer=imported, imported=module):
                cycles.add(tuple(sorted((module, imported))))
    assert not cycles, f'modules importing each other (directly or through others): {sorted(cycles)}'
