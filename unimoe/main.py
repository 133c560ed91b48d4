"""Runs an experiment: `python -m unimoe.main --config=configs/unimoe_tiny.py[:arg] --workdir=DIR`.

Kept thin on purpose: the work is in `unimoe.run` so tests and notebooks call the same code.
Overrides: `--config.stages.s3_moe.steps=100`.
"""

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from unimoe import run

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file.', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> None:
    del argv
    # Library INFO chatter (orbax writes several lines per checkpoint) hides the run's own progress.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger('unimoe').setLevel(logging.INFO)
    table = run.run_experiment(_CONFIG.value, _WORKDIR.value)
    print(table)


if __name__ == '__main__':
    app.run(main)
