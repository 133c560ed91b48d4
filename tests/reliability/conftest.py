"""A one-stage experiment small enough to run several times as a subprocess, and its runner.

The stage exercises every piece of state an exact resume needs: LoRA dropout (RNG state), an
aux-loss-free MoE router (router biases outside the optimizer), the warmup-cosine schedule (the
optimizer's step count) and the built-in grain loader (iterator position). Subprocesses share a
JAX compilation cache, so only the first one compiles the train step.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from unimoe import checkpoint, config as config_lib
from unimoe.train import metrics, throughput

ROOT = pathlib.Path(__file__).parent.parent.parent
DRIVER = pathlib.Path(__file__).parent / 'driver.py'
STEPS = 8
CHECKPOINT_EVERY = 3


def small_config(data_dir: str) -> ml_collections.ConfigDict:
    config = config_lib.load_config(f'{ROOT}/configs/unimoe_tiny.py:mode=test')
    config.data.data_dir = data_dir
    config.model.llm = dict(dim=32, num_layers=2, num_heads=2, num_kv_heads=1, ffn_dim=64)
    # No sound tower: the stage reads text only, and the disk sizes below are set by its size.
    del config.model['sound'], config.model['sound_conn']
    config.data.sound_tasks = ()
    config.model.moe.update(router='sigmoid_bias', bias_update_rate=0.01)
    config.model.moe_layers = 'all'
    stage = config_lib.stage(
        trains='llm',
        mode='lm_text',
        tasks=('text_qa', 'image_caption'),
        steps=STEPS,
        learning_rate=3e-3,
        warmup_fraction=0.25,
        batch_size=4,
        moe=True,
        lora_rank=4,
    )
    config.stages = ml_collections.ConfigDict({'s': stage})
    config.stage_order = 's'
    config.eval.stages = ''
    config.log_every = 1
    config.checkpoint_every = CHECKPOINT_EVERY
    config.nonfinite = 'stop'
    return config


def write_config(config: ml_collections.ConfigDict, directory: pathlib.Path) -> pathlib.Path:
    """A config file `python -m unimoe.main --config=` loads: `config` as JSON."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / 'config.json').write_text(config.to_json())
    path = directory / 'config.py'
    path.write_text(
        'import json, pathlib\n'
        'import ml_collections\n\n\n'
        'def get_config(arg=None):\n'
        '    text = (pathlib.Path(__file__).parent / "config.json").read_text()\n'
        '    return ml_collections.ConfigDict(json.loads(text))\n'
    )
    return path


class Runner:
    """Runs the experiment in a fresh process, as `make demo` would, with the driver's hooks."""

    def __init__(self, config_path: pathlib.Path, cache_dir: pathlib.Path):
        self.config_path, self.cache_dir = config_path, cache_dir

    def __call__(
        self, workdir: pathlib.Path, *hooks: str, timeout: float = 600
    ) -> subprocess.CompletedProcess:
        # Its own process group, so a group signal (Ctrl-C) reaches it and its workers only.
        return subprocess.run(
            self.command(workdir, *hooks),
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )

    def command(self, workdir: pathlib.Path, *hooks: str) -> list[str]:
        # Hooks last: `--config.FIELD=` overrides must follow `--config=`.
        command = [sys.executable, str(DRIVER), f'--config={self.config_path}']
        return command + [f'--workdir={workdir}', *hooks]

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            # This checkout's unimoe, not the one installed in the venv.
            'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
            'JAX_PLATFORMS': 'cpu',
            'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
            'JAX_COMPILATION_CACHE_DIR': str(self.cache_dir),
            'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
            'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
        }


@pytest.fixture(scope='session')
def runner(builtin_test_data, tmp_path_factory) -> Runner:
    root = tmp_path_factory.mktemp('reliability')
    return Runner(write_config(small_config(builtin_test_data), root), root / 'jax_cache')


@pytest.fixture(scope='session')
def reference_run(runner, tmp_path_factory) -> pathlib.Path:
    """The uninterrupted run every interrupted one is compared with."""
    workdir = tmp_path_factory.mktemp('reference')
    result = runner(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def final_state(workdir: pathlib.Path) -> dict:
    with checkpoint.Checkpointer(workdir / 's' / 'checkpoints') as ckpt:
        return ckpt.restore_raw(STEPS)


def assert_same_run(workdir: pathlib.Path, reference: pathlib.Path) -> None:
    """Each step logged once with the reference's values; bit-equal final state (params,
    optimizer, RNG and router-bias state)."""
    logged, expected = metrics.read_metrics(workdir / 's'), metrics.read_metrics(reference / 's')
    assert [r['step'] for r in logged] == list(range(1, STEPS + 1))
    # Wall-clock rates differ from run to run (and a resumed run's first step, which compiled,
    # has none): everything else is the same.
    logged, expected = _without_rates(logged), _without_rates(expected)
    assert json.dumps(logged) == json.dumps(expected)
    actual_state, expected_state = final_state(workdir), final_state(reference)
    flat_actual = dict(_flatten(actual_state))
    flat_expected = dict(_flatten(expected_state))
    assert flat_actual.keys() == flat_expected.keys()
    assert any('router_bias' in key for key in flat_actual)
    # Dropout drew masks (its RNG counts advanced), so their state had to be restored.
    assert any('rngs/count' in key and value > 0 for key, value in flat_actual.items())
    for key, value in flat_expected.items():
        np.testing.assert_array_equal(flat_actual[key], value, err_msg=key)


def _without_rates(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in throughput.RATES} for row in rows]


def _flatten(tree, prefix: str = ''):
    if isinstance(tree, dict):
        for key, child in tree.items():
            yield from _flatten(child, f'{prefix}/{key}')
    elif isinstance(tree, (list, tuple)):
        for index, child in enumerate(tree):
            yield from _flatten(child, f'{prefix}/{index}')
    elif jax.dtypes.issubdtype(getattr(tree, 'dtype', None), jax.dtypes.prng_key):
        yield prefix, np.asarray(jax.random.key_data(tree))
    else:
        yield prefix, np.asarray(tree)
