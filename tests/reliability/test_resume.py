"""Interrupted runs resume exactly: SIGKILL, SIGTERM, a kill inside a checkpoint write, a damaged
checkpoint. Each is compared with one uninterrupted run: same metrics.jsonl, same final state.

Each test starts one or two `python -m unimoe.main` processes (~10 s each with the shared
compilation cache; the first one compiles)."""

import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from tests.reliability.conftest import (
    CHECKPOINT_EVERY,
    STEPS,
    Runner,
    _flatten,
    assert_same_run,
    final_state,
    small_config,
    write_config,
)
from unimoe import checkpoint, config as config_lib
from unimoe.train import metrics, preemption

pytestmark = pytest.mark.slow


def _checkpoint_steps(workdir) -> list[int]:
    with checkpoint.Checkpointer(workdir / 's' / 'checkpoints') as ckpt:
        return ckpt.all_steps()


def _resume(runner, workdir, restored_step: int) -> str:
    resumed = runner(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f'resumed at step {restored_step}' in resumed.stderr
    return resumed.stderr


def test_a_sigkilled_run_resumes_from_its_last_checkpoint(runner, reference_run, tmp_path):
    killed = runner(tmp_path, '--kill_after_step=5')
    assert killed.returncode == -9
    # Steps 4 and 5 were logged after the last checkpoint (3): the resumed run logs them again.
    assert [r['step'] for r in metrics.read_metrics(tmp_path / 's')] == [1, 2, 3, 4, 5]
    assert _checkpoint_steps(tmp_path) == [CHECKPOINT_EVERY]
    _resume(runner, tmp_path, CHECKPOINT_EVERY)
    assert_same_run(tmp_path, reference_run)


def test_sigterm_saves_at_the_step_boundary_and_exits_with_the_requeue_code(
    runner, reference_run, tmp_path
):
    stopped = runner(tmp_path, '--sigterm_at_step=4')
    assert stopped.returncode == preemption.EXIT_CODE, stopped.stderr[-3000:]
    assert 'received SIGTERM' in stopped.stderr
    assert "stage 's' saved its checkpoint at step 4 and stopped" in stopped.stderr
    assert _checkpoint_steps(tmp_path) == [CHECKPOINT_EVERY, 4]
    _resume(runner, tmp_path, 4)
    assert_same_run(tmp_path, reference_run)


def test_ctrl_c_with_data_loader_workers_saves_and_exits(runner, tmp_path):
    # SIGINT to the whole process group, as a terminal sends it: the grain workers get it too.
    stopped = runner(tmp_path, '--sigint_group_at_step=4', '--config.data.worker_count=1')
    assert stopped.returncode == preemption.EXIT_CODE, stopped.stderr[-3000:]
    assert 'received SIGINT' in stopped.stderr
    assert _checkpoint_steps(tmp_path) == [CHECKPOINT_EVERY, 4]
    resumed = runner(tmp_path, '--config.data.worker_count=1')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resumed at step 4' in resumed.stderr


def test_a_kill_inside_a_checkpoint_write_leaves_the_previous_one(runner, reference_run, tmp_path):
    killed = runner(tmp_path, f'--kill_in_save={2 * CHECKPOINT_EVERY}')
    assert killed.returncode == -9
    checkpoints = tmp_path / 's' / 'checkpoints'
    # Step 6 was fully written but never published: only its temporary directory is there.
    leftovers = [p.name for p in checkpoints.iterdir() if p.name.startswith('6.')]
    assert leftovers and (checkpoints / leftovers[0] / 'state').is_dir()
    assert _checkpoint_steps(tmp_path) == [CHECKPOINT_EVERY]
    _resume(runner, tmp_path, CHECKPOINT_EVERY)
    assert not any(p.name.startswith('6.') for p in checkpoints.iterdir())
    assert_same_run(tmp_path, reference_run)


def _largest_array_file(step_dir):
    files = [p for p in (step_dir / 'state').rglob('d/*') if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize('damage', ['truncated_array', 'garbage_metadata'])
def test_a_damaged_checkpoint_is_reported_and_the_previous_one_used(
    runner, reference_run, tmp_path, damage
):
    # The finished reference run, made unfinished: its newest checkpoint (8) damaged.
    workdir = tmp_path / 'run'
    shutil.copytree(reference_run, workdir)
    checkpoints = workdir / 's' / 'checkpoints'
    (checkpoints / checkpoint.DONE_FILE).unlink()
    previous = STEPS - 2  # max_to_keep=2 kept steps 6 and 8
    assert _checkpoint_steps(workdir) == [previous, STEPS]
    if damage == 'truncated_array':
        bad_file = _largest_array_file(checkpoints / str(STEPS))
        os.truncate(bad_file, bad_file.stat().st_size // 2)
        expected = "checkpoint step 8 is damaged: .*/checkpoints/8: ValueError: .*Error reading"
    else:
        bad_file = checkpoints / str(STEPS) / 'state' / '_METADATA'
        bad_file.write_text('{"tree_metadata": ')
        expected = f'checkpoint step 8 is damaged: {bad_file}: unreadable metadata'
    stderr = _resume(runner, workdir, previous)
    assert any(re.search(expected, line) for line in stderr.splitlines()), stderr[-3000:]
    moved = list((checkpoints.parent / f'checkpoints{checkpoint.DAMAGED_DIR_SUFFIX}').iterdir())
    assert [p.name.split('.')[0] for p in moved] == [str(STEPS)]
    assert_same_run(workdir, reference_run)
    assert json.loads((checkpoints / checkpoint.DONE_FILE).read_text())['final_step'] == STEPS


def test_a_stage_holding_its_frozen_matrices_in_bf16_resumes_exactly(builtin_test_data, tmp_path):
    """The paper's stage 3 holds the LM's frozen matrices in bf16 (`frozen_in_compute_dtype`): its
    checkpoints keep them in bf16 and a killed run resumes to the uninterrupted one, bit for bit."""
    config = small_config(builtin_test_data)
    config.model.llm.dtype = 'bfloat16'
    # A dense stage trains the LM that stage `s` freezes and upcycles, as in the recipe.
    config.stages.s0 = config_lib.stage(
        trains='llm', mode='lm_text', tasks=('text_qa',), steps=2, learning_rate=3e-3, batch_size=4
    )
    config.stages.s.update(
        trains='lora+router', init_from='s0', experts_from='s0', upcycle_mode='copies',
        frozen_in_compute_dtype=True,
    )  # fmt: skip
    config.stage_order = 's0,s'
    bf16_runner = Runner(write_config(config, tmp_path / 'config'), tmp_path / 'jax_cache')
    reference = tmp_path / 'reference'
    finished = bf16_runner(reference)
    assert finished.returncode == 0, finished.stderr[-3000:]
    killed = bf16_runner(tmp_path / 'run', '--kill_after_step=5')
    assert killed.returncode == -9
    _resume(bf16_runner, tmp_path / 'run', CHECKPOINT_EVERY)
    assert_same_run(tmp_path / 'run', reference)
    params = dict(_flatten(final_state(tmp_path / 'run')['params']))
    query = [value for key, value in params.items() if key.endswith('attn/q/kernel/value')]
    assert query and all(value.dtype == jnp.bfloat16 for value in query)
    lora = [value for key, value in params.items() if key.endswith('attn/q/lora_a/value')]
    assert lora and all(value.dtype == np.float32 for value in lora)  # trained: float32
