"""Answers a benchmark's records with a finished stage and scores them (`python -m unimoe.eval`).

A finished stage is named by its directory, `WORKDIR/STAGE` (what `python -m unimoe.main`
writes: the stage's checkpoints and DONE.json); the model is built from `config.stages[STAGE]`
and every parameter restored (`evaluate.load_finished_stage`). Prompts are the Vicuna v1 prompt
the stage trained on: `data.vicuna` with the config's pretrained tokenizer (`config.tokenizer`),
`data.conversation` with the built-in one (read from `config.data.data_dir`). Media go through
the real-data preprocessing (`json_pipeline.ExampleBuilder.media`), shaped by `config.data`.
Answers come from `evaluate.generate_answers`, greedy or sampled as the benchmark's protocol says
(`Benchmark.temperature`, overridable); one token-buffer length for the whole run, so it compiles
once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import tqdm
from flax import nnx

from unimoe import factory
from unimoe.data import builtin, conversation, formats, json_pipeline, shapes, vicuna
from unimoe.data.tokenizer import PretrainedTokenizer, TextTokenizer
from unimoe.eval import benchmarks, evaluate
from unimoe.eval.generate import SamplingConfig
from unimoe.experiment import ExperimentConfig
from unimoe.models.unimoe import UniMoE

log = logging.getLogger(__name__)

# Token buffers are rounded up to a multiple of this, so nearby prompt lengths share a compile.
_LENGTH_BUCKET = 64
_MODEL_KEYS = ("tokens", "prompt_len", "image", "video", "audio_mel")
_PRESENCE_KEYS = ("has_image", "has_video", "has_audio")


def load_tokenizer(experiment: ExperimentConfig) -> TextTokenizer:
    """The tokenizer the experiment trained with (never trains or downloads one)."""
    return builtin.experiment_tokenizer(
        experiment.tokenizer, experiment.data.data_dir, on_missing="error"
    )


def load_stage(
    experiment: ExperimentConfig, checkpoint: str | os.PathLike, tokenizer: TextTokenizer
) -> UniMoE:
    """The model of the finished stage in directory `checkpoint` (= WORKDIR/STAGE)."""
    stage_dir = pathlib.Path(checkpoint)
    workdir, name = stage_dir.parent, stage_dir.name
    if name not in experiment.stages:
        raise ValueError(
            f"--checkpoint={checkpoint}: stage {name!r} is not in the config's stages "
            f"{sorted(experiment.stages)} (the checkpoint is WORKDIR/STAGE)"
        )
    if not factory.stage_checkpointer(workdir, name).is_done():
        raise ValueError(
            f"--checkpoint={checkpoint}: stage {name!r} has not finished (no DONE.json)"
        )
    return evaluate.load_finished_stage(experiment, name, workdir, tokenizer)


def _media_config(
    experiment: ExperimentConfig, media_root: str | None
) -> json_pipeline.JsonDataConfig:
    """The media preprocessing the stage trained with: `config.json_data`'s, `config.data`'s
    shapes."""
    json_data = experiment.json_data
    policies = {} if json_data is None else dict(
        image_aspect=json_data.image_aspect, max_audio_chunks=json_data.max_audio_chunks
    )
    return json_pipeline.JsonDataConfig(
        data_dir="",  # not read: records come from the benchmark file
        sources=("benchmark",),
        media_root=media_root,
        batch_size=1,
        **policies,
        **shapes.from_config_data(dataclasses.asdict(experiment.data)),
    )


def _prompt(
    record: formats.Record, tokenizer: TextTokenizer, cfg: json_pipeline.JsonDataConfig, chunks: list[int]
) -> np.ndarray:
    if isinstance(tokenizer, PretrainedTokenizer):
        return vicuna.build_prompt(
            record.conversations,
            tokenizer,
            n_image_tokens=cfg.n_image_tokens,
            n_video_tokens=cfg.n_video_tokens,
            audio_tokens=[cfg.n_audio_tokens * c for c in chunks],
        )
    # The built-in template expands every <audio> alike.
    if len(set(chunks)) > 1:
        raise record.error(
            "voice", f"files of {chunks} audio chunks: the built-in tokenizer needs equal ones"
        )
    return conversation.build_prompt(
        record.conversations,
        tokenizer,
        n_image_tokens=cfg.n_image_tokens,
        n_video_tokens=cfg.n_video_tokens,
        n_audio_tokens=cfg.n_audio_tokens * (chunks[0] if chunks else 1),
        record_id=record.id,
    )


def build_examples(
    experiment: ExperimentConfig,
    items: Sequence[benchmarks.EvalItem],
    tokenizer: TextTokenizer,
    media_root: str | None,
    on_error: str = "raise",
) -> tuple[list[benchmarks.EvalItem], list[dict[str, np.ndarray]], int]:
    """(items kept, their examples, number skipped). An example is `prompt` int32 [P] (unpadded)
    and the media slots; bad media raise RecordError, or are skipped with on_error='skip'."""
    cfg = _media_config(experiment, media_root)
    builder = json_pipeline.ExampleBuilder(cfg, tokenizer=None)
    kept, examples = [], []
    for item in tqdm.tqdm(items, desc="media", leave=False):
        try:
            example, chunks = builder.media(item.record)
            example["prompt"] = _prompt(item.record, tokenizer, cfg, chunks)
        except formats.RecordError:
            if on_error == "raise":
                raise
            continue
        kept.append(item)
        examples.append(example)
    return kept, examples, len(items) - len(kept)


def generate(
    model: UniMoE,
    examples: Sequence[dict[str, np.ndarray]],
    tokenizer: TextTokenizer,
    *,
    batch_size: int,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
) -> list[str]:
    """Answers to every example, in order (the last batch padded with copies)."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(
            f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must be >= 1"
        )
    longest = max(len(ex["prompt"]) for ex in examples) + max_new_tokens
    seq_len = -(-longest // _LENGTH_BUCKET) * _LENGTH_BUCKET
    graphdef, state = nnx.split(model)
    answers = []
    for start in tqdm.trange(0, len(examples), batch_size, desc="generate", leave=False):
        chunk = list(examples[start : start + batch_size])
        num_valid = len(chunk)
        chunk += [chunk[0]] * (batch_size - num_valid)
        tokens = np.full((batch_size, seq_len), tokenizer.pad_id, np.int32)
        for row, ex in enumerate(chunk):
            tokens[row, : len(ex["prompt"])] = ex["prompt"]
        batch = {
            "tokens": tokens,
            "prompt_len": np.asarray([len(ex["prompt"]) for ex in chunk], np.int32),
            **{k: np.stack([ex[k] for ex in chunk]) for k in (*_MODEL_KEYS[2:], *_PRESENCE_KEYS)},
        }
        ids = evaluate.generate_answers(
            graphdef,
            state,
            batch,
            max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            sampling=sampling,
        )
        for row in np.asarray(ids)[:num_valid]:
            row = [int(t) for t in row]
            if tokenizer.eos_id in row:
                row = row[: row.index(tokenizer.eos_id)]
            answers.append(tokenizer.decode(row).strip())
    return answers


def _write_json(path: pathlib.Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def output_paths(output: str | os.PathLike, benchmark: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(predictions, scores) JSON paths of a benchmark under `output`."""
    out = pathlib.Path(output)
    return out / f"{benchmark}.predictions.json", out / f"{benchmark}.scores.json"


def evaluate_benchmark(
    experiment: ExperimentConfig,
    *,
    checkpoint: str,
    benchmark: str,
    data: str,
    output: str,
    answers: str | None = None,
    media_root: str | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    limit: int = 0,
    on_error: str = "raise",
    temperature: float | None = None,
    top_p: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Writes `<benchmark>.predictions.json` (each input record plus `prediction`) and
    `<benchmark>.scores.json` under `output`; returns the scores. `temperature` None: the
    benchmark's protocol (`Benchmark.temperature`)."""
    bench = benchmarks.get(benchmark)
    sampling = SamplingConfig(
        temperature=bench.temperature if temperature is None else temperature,
        top_p=top_p,
        seed=seed,
    )
    items, skipped = benchmarks.read_items(bench, data, answers_path=answers, on_error=on_error)
    if limit:
        items = items[:limit]
    if not items:
        raise ValueError(f"{data}: no records to evaluate ({skipped} skipped)")
    tokenizer = load_tokenizer(experiment)
    model = load_stage(experiment, checkpoint, tokenizer)
    items, examples, bad_media = build_examples(experiment, items, tokenizer, media_root, on_error)
    skipped += bad_media
    if not items:
        raise ValueError(f"{data}: every record was skipped ({skipped})")
    predictions = generate(
        model,
        examples,
        tokenizer,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
    )
    scores = benchmarks.score_items(bench, items, predictions)
    scores.update(
        data=os.fspath(data),
        answers=answers,
        checkpoint=os.fspath(checkpoint),
        skipped_records=skipped,
        max_new_tokens=max_new_tokens,
        sampling=dataclasses.asdict(sampling),
    )
    _write_results(output, benchmark, items, predictions, scores)
    log.info("%s: %s = %.4f", benchmark, scores["headline"], scores[scores["headline"]])
    return scores


def _write_results(
    output: str, benchmark: str, items: list, predictions: list[str], scores: dict[str, Any]
) -> None:
    """Each input record with its `prediction`, and the scores, under `output`."""
    predictions_path, scores_path = output_paths(output, benchmark)
    predictions_path.parent.mkdir(parents=True, exist_ok=True)
    records = [{**item.raw, benchmarks.PREDICTION_KEY: p} for item, p in zip(items, predictions)]
    _write_json(predictions_path, records)
    _write_json(scores_path, scores)
