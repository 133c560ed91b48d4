"""The trainer with `config.mesh`: sharded init, batches, step and checkpoints; an interrupted
sharded stage resumes exactly. (That the sharded step equals the one-device step is
test_sharded_step.py's.)"""

import pathlib
import shutil
import time

import numpy as np

from tests.reliability.conftest import small_config
from unimoe import run
from unimoe.data.tokenizer import Tokenizer
from unimoe.train import checkpoint, metrics, trainer, validate

STEPS = 4
MESH = dict(data=2, fsdp=2, expert=2)


def train(config, workdir):
    tokenizer = Tokenizer.load_or_train(pathlib.Path(config.data.data_dir) / run.TOKENIZER_FILE)
    started = time.perf_counter()
    trainer.train_stage(config, 's', workdir, tokenizer)
    print(f'train_stage: {time.perf_counter() - started:.1f} s')
    return metrics.read_metrics(workdir / 's'), trainer.final_params(workdir, 's')


def test_sharded_stage_trains_checkpoints_and_resumes_exactly(builtin_test_data, tmp_path):
    config = small_config(builtin_test_data)
    config.stages.s.steps = STEPS
    config.stages.s.batch_size = 8
    config.checkpoint_every = 2
    config.mesh = MESH
    validate.validate_experiment(config)
    log, params = train(config, tmp_path)
    assert [r['step'] for r in log] == list(range(1, STEPS + 1))
    assert log[-1]['loss'] < log[0]['loss'] and np.isfinite(log[-1]['loss'])

    # Interrupted after the step-2 checkpoint: the sharded state (LoRA dropout RNG, router
    # biases, AdamW moments) restores into its shards and the stage ends where it did.
    ckpt_dir = tmp_path / 's' / 'checkpoints'
    shutil.rmtree(ckpt_dir / str(STEPS))
    (ckpt_dir / checkpoint.DONE_FILE).unlink()
    resumed_log, resumed = train(config, tmp_path)
    assert resumed_log[-1]['loss'] == log[-1]['loss']
    for path in params:
        np.testing.assert_array_equal(resumed[path], params[path], err_msg=path)
