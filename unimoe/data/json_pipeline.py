"""grain pipelines over `unimoe_json` datasets: Uni-MoE records -> model batches, bad input handled.

Per source dataset (one prepared JSON file): this host's shard of the records -> an infinite
deterministic order (shuffled each epoch; with `group_by_modality`, Uni-MoE's sampler over all
hosts' records: grouped by modality type, sorted by length within windows, cut into global
batches, the last one per type completed by wrap-around, batches shuffled; each host reads its
rows of every global batch) ->
`ExampleBuilder` (validation, media decoding, CLIP / Whisper preprocessing, tokenization) ->
bad records raised or skipped and counted (`on_error`) -> batches. Sources are mixed batch by
batch with `weights`, so a batch never mixes sources or (grouped) modality types. `seq_buckets`
trims each batch's token arrays to the smallest bucket holding its longest row. Every stage is a
grain dataset, so `iter(...).get_state()` / `set_state()` (and the project's checkpointer)
restore the exact position, with `worker_count` processes preprocessing ahead.

Batch keys (docs/design.md, "Real data"): the design batch format, except that audio is
`audio_mel` float32 [B, C, A, M] with `audio_chunk_mask` bool [B, C] (C chunks of A frames: every
chunk of every voice file of the row, in order; each `<audio>` tag expands to n_audio_tokens per
chunk of its file), plus `modality_type` int32 [B] and `num_skipped` int32 [B] (bad records
skipped just before each row; their sum over batches is the skip count). The voice files of the
sources named in `sound_sources` go to the sound tower (BEATs) instead: `sound_fbank`,
`sound_frame_mask`, `sound_chunk_mask`, `has_sound` (`unimoe.data.sound`; present only when
`sound_sources` is set), each `<audio>` tag expanding to n_sound_tokens per chunk of its file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

import grain
import numpy as np

from unimoe.data import formats, grouping, json_builder, preprocess, shapes, sound, vicuna
from unimoe.data.conversation import SequenceTooLongError
from unimoe.data.tasks import MODALITIES
from unimoe.data.tokenizer import PretrainedTokenizer

ON_ERROR = ("raise", "skip")
_ERROR_KEY = "_error"
# Modality type (video 4 + voice 2 + image 1) -> index into tasks.MODALITIES. A `voice` file may be
# speech or sound; it counts as speech (the reference's speech model reads both with Whisper),
# except in a `sound_sources` source: voice-only records are "audio" (`ExampleBuilder.modality`).
_MODALITY_OF_TYPE = {
    0: "text",
    1: "image",
    2: "speech",
    3: "image_speech",
    4: "video",
    5: "video",
    6: "video",
    7: "video",
}
# Records sorted by length together, per modality group (Uni-MoE's megabatch = batch * this).
_LENGTH_WINDOW_BATCHES = 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class JsonDataConfig(shapes.BatchShapes):
    """What the real-data pipeline reads and its policies; its shapes are `BatchShapes` (defaults:
    the reference's preprocessing). An experiment's `config.json_data` is this without sources:
    each stage adds its own (`json_sources`), its batch size and seed."""

    data_dir: str
    media_root: str | None  # folder or zip the records' media paths are relative to
    sources: tuple[str, ...] = ()  # `unimoe_json` config names, prepared in data_dir
    weights: tuple[float, ...] = ()  # per source, fraction of batches; () = equal
    image_aspect: str = "square"
    max_audio_chunks: int = 4  # per record, over all its voice files
    # Samples skipped between Whisper chunks: 1 = Uni-MoE's 480001-sample steps
    # (`preprocess.chunked_log_mel`); 0 = consecutive chunks.
    audio_chunk_gap: int = 0
    # Sources whose voice files go to the sound tower (BEATs features, `unimoe.data.sound`), not
    # to Whisper; with the BEATs chunk (480000 samples = 30 s), mel bins and chunks per record
    # over all its voice files (the reference cuts each file at 20).
    sound_sources: tuple[str, ...] = ()
    sound_chunk_samples: int = 480000
    sound_mel_bins: int = 128
    max_sound_chunks: int = 20
    on_error: str = "raise"
    group_by_modality: bool = False
    seq_buckets: tuple[int, ...] = ()
    seed: int = 0
    worker_count: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.max_audio_chunks < 1:
            raise ValueError(f"max_audio_chunks={self.max_audio_chunks} must be >= 1")
        if self.audio_chunk_gap < 0:
            raise ValueError(f"audio_chunk_gap={self.audio_chunk_gap} must be >= 0")
        sound.check_fields(self)
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.image_aspect not in preprocess.IMAGE_ASPECTS:
            raise ValueError(
                f"image_aspect must be one of {preprocess.IMAGE_ASPECTS}, got {self.image_aspect!r}"
            )
        if self.weights and len(self.weights) != len(self.sources):
            raise ValueError(f"{len(self.weights)} weights for {len(self.sources)} sources")
        if any(b > self.seq_len for b in self.seq_buckets):
            raise ValueError(f"seq_buckets {self.seq_buckets} exceed seq_len={self.seq_len}")


class ExampleBuilder:
    """One raw record -> one unbatched example; any bad input raises `formats.RecordError`."""

    def __init__(
        self,
        cfg: JsonDataConfig,
        tokenizer: PretrainedTokenizer | None,
        read_media: bool = True,
        *,
        source: str | None = None,
    ):
        """Without a tokenizer, records are validated (and media decoded) but not tokenized.
        `source` is the records' source: its voice files go to BEATs if `cfg.sound_sources`
        names it."""
        self.cfg, self.tokenizer, self.read_media = cfg, tokenizer, read_media
        self.store = formats.MediaStore(cfg.media_root) if read_media else None
        self.sound = source is not None and source in cfg.sound_sources

    def parse(self, raw_json: str, index: int, file: str) -> formats.Record:
        try:
            raw = json.loads(raw_json)
        except json.JSONDecodeError as e:
            raise formats.RecordError(file, index, f"#{index}", "<record>", f"bad JSON ({e})")
        return formats.parse_record(raw, index, file)

    @contextlib.contextmanager
    def _reading(self, record: formats.Record, field: str, path: str) -> Iterator[BinaryIO]:
        """`path`'s stream; a missing or undecodable file is the record's error in `field`."""
        try:
            with self.store.open(path) as stream:
                yield stream
        except (OSError, zipfile.BadZipFile, preprocess.MediaError) as e:  # BadZipFile: bad CRC
            raise record.error(field, str(e)) from None

    def _image(self, record: formats.Record, path: str, field: str) -> np.ndarray:
        with self._reading(record, field, path) as stream:
            pixels = preprocess.decode_image(stream.read(), self.store.resolve(path))
        return preprocess.clip_transform(pixels, self.cfg.image_size, self.cfg.image_aspect)

    def _video(self, record: formats.Record) -> np.ndarray:
        cfg = self.cfg
        if record.is_video_file:
            path = record.video[0]
            with self._reading(record, "video", path) as stream:
                frames = preprocess.decode_video(stream, self.store.resolve(path), cfg.num_frames)
            return np.stack(
                [preprocess.clip_transform(f, cfg.image_size, cfg.image_aspect) for f in frames]
            )
        picked = preprocess.sample_frame_indices(len(record.video), cfg.num_frames)
        return np.stack([self._image(record, record.video[i], f"video[{i}]") for i in picked])

    def _voices(
        self, record: formats.Record, chunk_samples: int, limit: str, size: int, unit: str
    ) -> tuple[list[np.ndarray], list[int]]:
        """Each voice file's waveform and chunk count (a chunk every `chunk_samples`); more chunks
        in all than `cfg.<limit>` is an error (the reference cuts each file at 20 chunks without
        a word). A file longer than
        the chunks left is refused without decoding it whole (`preprocess.decode_audio`).
        Messages give a chunk's `size` in `unit`s (3000 'frame's)."""
        most, waves, counts = getattr(self.cfg, limit), [], []
        for k, path in enumerate(record.voices):
            field, left = f"voice[{k}]", max(0, most - sum(counts))
            with self._reading(record, field, path) as stream:
                try:
                    wave = preprocess.decode_audio(
                        stream, self.store.resolve(path), max_samples=left * chunk_samples
                    )
                except preprocess.AudioTooLongError as e:
                    raise record.error(
                        field,
                        f"{e} by {limit}={most} ({size}-{unit} chunks, {left} left for this file)",
                    ) from None
            waves.append(wave)
            counts.append(preprocess.num_chunks(len(wave), chunk_samples))
        if sum(counts) > most:
            raise record.error(
                "voice", f"{sum(counts)} audio chunks of {size} {unit}s, more than {limit}={most}"
            )
        return waves, counts

    def _audio(self, record: formats.Record) -> list[np.ndarray]:
        """Whisper log-mel chunks [c_k, A, M] of each voice file."""
        cfg = self.cfg
        step = cfg.audio_frames * preprocess.WHISPER_HOP + cfg.audio_chunk_gap
        waves, counts = self._voices(record, step, "max_audio_chunks", cfg.audio_frames, "frame")
        return [
            preprocess.chunked_log_mel(
                w, cfg.num_mel_bins, cfg.audio_frames, c, gap=cfg.audio_chunk_gap
            )
            for w, c in zip(waves, counts, strict=True)
        ]

    def _sound(self, record: formats.Record) -> list[tuple[np.ndarray, np.ndarray]]:
        """BEATs features and padding masks ([c_k, F, M], [c_k, F]) of each voice file."""
        cfg = self.cfg
        size = cfg.sound_chunk_samples
        waves, counts = self._voices(record, size, "max_sound_chunks", size, "sample")
        return [sound.features(w, cfg, c) for w, c in zip(waves, counts, strict=True)]

    def media(self, record: formats.Record) -> tuple[dict[str, np.ndarray], list[int]]:
        """The media slots of one record (zeros where absent, decoded when `read_media`) and the
        number of audio chunks of each of its voice files."""
        cfg = self.cfg
        size, chunk_shape = cfg.image_size, (cfg.audio_frames, cfg.num_mel_bins)
        example = {
            "image": np.zeros((size, size, 3), np.float32),
            "video": np.zeros((cfg.num_frames, size, size, 3), np.float32),
            "audio_mel": np.zeros((cfg.max_audio_chunks, *chunk_shape), np.float32),
            "audio_chunk_mask": np.zeros((cfg.max_audio_chunks,), bool),
            "has_image": np.bool_(bool(record.images)),
            "has_video": np.bool_(bool(record.video)),
            "has_audio": np.bool_(bool(record.voices) and not self.sound),
        }
        if cfg.sound_sources:  # every source's rows then carry the slots: batches stack
            example.update(sound.empty_slots(cfg))
            example["has_sound"] = np.bool_(bool(record.voices) and self.sound)
        chunks_per_file = [1] * len(record.voices)  # --no-media: one chunk per file assumed
        if self.read_media:
            if record.images:
                example["image"] = self._image(record, record.images[0], "image")
            if record.video:
                example["video"] = self._video(record)
            if record.voices:
                chunks_per_file = self._put_voices(record, example)
        return example, chunks_per_file

    def _put_voices(self, record: formats.Record, example: dict[str, np.ndarray]) -> list[int]:
        """Fills the Whisper or (for a sound source) the BEATs slots; chunks per voice file."""
        if self.sound:
            per_file = self._sound(record)
            sound.fill(example, per_file)
            return [len(features) for features, _ in per_file]
        per_file = self._audio(record)
        mels = np.concatenate(per_file)
        example["audio_mel"][: len(mels)] = mels
        example["audio_chunk_mask"][: len(mels)] = True
        return [len(m) for m in per_file]

    def audio_tokens(self, chunks_per_file: list[int]) -> list[int]:
        """Placeholders of each `<audio>` tag: its tower's tokens per chunk x its file's chunks."""
        per_chunk = self.cfg.n_sound_tokens if self.sound else self.cfg.n_audio_tokens
        return [per_chunk * c for c in chunks_per_file]

    def modality(self, record: formats.Record) -> str:
        """The record's `tasks.MODALITIES` name: a sound source's voice-only records are audio."""
        if self.sound and record.modality_type == 2:
            return "audio"
        return _MODALITY_OF_TYPE[record.modality_type]

    def __call__(self, raw_json: str, index: int, file: str) -> dict[str, np.ndarray]:
        cfg = self.cfg
        record = self.parse(raw_json, index, file)
        if len(record.conversations) % 2:
            raise record.error("conversations", "must end with a gpt turn for training")
        example, chunks_per_file = self.media(record)
        if self.tokenizer is None:
            return example
        try:
            tokens, loss_mask = vicuna.build_example(
                record.conversations,
                self.tokenizer,
                n_image_tokens=cfg.n_image_tokens,
                n_video_tokens=cfg.n_video_tokens,
                audio_tokens=self.audio_tokens(chunks_per_file),
                seq_len=cfg.seq_len,
            )
        except (SequenceTooLongError, vicuna.TemplateMismatchError) as e:
            raise record.error("conversations", str(e)) from None
        # Right padding: real positions run up to the last non-pad token.
        length = int(np.flatnonzero(tokens != self.tokenizer.pad_id)[-1]) + 1
        example.update(
            tokens=tokens,
            loss_mask=loss_mask,
            attn_mask=np.arange(cfg.seq_len) < length,
            modality_type=np.int32(record.modality_type),
            modality=np.int32(MODALITIES.index(self.modality(record))),
        )
        return example


def _epoch_order(
    keys: np.ndarray,
    lengths: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    grouped: bool,
    shard_index: int = 0,
    shard_count: int = 1,
) -> np.ndarray:
    """One epoch's order of the records `keys` / `lengths` describe.

    Ungrouped: a permutation (the records are this shard's). Grouped (Uni-MoE's
    `group_by_modality_length`, `grouping.modality_batches`): the records are all shards', cut
    into global batches of `batch_size` of one modality type, longest first within windows of
    `_LENGTH_WINDOW_BATCHES` batches, each type's last batch completed by wrapping around; this
    shard's rows of every global batch, in batch order.
    """
    if not grouped:
        return rng.permutation(len(keys))
    batches = grouping.modality_batches(
        keys, batch_size, rng, lengths=lengths, length_window=_LENGTH_WINDOW_BATCHES
    )
    return grouping.shard_rows(batches, shard_index, shard_count)


class _EpochOrderDataset(grain.MapDataset):
    """Infinite random-access view of `parent`: element i is epoch i // n's order at i % n."""

    def __init__(self, parent: grain.MapDataset, keys, lengths, seed: int, **order_args: Any):
        super().__init__(parent)
        self._keys, self._lengths = np.asarray(keys), np.asarray(lengths)
        self._seed, self._order_args = seed, order_args
        self._epoch_len = len(self._order(np.random.default_rng(0)))
        self._cached: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

    def _order(self, rng: np.random.Generator) -> np.ndarray:
        return _epoch_order(self._keys, self._lengths, rng=rng, **self._order_args)

    def __len__(self) -> int:
        return np.iinfo(np.int64).max // 2

    def __str__(self) -> str:
        return f"EpochOrder(grouped={self._order_args['grouped']})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(index, self._epoch_len)
        if self._cached[0] != epoch:
            rng = np.random.default_rng((self._seed, epoch))
            self._cached = (epoch, self._order(rng))
        return self._parent[int(self._cached[1][position])]


class _BuildExample(grain.transforms.Map):
    """Raw record -> example, or {_ERROR_KEY: message} (never raises, so workers keep going)."""

    def __init__(self, builder: ExampleBuilder, file: str):
        self.builder, self.file = builder, file

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        raw = element["raw"]
        raw = raw.decode() if isinstance(raw, bytes) else str(raw)
        try:
            return self.builder(raw, int(element["index"]), self.file)
        except formats.RecordError as e:
            return {_ERROR_KEY: json.dumps([e.file, e.index, e.record_id, e.field, e.message])}


class _SkipBadIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, on_error: str, patience: int):
        super().__init__(parent)
        self._on_error, self._patience = on_error, patience

    def __next__(self) -> dict[str, Any]:
        skipped = 0
        while True:
            element = next(self._parent)
            if _ERROR_KEY not in element:
                return {**element, "num_skipped": np.int32(skipped)}
            error = formats.RecordError(*json.loads(element[_ERROR_KEY]))
            if self._on_error == "raise":
                raise error
            skipped += 1
            logging.warning("skipping bad record: %s", error)
            if skipped > self._patience:
                raise ValueError(f"{skipped} bad records in a row; the last: {error}")

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class _SkipBadDataset(grain.IterDataset):
    """Raises on bad records ('raise') or drops them, counting each in the next row's num_skipped."""

    def __init__(self, parent: grain.IterDataset, on_error: str, patience: int):
        super().__init__(parent)
        self._on_error, self._patience = on_error, patience

    def __iter__(self) -> _SkipBadIterator:
        return _SkipBadIterator(self._parent.__iter__(), self._on_error, self._patience)

    def __str__(self) -> str:
        return f"SkipBad(on_error={self._on_error})"


