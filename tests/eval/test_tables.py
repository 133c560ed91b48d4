import json
import pathlib

import pytest

from unimoe.eval import tables

TASK_MODALITY = {'img_qa': 'image', 'aud_cls': 'audio', 'img_cap': 'image'}
CHANCE = {'img_qa': 0.25, 'aud_cls': 0.1, 'img_cap': 0.5}


def _scores(accuracies):
    return {'tasks': {t: {'accuracy': a, 'n': 10} for t, a in accuracies.items()}}


RESULTS = {
    's2_image': _scores({'img_qa': 0.5, 'img_cap': 0.875}),
    's3_moe': _scores({'img_qa': 0.6, 'img_cap': 0.9, 'aud_cls': 1 / 3}),
    'partial': _scores({'img_cap': 0.25}),
}

EXPECTED_TABLE = """\
| model | img_qa | img_cap | aud_cls | image mean |
|---|---:|---:|---:|---:|
| s2_image | 50.0 | 87.5 | - | 68.8 |
| s3_moe | 60.0 | 90.0 | 33.3 | 75.0 |
| partial | - | 25.0 | - | - |
| chance | 25.0 | 50.0 | 10.0 | 37.5 |
"""


def test_results_table_exact_markdown():
    assert tables.results_table(RESULTS, CHANCE, TASK_MODALITY) == EXPECTED_TABLE


def test_write_results(tmp_path):
    md_path, json_path = tables.write_results(tmp_path / 'out', RESULTS, CHANCE, TASK_MODALITY)
    assert pathlib.Path(md_path).read_text() == EXPECTED_TABLE
    raw = json.loads(pathlib.Path(json_path).read_text())
    assert raw['models']['s3_moe']['tasks']['aud_cls'] == {'accuracy': 1 / 3, 'n': 10}
    assert raw['chance'] == CHANCE
    assert raw['task_modality'] == TASK_MODALITY
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['results.json', 'results.md']


@pytest.mark.parametrize(
    'results, chance, match',
    [
        ({'m': _scores({'vid_qa': 0.5})}, CHANCE, 'vid_qa'),
        ({'m': {'img_qa': 0.5}}, CHANCE, "'m'"),
        (RESULTS, {'vid_qa': 0.5}, 'chance'),
    ],
)
def test_unknown_tasks_raise(results, chance, match):
    with pytest.raises(ValueError, match=match):
        tables.results_table(results, chance, TASK_MODALITY)
