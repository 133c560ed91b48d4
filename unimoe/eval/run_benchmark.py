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
import zipfile
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from unimoe import factory
from unimoe.convert import core as convert_core, released
from unimoe.data import builtin, conversation, formats, json_pipeline, shapes, vicuna
from unimoe.data.tokenizer import PretrainedTokenizer, TextTokenizer
from unimoe.eval import beam, benchmarks, evaluate, protocol as protocol_lib
from unimoe.eval.generate import MEDIA_KEYS
from unimoe.experiment import ExperimentConfig
from unimoe.models.unimoe import UniMoE

log = logging.getLogger(__name__)

# Token buffers are rounded up to a multiple of this, so nearby prompt lengths share a compile.
_LENGTH_BUCKET = 64
GENERATION_CONFIG = released.GENERATION_CONFIG
# The source name of a benchmark's records in the media preprocessing (`_media_config`).
BENCHMARK_SOURCE = "benchmark"


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


def load_converted(
    experiment: ExperimentConfig,
    checkpoint: str | os.PathLike,
    tokenizer: TextTokenizer,
    *,
    compute_dtype: str,
    weights_via_float16: bool,
) -> UniMoE:
    """The model of a converted checkpoint (`python -m unimoe.convert from-unimoe` / `from-hf`
    OUT), built as the config's last stage without LoRA (a converted checkpoint holds merged
    weights), every parameter from the checkpoint; the LM computes
    in `compute_dtype` with its matrices held in it (half the memory at bf16). With
    `weights_via_float16` every weight is rounded to float16 first, as the official loader reads
    the released models (`torch_dtype=float16`)."""
    stage = experiment.stage(list(experiment.stages)[-1])
    spec = dataclasses.replace(
        experiment.model, llm=dataclasses.replace(experiment.model.llm, dtype=compute_dtype)
    )
    model = factory.build_model(
        spec, tokenizer, moe=stage.moe, lora_rank=0, seed=experiment.seed, abstract=True,
    )  # fmt: skip

    def cast(path: str, value: np.ndarray) -> np.ndarray:
        if weights_via_float16 and jnp.issubdtype(value.dtype, jnp.floating):
            value = value.astype(np.float16)
        dtype = jnp.dtype(compute_dtype) if factory.is_lm_matrix(path, value) else np.float32
        return np.asarray(value, dtype=dtype)

    params = convert_core.pretrained_params({"checkpoint": os.fspath(checkpoint)})
    model = factory.params_into_abstract(
        model,
        params,
        f"--checkpoint={checkpoint}",
        cast,
        seed=experiment.seed,
        missing_ok=released.not_in_checkpoint_of(checkpoint),
    )
    return nnx.view(model, deterministic=True, raise_if_not_found=False)


def _media_config(
    experiment: ExperimentConfig, media_root: str | None
) -> json_pipeline.JsonDataConfig:
    """The media preprocessing the stage trained with: `config.json_data`'s, `config.data`'s
    shapes. The benchmark's records are the source named `BENCHMARK_SOURCE`: its audio goes to
    the sound tower (BEATs) when `config.json_data.sound_sources` names it (Uni-MoE-audio)."""
    json_data = experiment.json_data
    policies = {} if json_data is None else dict(
        image_aspect=json_data.image_aspect,
        max_audio_chunks=json_data.max_audio_chunks,
        audio_chunk_gap=json_data.audio_chunk_gap,
        sound_sources=tuple(s for s in json_data.sound_sources if s == BENCHMARK_SOURCE),
        sound_chunk_samples=json_data.sound_chunk_samples,
        sound_mel_bins=json_data.sound_mel_bins,
        max_sound_chunks=json_data.max_sound_chunks,
    )
    return json_pipeline.JsonDataConfig(
        data_dir="",  # not read: records come from the benchmark file
        sources=(BENCHMARK_SOURCE,),
        media_root=media_root,
        batch_size=1,
        **policies,
        **shapes.from_config_data(dataclasses.asdict(experiment.data)),
    )


