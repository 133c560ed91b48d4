"""Runs an experiment: `python -m unimoe.main --config=configs/unimoe_tiny.py[:arg] --workdir=DIR`.

Kept thin on purpose: the work is in `unimoe.run` so tests and notebooks call the same code.
Overrides: `--config.stages.s3_moe.steps=100`. Sharded / multi-host training: `config.mesh`,
`config.sharding_rules`, `config.distributed` (see `unimoe.parallel`). `--dry_run` checks the whole
experiment as a run would, prints what each stage's model costs (parameters, active parameters and
training FLOPs per token, memory) and trains nothing.

Exit codes: 0 done; 2 a mistake in the config or its flags (every problem found, one line each:
`error: config.<path> ...`; `--debug` or UNIMOE_DEBUG=1 adds the traceback); 75
(`unimoe.train.preemption.EXIT_CODE`) stopped by SIGTERM / SIGINT after saving a checkpoint: run
the same command again to resume; anything else is an error.
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from unimoe import accounting, config as config_lib, experiment, run, storage
from unimoe.parallel import distributed
from unimoe.train import preemption, validate

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
config_lib.define_debug_flag()
flags.mark_flags_as_required(['config'])


def main(argv: list[str]) -> None:
    del argv
    # Library INFO chatter (orbax writes several lines per checkpoint) hides the run's own progress.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger('unimoe').setLevel(logging.INFO)
    storage.quiet_storage_failures()  # a full disk is reported once, not by every write thread
    config = config_lib.loaded_config(_CONFIG)
    # Several hosts (`config.distributed`): join them before any device is used.
    distributed.initialize(config.get('distributed'))
    print(f'config (after command-line overrides):\n{config}')
    if not _DRY_RUN.value and _WORKDIR.value is None:
        raise app.UsageError('--workdir is required to train (or pass --dry_run)')
    try:
        if _DRY_RUN.value:
            _dry_run(validate.validate_experiment(config))
            return
        table = run.run_experiment(config, _WORKDIR.value)
    except storage.StorageError as e:
        storage.exit_after_storage_failure(e)
    except config_lib.UserError as e:
        config_lib.exit_on_user_error(e)
    except preemption.Preempted as e:
        logging.getLogger('unimoe').warning('%s (exit code %d)', e, preemption.EXIT_CODE)
        sys.exit(preemption.EXIT_CODE)
    print(table)


def _dry_run(typed: experiment.ExperimentConfig) -> None:
    print(accounting.format_accounts(accounting.account_stages(typed)))
    exchange = accounting.account_expert_exchange(typed)
    if exchange:
        print('Expert all-to-all per device (expert parallelism):')
        print(accounting.format_exchange(exchange))


if __name__ == '__main__':
    app.run(main, flags_parser=config_lib.parse_flags_or_exit)
