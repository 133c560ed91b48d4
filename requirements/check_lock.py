"""Does requirements/lock.txt satisfy every requirement of setup.cfg and requirements/nodeps.in?

    python requirements/check_lock.py    # silent, or one line per unmet requirement and exit 2

`setup.cfg` keeps the ranges a library user needs; `requirements/lock.txt` (written by `make lock`)
pins the exact versions the Makefile installs. The Makefile runs this before installing, so an edit
of setup.cfg without `make lock` stops with a line naming the requirement instead of pip's resolver
report, and tests/test_environment.py runs it in the suite.
"""

from __future__ import annotations

import collections
import configparser
import pathlib
import sys

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = pathlib.Path(__file__).resolve().parent.parent
SETUP_CFG = REPO / 'setup.cfg'
LOCK = REPO / 'requirements' / 'lock.txt'
# Installed with --no-deps by the Makefile, so pinned by the lock but not by setup.cfg.
NO_DEPS = REPO / 'requirements' / 'nodeps.in'


def declared(setup_cfg: pathlib.Path) -> list[tuple[str, Requirement]]:
    """(where, requirement) for install_requires and every extra, as setup.cfg declares them."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(setup_cfg, encoding='utf-8')
    runtime = parser.get('options', 'install_requires', fallback='')
    fields = [('[options] install_requires', runtime)]
    if parser.has_section('options.extras_require'):
        fields += [
            (f'[options.extras_require] {extra}', value)
            for extra, value in parser.items('options.extras_require')
        ]
    return [(where, Requirement(line)) for where, text in fields for line in _lines(text)]


def locked(lock: pathlib.Path) -> dict[str, list[Requirement]]:
    """The lock's pins by canonical name; a universal lock may pin one name per marker range."""
    pins = collections.defaultdict(list)
    for number, line in enumerate(lock.read_text(encoding='utf-8').splitlines(), 1):
        if not line.strip() or line.startswith((' ', '#', '-')):
            continue  # uv's `# via` annotations are indented; options start with '-'
        try:
            pin = Requirement(line)
        except InvalidRequirement as err:
            raise SystemExit(f'{lock}:{number}: not a requirement ({err}); run `make lock`')
        pins[canonicalize_name(pin.name)].append(pin)
    return pins


def unmet(setup_cfg: pathlib.Path = SETUP_CFG, lock: pathlib.Path = LOCK) -> list[str]:
    """One line per setup.cfg requirement the lock has no pin for, or pins outside its range."""
    pins = locked(lock)
    problems = []
    for where, requirement in declared(setup_cfg):
        entries = pins.get(canonicalize_name(requirement.name), [])
        if not entries:
            problems.append(f'{setup_cfg.name} {where}: {requirement} has no pin in {lock.name}')
        for pin in entries:
            version = Version(next(iter(pin.specifier)).version)
            if not requirement.specifier.contains(version, prereleases=True):
                problems.append(
                    f'{setup_cfg.name} {where}: {requirement} is not satisfied by the lock\'s {pin}'
                )
    return problems


def unmet_no_deps(no_deps: pathlib.Path = NO_DEPS, lock: pathlib.Path = LOCK) -> list[str]:
    """One line per requirement of nodeps.in the lock does not pin within its range."""
    pins = locked(lock)
    problems = []
    for requirement in map(Requirement, _lines(no_deps.read_text(encoding='utf-8'))):
        entries = pins.get(canonicalize_name(requirement.name), [])
        versions = [Version(next(iter(pin.specifier)).version) for pin in entries]
        if not any(requirement.specifier.contains(v, prereleases=True) for v in versions):
            problems.append(f'{no_deps.name}: {requirement} has no matching pin in {lock.name}')
    return problems


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith('#')]


def main() -> int:
    problems = unmet() + unmet_no_deps()
    for problem in problems:
        print(f'{problem}; run `make lock` to re-resolve {LOCK.relative_to(REPO)}', file=sys.stderr)
    return 2 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