def _prompt(
    record: formats.Record,
    tokenizer: TextTokenizer,
    builder: json_pipeline.ExampleBuilder,
    chunks: list[int],
) -> np.ndarray:
    cfg = builder.cfg
    if isinstance(tokenizer, PretrainedTokenizer):
        return vicuna.build_prompt(
            record.conversations,
            tokenizer,
            n_image_tokens=cfg.n_image_tokens,
            n_video_tokens=cfg.n_video_tokens,
            audio_tokens=builder.audio_tokens(chunks),
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
    builder = json_pipeline.ExampleBuilder(cfg, tokenizer=None, source=BENCHMARK_SOURCE)
    kept, examples = [], []
    for item in tqdm.tqdm(items, desc="media", leave=False):
        try:
            example, chunks = builder.media(item.record)
            example["prompt"] = _prompt(item.record, tokenizer, builder, chunks)
        except formats.RecordError:
            if on_error == "raise":
                raise
            continue
        kept.append(item)
        examples.append(example)
    return kept, examples, len(items) - len(kept)


def _batch(chunk: list[dict[str, np.ndarray]], tokenizer: TextTokenizer, seq_len: int) -> dict:
    tokens = np.full((len(chunk), seq_len), tokenizer.pad_id, np.int32)
    for row, ex in enumerate(chunk):
        tokens[row, : len(ex["prompt"])] = ex["prompt"]
    return {
        "tokens": tokens,
        "prompt_len": np.asarray([len(ex["prompt"]) for ex in chunk], np.int32),
        **{k: np.stack([ex[k] for ex in chunk]) for k in MEDIA_KEYS if k in chunk[0]},
    }


def generate(
    model: UniMoE,
    examples: Sequence[dict[str, np.ndarray]],
    tokenizer: TextTokenizer,
    *,
    batch_size: int,
    decoding: protocol_lib.Decoding,
    first_logits: list[np.ndarray] | None = None,
) -> list[str]:
    """Answers to every example, in order (the last batch padded with copies), decoded as
    `decoding` says (beam search or sampling with `num_beams` > 1: `beam.beam_generate`). Example
    i samples from stream i and the media placeholders are never generated, so an answer does not
    depend on the batch it is in. `first_logits`, if given, receives each example's first-step
    logits."""
    max_new_tokens = decoding.max_new_tokens
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
        common = dict(
            max_new_tokens=max_new_tokens,
            pad_id=tokenizer.pad_id,
            sampling=decoding.sampling,
            row_ids=[start + min(row, num_valid - 1) for row in range(batch_size)],
            suppress_ids=(tokenizer.image_id, tokenizer.video_id, tokenizer.audio_id),
            with_first_logits=True,
        )
        batch = _batch(chunk, tokenizer, seq_len)
        if decoding.num_beams > 1:
            ids, logits = beam.beam_generate(
                graphdef, state, batch, num_beams=decoding.num_beams,
                min_new_tokens=decoding.min_new_tokens, stop_ids={tokenizer.eos_id}, **common,
            )  # fmt: skip
        else:
            ids, logits = evaluate.generate_answers(
                graphdef, state, batch, eos_id=tokenizer.eos_id, **common
            )
        if first_logits is not None:
            first_logits.extend(np.asarray(logits)[:num_valid])
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


@dataclasses.dataclass(frozen=True)
class Request:
    """What the command line asks beyond the benchmark: None = the protocol's choice.

    protocol: 'official' or 'ours' (None: `config.eval.protocol`); dtype: the LM's compute dtype
    for a converted checkpoint, 'auto' = the official eval.py's (`protocol.OFFICIAL_DTYPE`, weights
    rounded to float16 first as it loads them) or the config's under 'ours'."""

    protocol: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int = 0
    dtype: str = "auto"
    save_logits: bool = False


def _decoding(
    experiment: ExperimentConfig, request: Request, benchmark: str, checkpoint: str
) -> protocol_lib.Decoding:
    protocol = request.protocol or experiment.eval.protocol
    if protocol == "ours":
        return protocol_lib.ours_decoding(
            benchmark,
            max_new_tokens=request.max_new_tokens or experiment.eval.max_new_tokens,
            temperature=request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed,
        )
    generation_config = pathlib.Path(checkpoint) / GENERATION_CONFIG
    decoding = protocol_lib.official_decoding(
        experiment.eval.released_variant,
        benchmark,
        json.loads(generation_config.read_text()) if generation_config.is_file() else {},
        request.seed,
    )
    overrides = {"temperature": request.temperature, "top_p": request.top_p}
    return dataclasses.replace(
        decoding,
        sampling=dataclasses.replace(
            decoding.sampling, **{k: v for k, v in overrides.items() if v is not None}
        ),
        max_new_tokens=request.max_new_tokens or decoding.max_new_tokens,
    )


def load_model(
    experiment: ExperimentConfig, request: Request, checkpoint: str, tokenizer: TextTokenizer
) -> UniMoE:
    """A finished stage (WORKDIR/STAGE) or a converted checkpoint, in the requested dtype."""
    if not (pathlib.Path(checkpoint) / convert_core.META_FILE).is_file():
        return load_stage(experiment, checkpoint, tokenizer)
    official = (request.protocol or experiment.eval.protocol) == "official"
    dtype = request.dtype
    if dtype == "auto":
        variant = experiment.eval.released_variant
        dtype = protocol_lib.OFFICIAL_DTYPE.get(variant, "") if official else ""
        dtype = dtype or experiment.model.llm.dtype
    return load_converted(
        experiment,
        checkpoint,
        tokenizer,
        compute_dtype=dtype,
        weights_via_float16=official and dtype != "float32",
    )


def evaluate_benchmark(
    experiment: ExperimentConfig,
    *,
    checkpoint: str,
    benchmark: str,
    data: str,
    output: str,
    answers: str | None = None,
    media_root: str | None = None,
    batch_size: int = 8,
    limit: int = 0,
    on_error: str = "raise",
    request: Request = Request(),
) -> dict[str, Any]:
    """Writes `<benchmark>.predictions.json` (each input record plus `prediction`) and
    `<benchmark>.scores.json` under `output` (with `request.save_logits`, also
    `<benchmark>.logits.npz`: each question's first-step logits keyed by its id); returns the
    scores."""
    bench = benchmarks.get(benchmark)
    decoding = _decoding(experiment, request, benchmark, checkpoint)
    items, skipped = benchmarks.read_items(bench, data, answers_path=answers, on_error=on_error)
    if limit:
        items = items[:limit]
    if not items:
        raise ValueError(f"{data}: no records to evaluate ({skipped} skipped)")
    tokenizer = load_tokenizer(experiment)
    model = load_model(experiment, request, checkpoint, tokenizer)
    items, examples, bad_media = build_examples(experiment, items, tokenizer, media_root, on_error)
    skipped += bad_media
    if not items:
        raise ValueError(f"{data}: every record was skipped ({skipped})")
    first_logits: list[np.ndarray] = []
    predictions = generate(
        model, examples, tokenizer, batch_size=batch_size, decoding=decoding,
        first_logits=first_logits,
    )  # fmt: skip
    protocol = request.protocol or experiment.eval.protocol
    scores = benchmarks.score_items(bench, items, predictions, protocol=protocol)
    scores.update(
        data=os.fspath(data),
        answers=answers,
        checkpoint=os.fspath(checkpoint),
        skipped_records=skipped,
        protocol=protocol,
        max_new_tokens=decoding.max_new_tokens,
        sampling=dataclasses.asdict(decoding.sampling),
        num_beams=decoding.num_beams,
        min_new_tokens=decoding.min_new_tokens,
    )
    _write_results(output, benchmark, items, predictions, scores)
    if request.save_logits:
        _write_logits(output, benchmark, items, first_logits)
    log.info("%s: %s = %.4f", benchmark, scores["headline"], scores[scores["headline"]])
    return scores


def question_keys(items: Sequence[benchmarks.EvalItem]) -> list[str]:
    """Each item's question id (the record's `question_id`, else its `id`); a repeated id gets
    '#<n>' appended, n its position in the file."""
    keys, seen = [], set()
    for n, item in enumerate(items):
        key = str(item.record.extra.get("question_id", item.record.id))
        if key in seen:
            key = f"{key}#{n}"
        seen.add(key)
        keys.append(key)
    return keys


def _write_logits(
    output: str, benchmark: str, items: Sequence[benchmarks.EvalItem], logits: list[np.ndarray]
) -> None:
    """`np.load`-able, written member by member: an id may be any string (even 'file')."""
    path = pathlib.Path(output) / f"{benchmark}.logits.npz"
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w") as archive:
        for key, value in zip(question_keys(items), logits):
            with archive.open(f"{key}.npy", "w") as member:
                np.lib.format.write_array(member, np.asarray(value, np.float32))
    os.replace(tmp, path)


def _write_results(
    output: str, benchmark: str, items: list, predictions: list[str], scores: dict[str, Any]
) -> None:
    """Each input record with its `prediction`, and the scores, under `output`."""
    predictions_path, scores_path = output_paths(output, benchmark)
    predictions_path.parent.mkdir(parents=True, exist_ok=True)
    records = [{**item.raw, benchmarks.PREDICTION_KEY: p} for item, p in zip(items, predictions)]
    _write_json(predictions_path, records)
    _write_json(scores_path, scores)
