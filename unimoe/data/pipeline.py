"""grain pipelines over the built-in dataset: records -> model batches (format in docs/design.md).

Train loaders read `tfds` array_record data sources, sample shuffled infinite epochs, preprocess each
record (template + placeholder expansion, CLIP-normalised media, log-mel) in-process and batch it.
Their iterators are checkpointable (`grain.python.PyGrainCheckpointSave`). Eval examples are loaded
eagerly, with prompts instead of full conversations, and batched with `collate`. The audio of the
tasks in `sound_tasks` goes to the sound tower (BEATs features in the `unimoe.data.sound` slots,
present only when `sound_tasks` is set) instead of Whisper's log-mel.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any

import grain.python as grain
import numpy as np

from unimoe.data import builtin, conversation, grouping, media, shapes, sound
from unimoe.data import tasks as task_defs  # `tasks` is the loaders' parameter name
from unimoe.data.tokenizer import Tokenizer

MODES: tuple[str, ...] = ("chat", "lm_text", "classify_image", "classify_audio", "classify_sound")
# Media each mode feeds the model; the other slots stay zero with has_* False, which skips their
# preprocessing (log-mel is the costly part) and matches the text, which has no placeholders then.
_MODE_MEDIA: dict[str, tuple[str, ...]] = {
    "chat": ("image", "video", "audio"),
    "lm_text": (),
    "classify_image": ("image",),
    "classify_audio": ("audio",),
    "classify_sound": ("audio",),  # the audio of `sound_tasks`, as BEATs features
}
_INT16_SCALE = 32767.0
# BEATs' input as the reference reads a 16-bit file (soundfile: int16 / 2^15), so that BEATs'
# x 2^15 gives back the stored samples.
_SOUND_INT16_SCALE = 32768.0
_STRING_KEYS = ("answer", "task", "modality", "id")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig(shapes.BatchShapes):
    """What the built-in pipelines read, and the shapes they produce (`BatchShapes`)."""

    data_dir: str
    builder_config: str
    skip_too_long: bool = False
    seed: int = 0
    # Worker processes preprocessing batches ahead of training (grain); 0 = in the main process.
    worker_count: int = 0
    # Modality-level data parallelism (Uni-MoE): every global batch of one modality
    # (`unimoe.data.grouping`); needs skip_too_long=False (a skipped record would shift rows).
    group_by_modality: bool = False
    # Tasks whose audio goes to the sound tower (BEATs features, `unimoe.data.sound`), not to
    # Whisper; a tiny BEATs input by default: a built-in clip (3 s) is one chunk of 298 frames.
    sound_tasks: tuple[str, ...] = ()
    sound_chunk_samples: int = 3 * media.SAMPLE_RATE
    sound_mel_bins: int = 32
    max_sound_chunks: int = 1

    def __post_init__(self):
        super().__post_init__()
        sound.check_fields(self)
        silent = [t for t in self.sound_tasks if t not in task_defs.AUDIO_LABEL_TASKS]
        if silent:
            raise ValueError(
                f"DataConfig.sound_tasks: {silent} have no audio; tasks with audio are "
                f"{task_defs.AUDIO_LABEL_TASKS}"
            )
        if self.group_by_modality and self.skip_too_long:
            raise ValueError(
                "DataConfig.group_by_modality needs skip_too_long=False: a skipped record would "
                "pull the next batch's first record (maybe another modality) into this batch"
            )


def _builder(cfg: DataConfig) -> builtin.UnimoeBuiltin:
    """The prepared builder, checked against the media shapes `cfg` asks for."""
    builder = builtin.UnimoeBuiltin(
        config=cfg.builder_config, data_dir=cfg.data_dir, file_format="array_record"
    )
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"unimoe_builtin/{cfg.builder_config} is not built in {cfg.data_dir}; "
            "run unimoe.data.builtin.prepare(data_dir, config_name) first"
        )
    stored: builtin.BuiltinConfig = builder.builder_config
    if cfg.image_size != stored.image_size:
        raise ValueError(
            f"DataConfig.image_size={cfg.image_size} differs from the stored images' "
            f"{stored.image_size} (unimoe_builtin/{stored.name})"
        )
    if cfg.num_frames > stored.num_frames:
        raise ValueError(
            f"DataConfig.num_frames={cfg.num_frames} exceeds the stored videos' "
            f"{stored.num_frames} frames (unimoe_builtin/{stored.name})"
        )
    room = cfg.sound_chunk_samples * cfg.max_sound_chunks
    if cfg.sound_tasks and stored.clip_samples > room:
        raise ValueError(
            f"DataConfig.max_sound_chunks={cfg.max_sound_chunks} chunks of sound_chunk_samples="
            f"{cfg.sound_chunk_samples} hold {room} samples, fewer than the stored clips' "
            f"{stored.clip_samples} (unimoe_builtin/{stored.name})"
        )
    return builder


def _media(record: dict[str, Any], cfg: DataConfig, used: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Normalised media slots; absent or unused media are zeros with has_* False. The audio of
    a `sound_tasks` task fills the sound slots (has_sound) instead of `audio_mel`."""
    size = cfg.image_size
    image, video, audio = record["image"], record["video"], record["audio"]
    to_sound = _text(record["task"]) in cfg.sound_tasks
    out = {
        "image": np.zeros((size, size, 3), np.float32),
        "has_image": np.bool_(len(image) > 0 and "image" in used),
        "video": np.zeros((cfg.num_frames, size, size, 3), np.float32),
        "has_video": np.bool_(len(video) > 0 and "video" in used),
        "audio_mel": np.zeros((cfg.audio_frames, cfg.num_mel_bins), np.float32),
        "has_audio": np.bool_(len(audio) > 0 and "audio" in used and not to_sound),
    }
    if cfg.sound_tasks:
        out.update(sound.empty_slots(cfg))
        if to_sound and len(audio) > 0 and "audio" in used:
            wave = audio.astype(np.float32) / _SOUND_INT16_SCALE
            sound.fill(out, [sound.features(wave, cfg, cfg.max_sound_chunks)])
    if out["has_image"]:
        out["image"] = media.normalize_image(image[0])
    if out["has_video"]:
        # Evenly spaced frames, first and last included, when fewer are asked than stored.
        frame_ids = np.round(np.linspace(0, len(video) - 1, cfg.num_frames)).astype(np.int64)
        out["video"] = media.normalize_image(video[frame_ids])
    if out["has_audio"]:
        out["audio_mel"] = media.log_mel(
            audio.astype(np.float32) / _INT16_SCALE, cfg.num_mel_bins, cfg.audio_frames
        )
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _audio_tokens(example: dict[str, np.ndarray], cfg: DataConfig) -> int:
    """Placeholders an `<audio>` tag expands to: Whisper's, or the sound tower's per chunk."""
    if example.get("has_sound", False):
        return cfg.n_sound_tokens * int(example["sound_chunk_mask"].sum())
    return cfg.n_audio_tokens


