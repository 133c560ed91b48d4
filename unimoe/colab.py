"""Sets up a Colab runtime for the notebooks in `colab/`: installs the checkout with the
`notebook` extra, keeping the runtime's GPU / TPU JAX.

The notebooks' first cell clones the repository, changes into it and calls `install()`. It runs
before the package's dependencies are installed, so this module uses the standard library only.

Why not `pip install -e '.[notebook]'` alone: setup.cfg pins `jax==0.10.2`, and a plain `jax`
requirement is the CPU build. Where Colab's JAX is not 0.10.2, pip would replace it with a JAX
that sees no GPU or TPU. Asking for `jax[<extra>]` with the extra of the accelerator plugin that
Colab installed (`jax-cuda12-plugin` -> `cuda12`, `libtpu` -> `tpu`) installs the pinned version
with that accelerator's plugin instead. Not the lock (`requirements/lock.txt`) either: Colab's
own packages (IPython and ipykernel, which its frontend needs; TensorFlow and its protobuf) must
keep their versions, and pip leaves every installed package that satisfies setup.cfg's ranges.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from collections.abc import Iterable

# The jax extra that brings the accelerator plugin each of these distributions belongs to.
ACCELERATOR_EXTRAS = {'jax-cuda13-plugin': 'cuda13', 'jax-cuda12-plugin': 'cuda12', 'libtpu': 'tpu'}
# Modules the install may move to other versions: imported before it, they need a restart.
RESTART_IF_IMPORTED = ('jax', 'jaxlib', 'flax', 'numpy', 'matplotlib')


def installed_distributions() -> set[str]:
    """Canonical names (PEP 503) of the distributions installed in this environment."""
    names = (d.metadata['Name'] or '' for d in importlib.metadata.distributions())
    return {re.sub(r'[-_.]+', '-', name).lower() for name in names}


def accelerator_extra(installed: Iterable[str]) -> str | None:
    """The jax extra of the runtime's accelerator ('cuda13', 'cuda12', 'tpu'); None on a CPU."""
    installed = set(installed)
    return next((extra for dist, extra in ACCELERATOR_EXTRAS.items() if dist in installed), None)


def install_command(checkout: str, installed: Iterable[str]) -> list[str]:
    """pip's command line installing `checkout` editable with the notebook extra, plus the
    runtime's accelerator extra of jax (its version comes from setup.cfg's pin)."""
    extra = accelerator_extra(installed)
    accelerated_jax = [f'jax[{extra}]'] if extra else []
    return [sys.executable, '-m', 'pip', 'install', '-q', '-e', f'{checkout}[notebook]',
            *accelerated_jax]


def install(checkout: str = '.') -> None:
    """Installs `checkout` unless unimoe is installed already (a second run of the cell, or after
    the restart it asks for); raises asking for a restart when modules whose versions the install
    may have changed were imported before it."""
    installed = installed_distributions()
    if 'unimoe' in installed:
        return
    print('Installing unimoe and its dependencies (a few minutes) ...')
    subprocess.run(install_command(checkout, installed), check=True)
    stale = [name for name in RESTART_IF_IMPORTED if name in sys.modules]
    if stale:
        raise RuntimeError(
            f'unimoe is installed, but {stale} were imported before the install, which may have '
            'replaced them: restart the runtime (Runtime > Restart session) and run the notebook '
            'again'
        )
