"""The trainer with `config.mesh`: sharded init, per-process data, sharded batches and step, and a
checkpoint that restores into the rule shardings. (That the sharded step equals the one-device
step is test_sharded_step.py's; multi-process save / restore is test_multihost.py's.)"""

import logging
import pathlib

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests.reliability.conftest import small_config
from tests.train.test_metrics import tensorboard_scalars
from unimoe import checkpoint, factory
from unimoe.data import builtin
from unimoe.parallel import sharded
from unimoe.train import metrics, optim, trainer, validate

STEPS = 3
COUNTERS = ('skipped_records', 'nonfinite_steps')  # the trainer's checkpointed counters


def test_sharded_stage_trains_and_its_checkpoint_restores_sharded(
    builtin_test_data, tmp_path, caplog
):
    config = small_config(builtin_test_data)
    config.stages.s.steps = STEPS
    config.stages.s.batch_size = 8
    config.mesh = dict(data=2, fsdp=2, expert=2)
    typed = validate.validate_experiment(config)
    tokenizer = builtin.load_or_train_tokenizer(
        pathlib.Path(builtin_test_data) / builtin.TOKENIZER_FILE
    )
    caplog.set_level(logging.INFO, logger='unimoe')
    trainer.train_stage(typed, 's', tmp_path, tokenizer)
    messages = [r.getMessage() for r in caplog.records]
    compiled = [i for i, m in enumerate(messages) if m.startswith('stage s: compiled in ')]
    assert messages.index('compiling s ...') < compiled[0]
    log = metrics.read_metrics(tmp_path / 's')
    assert [r['step'] for r in log] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r['loss']) for r in log)
    # Rates cover the steps since the previous log, never step 1 (it compiled); no peak on CPU.
    assert not {'step_time_s', 'tokens_per_s', 'examples_per_s'} & log[0].keys()
    for row in log[1:]:
        assert row['step_time_s'] > 0 and row['tokens_per_s'] > 0 and row['examples_per_s'] > 0
        assert 'mfu' not in row
    tags = set(tensorboard_scalars(tmp_path / 's'))
    assert {'step_time_s', 'tokens_per_s', 'router_entropy/layer1'} <= tags
    assert {'expert_load/layer1/expert3', 'expert_usage_by_modality/text/expert0'} <= tags
    final = factory.final_params(tmp_path, 's')

    # The stage's last checkpoint (the trainer's train state) restores straight into the
    # shardings the rules give, as a resumed sharded stage restores it.
    stage = typed.stage('s')
    plan = sharded.make_plan(typed.mesh, typed.sharding_rules)
    model = factory.build_model(
        typed.model, tokenizer, moe=True, lora_rank=4, seed=0, abstract=True
    )
    _, trainable, _ = nnx.split(model, factory.trainable_filter(stage.trains), ...)
    tx = optim.make_optimizer(trainer.stage_optim_config(stage))
    abstract_state = {
        'params': nnx.state(model, nnx.Param),
        'model_state': nnx.state(model, nnx.Not(nnx.Param)),
        'opt_state': jax.eval_shape(tx.init, trainable),
        'counters': {k: jax.ShapeDtypeStruct((), np.int32) for k in COUNTERS},
    }
    with factory.stage_checkpointer(tmp_path, 's') as ckpt:
        restored = ckpt.restore(STEPS, sharded.with_shardings(plan, abstract_state))
    flat = {checkpoint.path_str(p): v.get_value() for p, v in nnx.to_flat_state(restored['params'])}
    bank = flat['llm/layers/0/ffn/experts/w_gate_edf']
    assert bank.sharding.spec == P('expert', 'fsdp', None)  # [E=4, D=32, F=64]; tensor=1 unused
    assert len(bank.addressable_shards) == 8 and bank.addressable_shards[0].data.shape[0] == 2
    for path, value in final.items():
        np.testing.assert_array_equal(np.asarray(flat[path]), value, err_msg=path)
