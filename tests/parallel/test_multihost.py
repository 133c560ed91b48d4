"""Two processes on loopback (JAX CPU collectives over gloo), 4 simulated devices each, train on
one 8-device mesh with the global batch split between them, checkpoint and restore the sharded
state, and match a single-process run of the same global batches."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np

from tests.parallel.sharded_setup import LOSS, OPTIM, TRAINS, flat_params, initial_state, make_batch
from unimoe.train import step as step_lib

ROOT = pathlib.Path(__file__).parent.parent.parent
WORKER = pathlib.Path(__file__).parent / 'multihost_worker.py'
STEPS = 3
RTOL, ATOL = 2e-5, 2e-6  # float32, partitioned sums


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_processes_train_checkpoint_and_match_one_process(tmp_path):
    env = {
        **os.environ,
        'JAX_PLATFORMS': 'cpu',
        'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
        'PYTHONPATH': str(ROOT),
    }
    port = free_port()
    logs = [(tmp_path / f'worker{pid}.log').open('w') for pid in range(2)]
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), '2', str(pid), str(tmp_path), str(STEPS)],
            cwd=ROOT,
            env=env,
            # Files, not pipes: nobody reads a pipe while the reference runs, and a full one blocks.
            stdout=logs[pid],
            stderr=subprocess.STDOUT,
        )
        for pid in range(2)
    ]
    # The one-process reference runs while the workers do (the compiles overlap on the cores).
    graphdef, (trainable, opt_state, rest) = initial_state()
    train_step = jax.jit(step_lib.train_step_fn(graphdef, TRAINS, OPTIM, LOSS))
    losses = []
    for step in range(STEPS):
        trainable, opt_state, rest, metrics = train_step(
            trainable, opt_state, rest, make_batch(seed=step, image=False), np.int32(step)
        )
        losses.append(float(metrics['loss']))
    for pid, worker in enumerate(workers):
        worker.wait(timeout=400)
        logs[pid].close()
        output = (tmp_path / f'worker{pid}.log').read_text()
        assert worker.returncode == 0, output[-4000:]
    np.testing.assert_allclose(
        json.loads((tmp_path / 'losses.json').read_text()), losses, rtol=RTOL
    )
    saved = np.load(tmp_path / 'params.npz')
    expected = flat_params(trainable)
    assert sorted(saved.files) == sorted(expected)
    for path, value in expected.items():
        np.testing.assert_allclose(saved[path], value, rtol=1e-4, atol=1e-5, err_msg=path)