def _trim_to_bucket(batch: dict[str, np.ndarray], buckets: Sequence[int]) -> dict[str, np.ndarray]:
    longest = int(batch["attn_mask"].sum(axis=1).max())
    target = min((b for b in buckets if b >= longest), default=batch["tokens"].shape[1])
    return {
        k: v[:, :target] if k in ("tokens", "loss_mask", "attn_mask") else v
        for k, v in batch.items()
    }


def _source_batches(
    cfg: JsonDataConfig,
    tokenizer: PretrainedTokenizer,
    name: str,
    source_seed: int,
    shard_index: int,
    shard_count: int,
) -> grain.IterDataset:
    builder = json_builder.builder(cfg.data_dir, name)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"unimoe_json/{name} is not built in {cfg.data_dir}; run json_builder.prepare first"
        )
    source = builder.as_data_source(split=json_builder.SPLIT)
    per_shard = cfg.batch_size // shard_count
    if cfg.group_by_modality:
        # Every shard cuts the same global batches from all records and reads its own rows, so
        # a global batch is one modality type across hosts.
        records = grain.MapDataset.source(source)
        order_args = dict(
            batch_size=cfg.batch_size, shard_index=shard_index, shard_count=shard_count
        )
    else:
        records = grain.MapDataset.source(source)[shard_index::shard_count]
        order_args = dict(batch_size=per_shard)
    # Sampling keys only: reads each record's text, no media.
    keys = np.array([records[i]["modality_type"] for i in range(len(records))])
    lengths = np.array([records[i]["text_len"] for i in range(len(records))])
    ordered = _EpochOrderDataset(
        records, keys, lengths, source_seed, grouped=cfg.group_by_modality, **order_args
    )
    example_builder = ExampleBuilder(cfg, tokenizer, source=name)
    examples = ordered.map(_BuildExample(example_builder, f"unimoe_json/{name}"))
    read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2 * per_shard)
    # A whole epoch of bad records in a row means nothing usable is left.
    kept = _SkipBadDataset(examples.to_iter_dataset(read), cfg.on_error, patience=len(records))
    return kept.batch(per_shard, drop_remainder=True)


def make_dataset(
    cfg: JsonDataConfig,
    tokenizer: PretrainedTokenizer,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    """Infinite batches of this host's shard; `iter()` it, and checkpoint the iterator."""
    if not cfg.sources:
        raise ValueError("sources must name at least one prepared unimoe_json dataset")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    if cfg.batch_size % shard_count:
        raise ValueError(
            f"batch_size={cfg.batch_size} is not divisible by shard_count={shard_count}"
        )
    per_source = [
        _source_batches(cfg, tokenizer, name, cfg.seed * 1000 + i, shard_index, shard_count)
        for i, name in enumerate(cfg.sources)
    ]
    weights = list(cfg.weights) or [1.0] * len(per_source)
    batches = per_source[0] if len(per_source) == 1 else grain.IterDataset.mix(per_source, weights)
    if cfg.seq_buckets:
        buckets = sorted(cfg.seq_buckets)
        batches = batches.map(functools.partial(_trim_to_bucket, buckets=buckets))
    if cfg.worker_count:
        # Workers already run one per core; OpenBLAS's own threads (one per core in every worker)
        # only contend with them: the log-mel projection runs 4x slower on 2 cores. Spawned
        # workers read this when they load numpy (the parent's BLAS is already set up).
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    return batches
