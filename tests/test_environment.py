"""The suite runs in the locked environment, and no script's name hides an installed module.

`requirements/lock.txt` pins every package the Makefile installs (docs/design.md, "Locked
environment"). A script's own folder comes first on `sys.path`, so `benchmarks/kernels.py` once hid
the `kernels` package that transformers 5.25 imports and every benchmark died at import.
"""

import ast
import importlib.metadata
import importlib.util
import pathlib
import pkgutil
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT_FOLDERS = ('benchmarks', 'experiments', 'colab', 'configs')
# The project itself, installed in editable mode: not a pin of the lock.
OWN_DISTRIBUTION = 'unimoe'


def load_check_lock():
    spec = importlib.util.spec_from_file_location('check_lock', REPO / 'requirements/check_lock.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_lock = load_check_lock()


def test_the_lock_satisfies_every_requirement_of_setup_cfg():
    assert check_lock.unmet() == []
    assert check_lock.unmet_no_deps() == []


def test_check_lock_names_a_no_deps_requirement_the_lock_lacks(tmp_path):
    no_deps = tmp_path / 'nodeps.in'
    no_deps.write_text('# a comment\nspeechbrain==1.1.2\nnot-locked>=1\n')
    lock = tmp_path / 'lock.txt'
    lock.write_text('speechbrain==1.1.1\n')
    assert check_lock.unmet_no_deps(no_deps, lock) == [
        'nodeps.in: speechbrain==1.1.2 has no matching pin in lock.txt',
        'nodeps.in: not-locked>=1 has no matching pin in lock.txt',
    ]


def test_check_lock_names_what_the_lock_does_not_satisfy(tmp_path):
    setup_cfg = tmp_path / 'setup.cfg'
    setup_cfg.write_text(
        '[options]\ninstall_requires =\n    numpy>=2.0\n    not-a-real-package>=1\n'
        '[options.extras_require]\ntest =\n    # a comment line\n    transformers>=99\n'
    )
    lock = tmp_path / 'lock.txt'
    lock.write_text(
        '# header\nnumpy==2.4.6 ; python_full_version < "3.12"\n'
        'numpy==2.5.5 ; python_full_version >= "3.12"\n    # via x\ntransformers==5.25.0\n'
    )
    assert check_lock.unmet(setup_cfg, lock) == [
        'setup.cfg [options] install_requires: not-a-real-package>=1 has no pin in lock.txt',
        "setup.cfg [options.extras_require] test: transformers>=99 is not satisfied by the lock's "
        'transformers==5.25.0',
    ]


def installed() -> dict[str, str]:
    """Installed distributions of this interpreter, by canonical name."""
    return {
        canonicalize_name(dist.metadata['Name']): dist.version
        for dist in importlib.metadata.distributions()
    }


def test_installed_versions_are_the_locked_ones():
    """Every installed distribution is pinned, at its pinned version (a local build label such as
    torch's `+cpu` wheel counts as its release). `make test` builds .venv from the lock; a package
    installed into it by hand shows up here."""
    pins = check_lock.locked(check_lock.LOCK)
    wrong = []
    for name, version in sorted(installed().items()):
        if name == OWN_DISTRIBUTION:
            continue
        applicable = [pin for pin in pins.get(name, []) if not pin.marker or pin.marker.evaluate()]
        if not applicable:
            wrong.append(f'{name}=={version} is installed but not pinned')
        elif not any(pin.specifier.contains(Version(version).public) for pin in applicable):
            wrong.append(f'{name}=={version} is installed, the lock pins {applicable[0]}')
    assert not wrong, '; '.join(wrong) + ' (rebuild with `make test` or re-lock with `make lock`)'


def importable_top_level_names() -> set[str]:
    """Top-level modules this interpreter can import from outside the repository."""
    outside = [p for p in sys.path if p and not pathlib.Path(p).resolve().is_relative_to(REPO)]
    names = {module.name for module in pkgutil.iter_modules(outside)}
    # Namespace packages (google, ...) have no __init__.py, which pkgutil needs.
    names |= set(importlib.metadata.packages_distributions())
    return names | set(sys.stdlib_module_names) | set(sys.builtin_module_names)


def script_names() -> dict[str, pathlib.Path]:
    """Module names the files and folders under the script folders would take on `sys.path`."""
    names = {}
    for folder in SCRIPT_FOLDERS:
        for path in (REPO / folder).rglob('*'):
            if '__pycache__' in path.parts or '.ipynb_checkpoints' in path.parts:
                continue
            if path.suffix == '.py' or path.is_dir():
                names[path.stem] = path.relative_to(REPO)
    return names


def test_importable_names_include_what_a_script_could_shadow():
    """The probe sees site-packages and the stdlib: the names that bit us are in it."""
    assert {'kernels', 'transformers', 'jax', 'json', 'google'} <= importable_top_level_names()


def test_no_script_takes_the_name_of_an_importable_module():
    taken = importable_top_level_names()
    clashes = {str(path): name for name, path in script_names().items() if name in taken}
    assert not clashes, f'rename these, they hide the installed module of the same name: {clashes}'


def module_level_imports(package: pathlib.Path) -> dict[str, str]:
    """Top-level names imported at module level in the package's files (imports inside functions
    are the lazy ones, torch's checkpoint reader say), with one file that imports each."""
    found = {}
    for path in sorted(package.rglob('*.py')):
        tree = ast.parse(path.read_text(encoding='utf-8'))
        tries = [node for node in tree.body if isinstance(node, ast.Try)]
        statements = [*tree.body, *(statement for node in tries for statement in node.body)]
        for node in statements:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.partition('.')[0], str(path.relative_to(REPO)))
    return found


def runtime_distributions() -> set[str]:
    """install_requires and everything they require (no extras): what `make demo` installs."""
    declared = check_lock.declared(check_lock.SETUP_CFG)
    pending = [req for where, req in declared if where.endswith('install_requires')]
    closure = set()
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        unused_here = requirement.marker and not requirement.marker.evaluate({'extra': ''})
        if name in closure or unused_here:
            continue
        closure.add(name)
        pending += [Requirement(line) for line in importlib.metadata.requires(name) or []]
    return closure


def test_the_runtime_requirements_provide_every_module_level_import():
    """`make demo` installs install_requires only; a module the library imports at load time but
    that only the test extra brings (safetensors once) breaks it on a fresh machine."""
    providers = importlib.metadata.packages_distributions()
    runtime = runtime_distributions()
    stdlib = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    missing = {
        name: where
        for name, where in module_level_imports(REPO / 'unimoe').items()
        if name not in stdlib and name != 'unimoe'
        and not {canonicalize_name(d) for d in providers.get(name, [])} & runtime
    }
    assert not missing, f'imported at module level but not in setup.cfg install_requires: {missing}'