def _check_media_tags(
    convs: list[dict[str, str]], example: dict[str, np.ndarray], record_id: str
) -> None:
    text = "".join(turn["value"] for turn in convs)
    for tag, has_keys in (
        ("<image>", ("has_image",)),
        ("<video>", ("has_video",)),
        ("<audio>", ("has_audio", "has_sound")),
    ):
        present = any(bool(example.get(key, False)) for key in has_keys)
        if (tag in text) != present:
            raise ValueError(
                f"record {record_id!r}: {tag} in text is {tag in text} but "
                f"{' or '.join(has_keys)} is {present}"
            )


class _Preprocess(grain.MapTransform):
    """Record -> one unbatched example; too-long records become {} (dropped by `_NonEmpty`)."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, mode: str, num_records: int):
        self.cfg, self.tokenizer, self.mode = cfg, tokenizer, mode
        self.num_records = num_records
        self.num_skipped = 0
        self._skipped_in_a_row = 0

    def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        cfg, record_id = self.cfg, _text(record["id"])
        example = _media(record, cfg, _MODE_MEDIA[self.mode])
        convs = json.loads(_text(record["conversations"]))
        try:
            if self.mode == "chat":
                _check_media_tags(convs, example, record_id)
                tokens, loss_mask = conversation.build_chat_example(
                    convs,
                    self.tokenizer,
                    n_image_tokens=cfg.n_image_tokens,
                    n_video_tokens=cfg.n_video_tokens,
                    n_audio_tokens=_audio_tokens(example, cfg),
                    seq_len=cfg.seq_len,
                    record_id=record_id,
                )
            elif self.mode == "lm_text":
                tokens, loss_mask = conversation.build_lm_text(
                    convs, self.tokenizer, seq_len=cfg.seq_len, record_id=record_id
                )
            else:  # classification batches train encoders only: no text
                tokens = np.full((cfg.seq_len,), self.tokenizer.pad_id, np.int32)
                loss_mask = np.zeros((cfg.seq_len,), np.float32)
        except conversation.SequenceTooLongError:
            if not cfg.skip_too_long:
                raise
            self.num_skipped += 1
            self._skipped_in_a_row += 1
            # An infinite sampler would otherwise spin forever when no record fits.
            if self._skipped_in_a_row > self.num_records:
                raise ValueError(
                    f"every record is longer than DataConfig.seq_len={cfg.seq_len}"
                ) from None
            logging.warning(
                "skipping record %s: longer than seq_len=%d (%d skipped so far)",
                record_id,
                cfg.seq_len,
                self.num_skipped,
            )
            return {}
        self._skipped_in_a_row = 0
        task = _text(record["task"])
        example.update(
            tokens=tokens,
            loss_mask=loss_mask,
            # Encoded text never contains the pad id (byte-level BPE has no unknowns).
            attn_mask=tokens != self.tokenizer.pad_id,
            image_label=np.int32(record["image_label"]),
            audio_label=np.int32(record["audio_label"]),
            modality=np.int32(task_defs.MODALITIES.index(task_defs.TASKS[task])),
            task=np.int32(task_defs.TASK_NAMES.index(task)),
        )
        return example


class _NonEmpty(grain.FilterTransform):
    def filter(self, element: dict[str, np.ndarray]) -> bool:
        return bool(element)


def _select_tasks(selected_tasks: Sequence[str], mode: str) -> list[str]:
    unknown = [t for t in selected_tasks if t not in task_defs.TASKS]
    if unknown or not selected_tasks:
        raise ValueError(
            f"tasks must be a non-empty list of {task_defs.TASK_NAMES}, got {list(selected_tasks)}"
        )
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    labelled = {
        "classify_image": task_defs.IMAGE_LABEL_TASKS,
        "classify_audio": task_defs.AUDIO_LABEL_TASKS,
        "classify_sound": task_defs.AUDIO_LABEL_TASKS,
    }
    if mode in labelled:
        selected_tasks = [t for t in selected_tasks if t in labelled[mode]]
        if not selected_tasks:
            raise ValueError(f"mode={mode!r} needs at least one of the tasks {labelled[mode]}")
    return list(selected_tasks)


def _check_shard(cfg: DataConfig, shard_index: int, shard_count: int) -> None:
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    if cfg.batch_size % shard_count:
        raise ValueError(
            f"DataConfig.batch_size={cfg.batch_size} is not divisible by shard_count={shard_count}"
        )


def check_audio_route(cfg: DataConfig, tasks: Sequence[str], mode: str) -> None:
    """classify_sound reads only the audio routed to the sound tower, classify_audio only the
    rest: a task on the other side would train on zeros."""
    routed = [t for t in tasks if t in cfg.sound_tasks]
    wrong = {"classify_sound": [t for t in tasks if t not in routed], "classify_audio": routed}
    if wrong.get(mode):
        raise ValueError(
            f"mode={mode!r}: tasks {wrong[mode]} are "
            f"{'not ' if mode == 'classify_sound' else ''}in DataConfig.sound_tasks="
            f"{list(cfg.sound_tasks)} (classify_sound reads the sound tower's audio, "
            "classify_audio Whisper's)"
        )


def make_train_loader(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    tasks: Sequence[str],
    mode: str,
    *,
    seed: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.DataLoader:
    """Infinite shuffled batches of this shard's records of `tasks` (per-shard batch = batch_size / shard_count).

    `mode`: 'chat' (Vicuna template, answers supervised), 'lm_text' (plain template text, every token
    supervised, no media), 'classify_image' / 'classify_audio' / 'classify_sound' (only records
    with that label, only that medium, no text: tokens are all pad and attn_mask all False).
    `seed` defaults to `cfg.seed`; the tasks are mixed in proportion to their record counts (equal).
    """
    selected = _select_tasks(tasks, mode)
    check_audio_route(cfg, selected, mode)
    _check_shard(cfg, shard_index, shard_count)
    builder = _builder(cfg)
    source = builder.as_data_source(
        split=builtin.task_slices(builder.builder_config, "train", selected)
    )
    shard_options = grain.ShardOptions(
        shard_index=shard_index, shard_count=shard_count, drop_remainder=True
    )
    seed = cfg.seed if seed is None else seed
    if cfg.group_by_modality:
        sampler = grouping.ModalityBatchSampler(
            _record_modalities(builder, selected, len(source)), cfg.batch_size, shard_options, seed
        )
    else:
        sampler = grain.IndexSampler(
            num_records=len(source),
            shard_options=shard_options,
            shuffle=True,
            num_epochs=None,
            seed=seed,
        )
    operations = [
        _Preprocess(cfg, tokenizer, mode, len(source)),
        _NonEmpty(),
        grain.Batch(batch_size=cfg.batch_size // shard_count, drop_remainder=True),
    ]
    # Records are local files: a few reader threads and a short buffer suffice, and grain's
    # default 500-element buffer costs more in polling its futures than the reads themselves.
    read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * cfg.batch_size)
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        worker_count=cfg.worker_count,
        shard_options=shard_options,
        read_options=read_options,
    )


def _record_modalities(
    builder: builtin.UnimoeBuiltin, selected: Sequence[str], num_records: int
) -> np.ndarray:
    """Modality index of every record of `builtin.task_slices(..., selected)`, without reading
    them: the slices are the selected tasks' equal blocks, in the split's task order."""
    split_tasks = builder.builder_config.split_tasks("train")
    per_task = builder.builder_config.examples_per_task("train")
    ordered = sorted(set(selected), key=split_tasks.index)
    keys = np.repeat([task_defs.MODALITIES.index(task_defs.TASKS[t]) for t in ordered], per_task)
    if len(keys) != num_records:
        raise ValueError(
            f"expected {len(keys)} records for tasks {ordered}, the source has {num_records}"
        )
    return keys


def load_eval_examples(
    cfg: DataConfig, tokenizer: Tokenizer, tasks: Sequence[str]
) -> list[dict[str, Any]]:
    """Every eval record of `tasks` as a prompt example (unbatched; see `collate`).

    Keys: `tokens` int32 [T] (prompt ending in "ASSISTANT:", right-padded), `attn_mask`, `loss_mask`
    (zeros), `prompt_len`, the media slots and labels of the batch format, and the strings `answer`,
    `task`, `modality`, `id`.
    """
    selected = _select_tasks(tasks, "chat")
    builder = _builder(cfg)
    source = builder.as_data_source(
        split=builtin.task_slices(builder.builder_config, "eval", selected)
    )
    examples = []
    for index in range(len(source)):
        record = source[index]
        record_id = _text(record["id"])
        example = _media(record, cfg, _MODE_MEDIA["chat"])
        convs = json.loads(_text(record["conversations"]))
        _check_media_tags(convs, example, record_id)
        prompt = conversation.build_prompt(
            convs,
            tokenizer,
            n_image_tokens=cfg.n_image_tokens,
            n_video_tokens=cfg.n_video_tokens,
            n_audio_tokens=_audio_tokens(example, cfg),
            record_id=record_id,
        )
        if len(prompt) >= cfg.seq_len:
            if cfg.skip_too_long:
                logging.warning(
                    "skipping eval record %s: prompt of %d tokens, seq_len=%d",
                    record_id,
                    len(prompt),
                    cfg.seq_len,
                )
                continue
            raise conversation.SequenceTooLongError(
                f"eval record {record_id!r} has a {len(prompt)}-token prompt, leaving no room to "
                f"generate in seq_len={cfg.seq_len}"
            )
        tokens = np.full((cfg.seq_len,), tokenizer.pad_id, np.int32)
        tokens[: len(prompt)] = prompt
        example.update(
            tokens=tokens,
            attn_mask=tokens != tokenizer.pad_id,
            loss_mask=np.zeros((cfg.seq_len,), np.float32),
            prompt_len=np.int32(len(prompt)),
            image_label=np.int32(record["image_label"]),
            audio_label=np.int32(record["audio_label"]),
            answer=_text(record["answer"]),
            task=_text(record["task"]),
            modality=_text(record["modality"]),
            id=record_id,
        )
        examples.append(example)
    return examples


def collate(examples: Sequence[dict[str, Any]], batch_size: int) -> list[dict[str, Any]]:
    """Batches of `examples` in the design batch format plus `valid` bool [B] and string lists.

    The last batch is padded with copies of its first example (valid=False), so every batch has the
    same shapes. `task` / `modality` become int32 indices; their names stay in `task_name` /
    `modality_name`, with `answer` and `id`, as lists of str ('' on padding rows).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        num_valid = len(chunk)
        chunk += [chunk[0]] * (batch_size - num_valid)
        batch: dict[str, Any] = {
            key: np.stack([ex[key] for ex in chunk]) for key in chunk[0] if key not in _STRING_KEYS
        }
        batch["task"] = np.asarray(
            [task_defs.TASK_NAMES.index(ex["task"]) for ex in chunk], np.int32
        )
        batch["modality"] = np.asarray(
            [task_defs.MODALITIES.index(ex["modality"]) for ex in chunk], np.int32
        )
        for key, name in (
            ("task", "task_name"),
            ("modality", "modality_name"),
            ("answer", "answer"),
            ("id", "id"),
        ):
            batch[name] = [ex[key] for ex in chunk[:num_valid]] + [""] * (batch_size - num_valid)
        batch["valid"] = np.arange(batch_size) < num_valid
        batches.append(batch)
    return batches
