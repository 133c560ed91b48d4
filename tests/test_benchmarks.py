"""The benchmark scripts still run (tiny `--quick` shapes) and end with their RESULT line.

Only the format is checked: timings on a shared CPU do not belong in tests.
"""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).parent.parent
BENCHMARKS = REPO / 'benchmarks'
EXPECTED_KEYS = {
    'generate.py': ['speedup_b1', 'speedup_b8'],
    'moe_layer.py': [
        'R_fwd',
        'R_fwd_bwd',
        'R_fwd_bwd_fine',
        'R_ragged_dot',
        'R_onehot',
        'R_torch_hf',
    ],
    'scan_layers.py': ['compile_speedup', 'step_ratio'],
    'train_blocks.py': ['attention', 'moe', 'head'],
    'train_step.py': ['train_speedup'],
}


def run_quick(script: str, **env: str) -> str:
    """stdout of `script --quick`, run with this checkout's unimoe (not an installed one)."""
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), '--quick'],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={
            **os.environ,
            'PYTHONPATH': os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])),
            **env,
        },
    )
    return out.stdout


@pytest.mark.parametrize('script', sorted(EXPECTED_KEYS))
def test_benchmark_quick_run_ends_with_result_line(script):
    last = run_quick(script).strip().splitlines()[-1]
    assert last.startswith('RESULT '), last
    fields = dict(item.split('=') for item in last.removeprefix('RESULT ').split())
    assert list(fields) == EXPECTED_KEYS[script]
    assert all(float(value) > 0 for value in fields.values()), fields


def test_kernels_benchmark_on_cpu_checks_the_interpret_path():
    """On CPU benchmarks/pallas_gmm.py times nothing: it checks the Pallas kernels in interpret
    mode against the XLA references and says so."""
    stdout = run_quick('pallas_gmm.py', JAX_PLATFORMS='cpu')
    assert 'interpret mode only' in stdout
    assert stdout.strip().splitlines()[-1] == 'RESULT interpret_ok=true', stdout
