"""The paper-scale config's sharded step lowers from abstract shapes on 8 simulated devices
(`size=test`: the same code path with small widths; the 7B output is recorded in docs/design.md)."""

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from unimoe import config as config_lib, experiment
from unimoe.nn import sharding
from unimoe.parallel import rules as rules_lib
from unimoe.train import lower

CONFIG = 'configs/paper_scale.py'


def test_paper_scale_config_lowers_with_expert_sharded_weights():
    config = config_lib.load_config(f'{CONFIG}:experts=8,target=v5p-64,size=test')
    report, lowered = lower.lower_stage(experiment.from_config_dict(config), 's3_moe')
    assert report.planned_mesh == dict(data=1, fsdp=4, expert=8, tensor=1)
    assert report.lowered_mesh == dict(data=1, fsdp=1, expert=8, tensor=1)
    text = lowered.as_text()
    assert 'num_partitions = 8' in text
    # The step returns the expert banks (frozen: in `rest`, result 2) and their LoRA adapters
    # (trained: result 0) split over the `expert` axis, as the rules say; the layers are scanned,
    # their stacked axis unsharded.
    for result, name in ((2, 'w_gate_edf'), (0, 'lora_gate_a_edr')):
        leaf = f"result[{result}]['llm']['blocks']['layers'][0]['ffn']['experts']['{name}'].value"
        assert re.search(
            re.escape(leaf) + r'", sdy\.sharding = #sdy\.sharding<@mesh, \[\{\}, \{"expert"\}', text
        ), name
    # Per-device memory shrinks by the mesh: the expert banks (most parameters) 8 ways, the rest
    # 4 ways more on the planned fsdp=4 x expert=8 mesh.
    planned, lowered_bytes = report.param_bytes
    assert planned < lowered_bytes < report.account.param_bytes
    assert report.account.active_params_per_token < report.account.total_params
    assert 'planned: fsdp=4 expert=8' in report.format()


def test_scaled_mesh_keeps_the_axes_and_the_expert_degree():
    assert lower.scaled_mesh_shape(dict(fsdp=8, expert=4), 8) == dict(
        data=1, fsdp=2, expert=4, tensor=1
    )
    assert lower.scaled_mesh_shape(dict(expert=8), 8)['expert'] == 8
    with pytest.raises(ValueError, match='halving'):
        lower.scaled_mesh_shape(dict(data=3, expert=8), 8)


def test_shard_bytes_divides_by_the_mesh_axes_of_each_dimension():
    tree = {
        'llm': {
            'layers': {
                '0': {
                    'ffn': {
                        'experts': {'w_gate_edf': jax.ShapeDtypeStruct((8, 64, 32), jnp.float32)}
                    }
                }
            }
        }
    }
    sizes = dict(data=1, fsdp=4, expert=8, tensor=2)
    # expert 8 ways, embed (fsdp) 4 ways, mlp (tensor) 2 ways.
    assert rules_lib.shard_bytes(tree, sizes, sharding.DEFAULT_RULES) == 8 * 64 * 32 * 4 // 64


def test_compile_prints_a_memory_plan_whose_parts_add_up_to_the_peak():
    # The command line end to end (exit code, the table, the RESULT line) on the planned mesh of
    # 8 devices; `lower.compile_stage` returns the same `MemoryPlan` to compare configs in-process.
    result = subprocess.run(
        [sys.executable, '-m', 'unimoe.train.lower', '--compile']
        + [f'--config={CONFIG}:experts=8,target=8xh100,size=test'],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    row = re.compile(r'\| (?P<label>[^|]+) \| [^|]+ \| (?P<bytes>-?[\d,]+) \|$')
    table = {
        m['label']: int(m['bytes'].replace(',', '')) for m in map(row.match, lines) if m
    }
    parts = [
        'parameters',
        'optimizer state',
        'batch',
        'other arguments (RNG state, step index)',
        'outputs not aliased to arguments (metrics)',
        'temporaries (activations, gradients, collectives)',
        'generated code',
    ]
    peak = table['peak (sum of the above)']
    assert sum(table[part] for part in parts) == peak
    # The parameters, optimizer state and batch (from shapes and rules) are XLA's arguments but
    # for a few RNG keys and the step index: the shapes-derived shards match the compiled program.
    assert 0 < table['other arguments (RNG state, step index)'] < 1024
    assert table['temporaries (activations, gradients, collectives)'] > table['parameters']
    result_line = re.fullmatch(
        r'RESULT peak_gib=(\S+) device_gib=(\S+) lower_s=(\S+) compile_s=(\S+)', lines[-1]
    )
    assert result_line, lines[-1]
    peak_gib, device_gib, lower_s, compile_s = map(float, result_line.groups())
    assert peak_gib == pytest.approx(peak / 2**30, abs=1e-3)
    assert device_gib == pytest.approx(81559 / 1024, abs=1e-3)  # H100 SXM: nvidia-smi's total
    assert table['device memory'] == round(81559 * 2**20)
    assert lower_s > 0 and compile_s > 0


def test_targets_name_their_device_and_its_memory():
    config = config_lib.load_config(f'{CONFIG}:experts=4,target=8xh200,size=test')
    assert config.mesh.to_dict() == dict(fsdp=2, expert=4)
    assert lower.device_memory_bytes(config.target_device) == round(143771 * 2**20)
    assert lower.device_memory_bytes(None) is None
    with pytest.raises(ValueError, match='expected one of'):
        lower.device_memory_bytes('h800')


def test_rematerialisation_lowers_the_activation_figure():
    """The compiled plan of the scanned step keeps fewer temporaries when each block is
    recomputed from its input (`remat='full'`) than when every intermediate is kept."""
    plans = {}
    for remat in ('none', 'full'):
        config = config_lib.load_config(f'{CONFIG}:experts=8,target=8xh100,size=test')
        config.model.llm.remat = remat
        _, plans[remat] = lower.compile_stage(experiment.from_config_dict(config), 's3_moe')
    assert plans['full'].temp_bytes < plans['none'].temp_bytes
    assert plans['full'].param_bytes == plans['none'].param_bytes
