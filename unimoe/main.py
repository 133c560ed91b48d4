"""Runs an experiment: `python -m unimoe.main --config=configs/unimoe_tiny.py[:arg] --workdir=DIR`.

Kept thin on purpose: the work is in `unimoe.run` so tests and notebooks call the same code.
Overrides: `--config.stages.s3_moe.steps=100`. Sharded / multi-host training: `config.mesh`,
`config.sharding_rules`, `config.distributed` (see `unimoe.parallel`). `--dry_run` prints what each stage's model costs
(parameters, active parameters and training FLOPs per token, memory) and trains nothing.

Exit codes: 0 done; 75 (`unimoe.train.preemption.EXIT_CODE`) stopped by SIGTERM / SIGINT after
saving a checkpoint: run the same command again to resume; anything else is an error.
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from unimoe import accounting, experiment, run
from unimoe.parallel import distributed
from unimoe.train import preemption

_CONFIG = config_flags.DEFINE_config_file(
    'config',
    None,
    'Experiment config: PATH.py[:ARG], e.g. configs/unimoe_tiny.py:mode=test; any field can then '
    'be overridden with --config.FIELD=VALUE (e.g. --config.model.moe.top_k=1).',
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, logs and results (not needed with --dry_run).'
)
_DRY_RUN = flags.DEFINE_bool(
    'dry_run',
    False,
    'Print parameter counts, active parameters and training FLOPs per token and memory of every '
    'stage (models built abstractly, nothing trained or written), then exit.',
)
flags.mark_flags_as_required(['config'])


def main(argv: list[str]) -> None:
    del argv
    # Library INFO chatter (orbax writes several lines per checkpoint) hides the run's own progress.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger('unimoe').setLevel(logging.INFO)
    # Several hosts (`config.distributed`): join them before any device is used.
    distributed.initialize(_CONFIG.value.get('distributed'))
    print(f'config (after command-line overrides):\n{_CONFIG.value}')
    if _DRY_RUN.value:
        # Typed, not validated: a plan needs no checkpoints or data on this machine.
        typed = experiment.from_config_dict(_CONFIG.value)
        print(accounting.format_accounts(accounting.account_stages(typed)))
        exchange = accounting.account_expert_exchange(typed)
        if exchange:
            print('Expert all-to-all per device (expert parallelism):')
            print(accounting.format_exchange(exchange))
        return
    if _WORKDIR.value is None:
        raise app.UsageError('--workdir is required to train (or pass --dry_run)')
    try:
        table = run.run_experiment(_CONFIG.value, _WORKDIR.value)
    except preemption.Preempted as e:
        logging.getLogger('unimoe').warning('%s (exit code %d)', e, preemption.EXIT_CODE)
        sys.exit(preemption.EXIT_CODE)
    print(table)


if __name__ == '__main__':
    app.run(main)
