"""Evaluates finished stages on the held-out split: greedy answers, exact match, results table."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import tqdm
from flax import nnx

from unimoe import factory
from unimoe.data import pipeline, tasks as tasks_lib
from unimoe.data.tokenizer import TextTokenizer
from unimoe.eval import generate, scoring, tables
from unimoe.experiment import ExperimentConfig
from unimoe.models.unimoe import UniMoE

log = logging.getLogger(__name__)

# Keys of an eval batch that the model reads (the rest are strings for scoring).
_MODEL_KEYS = ('tokens', 'prompt_len', *generate.MEDIA_KEYS)
# A finished stage's last scores, beside its checkpoints, with what they were computed from.
SCORES_FILE = 'eval_scores.json'


def generate_answers(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    batch: Mapping[str, Any],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    stop_ids: Collection[int] = (),
    sampling: generate.SamplingConfig = generate.SamplingConfig(),
    row_ids: Sequence[int] | None = None,
    suppress_ids: Collection[int] = (),
    with_first_logits: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Answer ids [B, max_new_tokens] (greedy by default), each row ending at eos or another of
    `stop_ids` and padded after it; KV-cached, media encoded once (`generate.generate`, which
    documents the other arguments)."""
    return generate.generate(
        graphdef,
        state,
        batch,
        max_new_tokens=max_new_tokens,
        pad_id=pad_id,
        stop_ids={eos_id, *stop_ids},
        sampling=sampling,
        row_ids=row_ids,
        suppress_ids=suppress_ids,
        with_first_logits=with_first_logits,
    )


def load_finished_stage(
    experiment: ExperimentConfig, name: str, workdir: pathlib.Path, tokenizer: TextTokenizer
) -> UniMoE:
    """The model a finished stage ended with, every parameter restored, in eval mode."""
    stage = experiment.stage(name)
    model = factory.build_model(
        experiment.model, tokenizer, moe=stage.moe, lora_rank=stage.lora_rank, seed=experiment.seed
    )
    origin = factory.load_params(model, [(name, factory.final_params(workdir, name))])
    total = len(list(nnx.to_flat_state(nnx.state(model, nnx.Param))))
    if len(origin) != total:
        raise ValueError(f"stage {name!r}: checkpoint restored {len(origin)} of {total} params")
    return nnx.view(model, deterministic=True, raise_if_not_found=False)


def predict(
    model: UniMoE,
    examples: list[dict[str, Any]],
    tokenizer: TextTokenizer,
    *,
    batch_size: int,
    max_new_tokens: int,
    desc: str,
) -> list[dict[str, Any]]:
    """Scoring records (task, modality, prediction, answer) for every example."""
    graphdef, state = nnx.split(model)
    records = []
    for batch in tqdm.tqdm(pipeline.collate(examples, batch_size), desc=desc, leave=False):
        ids = generate_answers(
            graphdef,
            state,
            {k: batch[k] for k in _MODEL_KEYS if k in batch},
            max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
        )
        for row, valid, task, modality, answer in zip(
            np.asarray(ids),
            batch['valid'],
            batch['task_name'],
            batch['modality_name'],
            batch['answer'],
        ):
            if not valid:
                continue
            answer_ids = [int(t) for t in row]
            if tokenizer.eos_id in answer_ids:
                answer_ids = answer_ids[: answer_ids.index(tokenizer.eos_id)]
            records.append(
                {
                    'task': task,
                    'modality': modality,
                    'answer': answer,
                    'prediction': tokenizer.decode(answer_ids),
                }
            )
    return records


def _scores_key(experiment: ExperimentConfig, name: str, workdir: pathlib.Path) -> Any:
    """What a stage's scores depend on: its finished checkpoint (DONE.json records the run that
    wrote it, seconds included, so a retrained stage never matches) and the eval and data settings.
    """
    ckpt = factory.stage_checkpointer(workdir, name)
    done = ckpt.read_done()
    ckpt.close()
    eval_settings = dataclasses.asdict(dataclasses.replace(experiment.eval, stages=()))
    key = {'stage': done, 'eval': eval_settings, 'data': dataclasses.asdict(experiment.data)}
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def stage_scores(
    experiment: ExperimentConfig,
    name: str,
    workdir: pathlib.Path,
    tokenizer: TextTokenizer,
    examples: list[dict[str, Any]],
) -> dict[str, Any]:
    """`scoring.score` of one finished stage's answers. Reused from `SCORES_FILE` when neither the
    stage nor the eval settings changed since it was written: re-running a finished experiment
    (or a notebook over one) does not decode every question again."""
    cache = workdir / name / SCORES_FILE
    key = _scores_key(experiment, name, workdir)
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get('key') == key:
            log.info('eval %s: unchanged since %s was written, reusing it', name, cache)
            return saved['scores']
    model = load_finished_stage(experiment, name, workdir, tokenizer)
    records = predict(
        model,
        examples,
        tokenizer,
        batch_size=experiment.eval.batch_size,
        max_new_tokens=experiment.eval.max_new_tokens,
        desc=f'eval {name}',
    )
    # Through JSON, so a fresh result and a reused one are the same objects.
    scores = json.loads(json.dumps(scoring.score(records)))
    cache.write_text(json.dumps({'key': key, 'scores': scores}, indent=1) + '\n')
    return scores


def evaluate(experiment: ExperimentConfig, workdir: pathlib.Path, tokenizer: TextTokenizer) -> str:
    """Evaluates every stage in `config.eval.stages`; writes results.{md,json}; returns the
    table."""
    eval_tasks = list(experiment.eval.tasks)
    examples = pipeline.load_eval_examples(experiment.data, tokenizer, eval_tasks)
    results = {}
    for name in experiment.eval.stages:
        results[name] = stage_scores(experiment, name, workdir, tokenizer, examples)
        log.info('eval %s: overall accuracy %.3f', name, results[name]['overall']['accuracy'])
    task_modality = {task: tasks_lib.TASKS[task] for task in eval_tasks}
    chance = {task: tasks_lib.chance_accuracy(task) for task in eval_tasks}
    tables.write_results(workdir, results, chance, task_modality)
    return tables.results_table(results, chance, task_modality)
