"""One process of tests/parallel/test_multihost.py: trains the tiny model on a mesh spanning every
process's CPU devices, each process feeding its rows of each global batch, then checkpoints the
sharded state with the project Checkpointer, restores it, and (process 0) writes the results.

  python tests/parallel/multihost_worker.py PORT NUM_PROCESSES PROCESS_ID OUT_DIR STEPS
"""

import json
import pathlib
import sys

import jax
import numpy as np

from tests.parallel.sharded_setup import LOSS, OPTIM, TRAINS, flat_params, initial_state, make_batch
from unimoe import checkpoint
from unimoe.nn import sharding
from unimoe.parallel import distributed, mesh as mesh_lib, sharded
from unimoe.train import step as step_lib

MESH = dict(data=2, fsdp=2, expert=2)


def main(port: int, num_processes: int, process_id: int, out_dir: pathlib.Path, steps: int) -> None:
    distributed.initialize(
        dict(
            coordinator_address=f'127.0.0.1:{port}',
            num_processes=num_processes,
            process_id=process_id,
        )
    )
    assert jax.process_count() == num_processes and jax.device_count() == 8
    plan = sharded.Plan(mesh_lib.make_mesh(MESH), sharding.DEFAULT_RULES)
    graphdef, state = initial_state()
    state = tuple(sharded.place(plan, tree) for tree in state)
    step_fn = step_lib.train_step_fn(graphdef, TRAINS, OPTIM, LOSS)
    losses, train_step = [], sharded.jit_step(plan, step_fn)
    for step in range(steps):
        batch = make_batch(seed=step, image=False)
        rows = len(batch['tokens']) // num_processes
        # This process's rows of the global batch, as its own data loader shard would read them.
        local = {k: v[process_id * rows : (process_id + 1) * rows] for k, v in batch.items()}
        global_batch = sharded.shard_batch(plan, local)
        # Those rows land on this process's devices, where the global batch has them.
        for shard in global_batch['tokens'].addressable_shards:
            np.testing.assert_array_equal(shard.data, batch['tokens'][shard.index])
            assert process_id * rows <= shard.index[0].start < (process_id + 1) * rows
        *new_state, metrics = train_step(*state, global_batch, np.int32(step))
        state = tuple(new_state)
        losses.append(float(metrics['loss']))

    trainable, opt_state, rest = state
    with checkpoint.Checkpointer(out_dir / 'ckpt') as ckpt:
        ckpt.save(steps, {'trainable': trainable, 'opt_state': opt_state}, force=True)
        ckpt.wait()
        target = sharded.with_shardings(plan, jax.eval_shape(lambda: (trainable, opt_state)))
        restored = ckpt.restore(steps, {'trainable': target[0], 'opt_state': target[1]})
    saved = {'trainable': trainable, 'opt_state': opt_state}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
        for sa, sb in zip(a.addressable_shards, b.addressable_shards):
            np.testing.assert_array_equal(sa.data, sb.data)
    gathered = jax.experimental.multihost_utils.process_allgather(restored['trainable'], tiled=True)
    if process_id == 0:
        np.savez(out_dir / 'params.npz', **flat_params(gathered))
        (out_dir / 'losses.json').write_text(json.dumps(losses))


if __name__ == '__main__':
    port, num_processes, process_id, out_dir, steps = sys.argv[1:]
    main(int(port), int(num_processes), int(process_id), pathlib.Path(out_dir), int(steps))
