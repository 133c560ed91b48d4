"""Result tables: per-task and per-modality accuracy of several models against chance."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

RESULTS_MD = 'results.md'
RESULTS_JSON = 'results.json'


def _columns(task_modality: Mapping[str, str]) -> tuple[list[str], dict[str, list[str]]]:
    """Tasks grouped by modality (modalities in order of first appearance), and the groups of
    two or more tasks, which get a mean column (a one-task mean would repeat its column)."""
    tasks_of: dict[str, list[str]] = {}
    for task, modality in task_modality.items():
        tasks_of.setdefault(modality, []).append(task)
    tasks = [task for group in tasks_of.values() for task in group]
    return tasks, {modality: group for modality, group in tasks_of.items() if len(group) > 1}


def _row(
    name: str, accuracy_of: Mapping[str, float], tasks: list[str], tasks_of: dict[str, list[str]]
) -> str:
    cells = [name]
    cells += [f'{100 * accuracy_of[t]:.1f}' if t in accuracy_of else '-' for t in tasks]
    for modality_tasks in tasks_of.values():
        # A mean over only some of a modality's tasks would not be comparable across rows.
        if all(t in accuracy_of for t in modality_tasks):
            mean = sum(accuracy_of[t] for t in modality_tasks) / len(modality_tasks)
            cells.append(f'{100 * mean:.1f}')
        else:
            cells.append('-')
    return '| ' + ' | '.join(cells) + ' |'


def results_table(
    results: Mapping[str, Mapping[str, Any]],
    chance: Mapping[str, float],
    task_modality: Mapping[str, str],
) -> str:
    """Markdown table of accuracies in percent: one row per model, then a `chance` row.

    `results[model]` is the output of `unimoe.eval.scoring.score`. Columns are the tasks of
    `task_modality`, grouped by modality, then one `<modality> mean` column per modality with two
    or more tasks: the unweighted mean over its tasks, '-' unless the row has every one of them.
    """
    tasks, tasks_of = _columns(task_modality)
    for model, scores in results.items():
        if 'tasks' not in scores:
            raise ValueError(
                f"results_table: results[{model!r}] lacks 'tasks' (expected score() output)"
            )
        unknown = [t for t in scores['tasks'] if t not in task_modality]
        if unknown:
            raise ValueError(
                f'results_table: results[{model!r}] has tasks {unknown} not in task_modality'
            )
    unknown = [t for t in chance if t not in task_modality]
    if unknown:
        raise ValueError(f'results_table: chance has tasks {unknown} not in task_modality')

    header = ['model'] + tasks + [f'{modality} mean' for modality in tasks_of]
    lines = [
        '| ' + ' | '.join(header) + ' |',
        '|' + '|'.join(['---'] + ['---:'] * (len(header) - 1)) + '|',
    ]
    for model, scores in results.items():
        accuracy_of = {task: s['accuracy'] for task, s in scores['tasks'].items()}
        lines.append(_row(model, accuracy_of, tasks, tasks_of))
    lines.append(_row('chance', chance, tasks, tasks_of))
    return '\n'.join(lines) + '\n'


def _write_atomically(path: pathlib.Path, text: str) -> None:
    tmp_path = path.with_name(path.name + '.tmp')
    tmp_path.write_text(text, encoding='utf-8')
    os.replace(tmp_path, path)


def write_results(
    workdir: str | os.PathLike,
    results: Mapping[str, Mapping[str, Any]],
    chance: Mapping[str, float],
    task_modality: Mapping[str, str],
) -> tuple[str, str]:
    """Writes `<workdir>/results.md` (the table) and `results.json` (raw numbers); returns paths."""
    table = results_table(results, chance, task_modality)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = workdir / RESULTS_MD, workdir / RESULTS_JSON
    _write_atomically(md_path, table)
    raw = {'models': results, 'chance': chance, 'task_modality': task_modality}
    _write_atomically(json_path, json.dumps(raw, indent=2) + '\n')
    return str(md_path), str(json_path)
