"""The issue's reproduction: a finished workdir run again with another learning rate is refused
before anything is written; `--config.allow_changed_config=True` goes on, keeping the earlier
run's config beside the new one."""

import json
import shutil

import pytest

from tests.reliability.conftest import STEPS
from unimoe.train import workdir

pytestmark = pytest.mark.slow


def test_rerunning_a_finished_workdir_with_another_config(runner, reference_run, tmp_path):
    trained = tmp_path / 'w'
    shutil.copytree(reference_run, trained)
    before = (trained / 'config.json').read_bytes()
    refused = runner(trained, '--config.stages.s.learning_rate=0.5')
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert 'Traceback' not in refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith('error: ')]
    assert errors[0] == (
        f'error: config.stages.s.learning_rate: stage s in {trained} was trained with 0.003, '
        'this config has 0.5'
    )
    assert len(errors) == 2
    assert (trained / 'config.json').read_bytes() == before
    allowed = runner(
        trained, '--config.stages.s.learning_rate=0.5', '--config.allow_changed_config=True'
    )
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert 'finished earlier, skipping' in allowed.stderr
    kept = sorted(p.name for p in trained.glob('config.*.json'))
    assert len(kept) == 1 and (trained / kept[0]).read_bytes() == before
    record = json.loads((trained / 's' / workdir.RECORD_FILE).read_text())
    assert record['config']['config.stages.s.steps'] == STEPS and record['changes'] == []
