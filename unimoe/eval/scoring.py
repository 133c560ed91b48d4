"""Exact-match scoring of generated answers, per task, per modality and overall."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from typing import Any

_ARTICLES = frozenset({'a', 'an', 'the'})
_NUMBER_WORDS = {
    'zero': '0',
    'one': '1',
    'two': '2',
    'three': '3',
    'four': '4',
    'five': '5',
    'six': '6',
    'seven': '7',
    'eight': '8',
    'nine': '9',
    'ten': '10',
}
_RECORD_FIELDS = ('task', 'modality', 'prediction', 'answer')


def normalize_answer(text: str) -> str:
    """Canonical form for exact match: 'The  Three cats.' -> '3 cats'.

    Lowercases, drops trailing punctuation and one leading article, collapses whitespace and maps
    the number words zero..ten to digits. A lone article is kept, since 'A' may be a choice letter.
    """
    text = text.lower().strip().rstrip(string.punctuation + string.whitespace)
    words = re.split(r'\s+', text) if text else []
    if len(words) > 1 and words[0] in _ARTICLES:
        words = words[1:]
    return ' '.join(_NUMBER_WORDS.get(word, word) for word in words)


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def _accuracy(correct: list[bool]) -> dict[str, Any]:
    return {'accuracy': sum(correct) / len(correct), 'n': len(correct)}


def score(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Exact-match accuracy of `{task, modality, prediction, answer}` records.

    Returns `{'tasks': {task: {'accuracy', 'n'}}, 'modalities': {modality: {...}},
    'overall': {...}}`, keys in order of first appearance; modality and overall accuracies are
    averages over examples (micro), not over tasks.
    """
    by_task: dict[str, list[bool]] = {}
    by_modality: dict[str, list[bool]] = {}
    everything: list[bool] = []
    for i, record in enumerate(records):
        missing = [field for field in _RECORD_FIELDS if field not in record]
        if missing:
            raise ValueError(f'score: record {i} lacks field(s) {missing}; it has {sorted(record)}')
        correct = exact_match(record['prediction'], record['answer'])
        by_task.setdefault(record['task'], []).append(correct)
        by_modality.setdefault(record['modality'], []).append(correct)
        everything.append(correct)
    if not everything:
        raise ValueError('score: records is empty')
    return {
        'tasks': {task: _accuracy(c) for task, c in by_task.items()},
        'modalities': {modality: _accuracy(c) for modality, c in by_modality.items()},
        'overall': _accuracy(everything),
    }
