"""Multi-process JAX: `jax.distributed.initialize` from the config or the environment.

`config.distributed` (absent, empty or num_processes=1 without auto: one process, nothing to do):
- `dict(auto=True)`: JAX detects the cluster (Cloud TPU pod slices, Slurm, Open MPI);
- `dict(coordinator_address='10.0.0.1:1234', num_processes=4, process_id=0)`: explicit, e.g. a
  multi-GPU cluster without a scheduler JAX knows; `process_id` may come from the environment
  variable `UNIMOE_PROCESS_ID` so that every host runs the same command line.
On CPU (several processes on one machine, as the tests run) the collectives go through gloo.
Must run before anything touches a JAX device.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax

log = logging.getLogger(__name__)

PROCESS_ID_ENV = 'UNIMOE_PROCESS_ID'
_FIELDS = ('auto', 'coordinator_address', 'num_processes', 'process_id', 'local_device_ids')


def initialize_arguments(distributed: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """`jax.distributed.initialize`'s arguments from `config.distributed`; None = one process."""
    settings = dict(distributed or {})
    if not settings.get('auto') and settings.get('num_processes', 1) <= 1:
        return None  # one process (configs carry the fields with these defaults to allow overrides)
    # Empty / unset fields of a config's defaults are not arguments.
    settings = {k: v for k, v in settings.items() if v not in ('', None)}
    unknown = sorted(set(settings) - set(_FIELDS))
    if unknown:
        raise ValueError(f"config.distributed has unknown fields {unknown}; known: {_FIELDS}")
    if settings.pop('auto', False):
        # num_processes=1 is the configs' one-process default, not a cluster size.
        if settings.get('num_processes') == 1:
            del settings['num_processes']
        if settings:
            raise ValueError(
                f"config.distributed: auto=True detects the cluster; drop {sorted(settings)}"
            )
        return {}
    if 'process_id' not in settings and PROCESS_ID_ENV in os.environ:
        settings['process_id'] = int(os.environ[PROCESS_ID_ENV])
    missing = [
        k for k in ('coordinator_address', 'num_processes', 'process_id') if k not in settings
    ]
    if missing:
        raise ValueError(
            f"config.distributed needs {missing} (or auto=True on a TPU pod / Slurm / Open MPI "
            f"cluster); process_id may also come from ${PROCESS_ID_ENV}"
        )
    return settings


def initialize(distributed: Mapping[str, Any] | None) -> None:
    """Starts the distributed runtime as `config.distributed` says; a no-op for one process."""
    settings = initialize_arguments(distributed)
    if settings is None:
        return
    if os.environ.get('JAX_PLATFORMS', '').startswith('cpu'):
        # CPU devices of several processes talk through gloo (TCP); the default has no collectives.
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(**settings)
    log.info(
        'process %d of %d: %d local devices, %d in all',
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
