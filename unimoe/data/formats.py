"""Readers for Uni-MoE's JSON training and evaluation files, and the media they point to.

A file is a JSON list of records (Uni-MoE's data format): `conversations` (alternating human / gpt turns,
human first), optional `image` (a path or, in MMBench, a list of paths), `video` (a list of frame
images, or one video file), `voice` (audio files, the k-th one for the k-th `<audio>` tag), and
evaluation fields (`question_id`, `text`, `category`, `gt`, `answer`, `capability`, ...) that are
kept as they are. Every problem is a `RecordError` naming the file, the record index, its id and
the field, so a caller can stop on it or skip the record and count it.

Two readings of the released files, chosen here (docs/design.md, "Real data"):
- images without an `<image>` tag (MMBench-1.1) get `<image>\\n` in front of the first question;
- `voice` files without any `<audio>` tag (the image + spoken question samples) are not spliced
  by the reference code either, so they are dropped (counted in `unused_voices`), not an error.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import zipfile
from collections.abc import Iterator
from typing import Any, BinaryIO

IMAGE_TAG, VIDEO_TAG, AUDIO_TAG = "<image>", "<video>", "<audio>"
ROLES = ("human", "gpt")
# Fields that carry media paths or the conversation; the rest of a record is evaluation metadata.
_MEDIA_FIELDS = ("image", "video", "voice")
_ID_FIELDS = ("id", "question_id")
VIDEO_FILE_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".gif")
_ZIP_LOCAL_HEADER_SIZE = 30  # bytes before the member's name and extra field (zip APPNOTE 4.3.7)


class RecordError(ValueError):
    """A bad record: `str()` names the file, record index, record id and field."""

    def __init__(self, file: str, index: int, record_id: str, field: str, message: str):
        self.file, self.index, self.record_id, self.field = file, index, record_id, field
        self.message = message
        super().__init__(f"{file}: record {index} (id {record_id!r}), field {field!r}: {message}")

    def __reduce__(self):
        # Pickled across grain worker processes; the default would pass only the message.
        return type(self), (self.file, self.index, self.record_id, self.field, self.message)


@dataclasses.dataclass(frozen=True)
class Record:
    """One validated record; media are paths as written in the file (resolve with `MediaStore`)."""

    file: str
    index: int
    id: str
    conversations: tuple[dict[str, str], ...]
    images: tuple[str, ...] = ()
    video: tuple[str, ...] = ()  # frame images, or a single video file
    voices: tuple[str, ...] = ()
    unused_voices: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def modality_type(self) -> int:
        """Uni-MoE's `group_by_modality_length` key: video 4 + voice 2 + image 1 (0: text only)."""
        return 4 * bool(self.video) + 2 * bool(self.voices) + bool(self.images)

    @property
    def is_video_file(self) -> bool:
        return len(self.video) == 1 and self.video[0].lower().endswith(VIDEO_FILE_SUFFIXES)

    def error(self, field: str, message: str) -> RecordError:
        return RecordError(self.file, self.index, self.id, field, message)


def _record_id(raw: Any, index: int) -> str:
    if isinstance(raw, dict):
        for key in _ID_FIELDS:
            if isinstance(raw.get(key), str | int):
                return str(raw[key])
    return f"#{index}"


def _paths(raw: dict[str, Any], field: str, fail) -> tuple[str, ...]:
    value = raw.get(field)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise fail(field, f"must be a path or a list of non-empty paths, got {value!r:.80}")
    return tuple(value)


def _conversations(raw: dict[str, Any], fail) -> list[dict[str, str]]:
    convs = raw.get("conversations")
    if convs is None and isinstance(raw.get("text"), str):
        # LLaVA-style eval files without a conversation: the question is `text`.
        convs = [{"from": "human", "value": raw["text"]}, {"from": "gpt", "value": ""}]
    if not isinstance(convs, list) or not convs:
        raise fail("conversations", f"must be a non-empty list, got {convs!r:.80}")
    out = []
    for i, turn in enumerate(convs):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise fail(field, f"must be {{'from': ..., 'value': str}}, got {turn!r:.80}")
        if turn.get("from") != ROLES[i % 2]:
            raise fail(f"{field}.from", f"must be {ROLES[i % 2]!r}, got {turn.get('from')!r}")
        out.append({"from": turn["from"], "value": turn["value"]})
    return out


def parse_record(raw: Any, index: int, file: str) -> Record:
    """Validates one raw JSON record (structure and tag/media agreement); raises RecordError."""
    record_id = _record_id(raw, index)

    def fail(field: str, message: str) -> RecordError:
        return RecordError(file, index, record_id, field, message)

    if not isinstance(raw, dict):
        raise fail("<record>", f"must be a JSON object, got {type(raw).__name__}")
    convs = _conversations(raw, fail)
    images, video, voices = (_paths(raw, f, fail) for f in _MEDIA_FIELDS)
    text = "".join(turn["value"] for turn in convs)
    n_image, n_video, n_audio = (text.count(t) for t in (IMAGE_TAG, VIDEO_TAG, AUDIO_TAG))
    if images and n_image == 0:
        convs[0] = {"from": "human", "value": f"{IMAGE_TAG}\n{convs[0]['value']}"}
        n_image = 1
    if n_image != (1 if images else 0):
        raise fail("image", f"{len(images)} image(s) but {n_image} {IMAGE_TAG} tag(s)")
    if n_video != (1 if video else 0):
        raise fail(
            "video", f"{len(video)} video frame/file path(s) but {n_video} {VIDEO_TAG} tag(s)"
        )
    unused_voices = 0
    if voices and n_audio == 0:
        unused_voices, voices = len(voices), ()
    if n_audio != len(voices):
        raise fail("voice", f"{len(voices)} voice file(s) but {n_audio} {AUDIO_TAG} tag(s)")
    extra = {k: v for k, v in raw.items() if k not in (*_MEDIA_FIELDS, "conversations", "id")}
    return Record(
        file=file,
        index=index,
        id=record_id,
        conversations=tuple(convs),
        # MMBench lists one image per question; one image slot per record, as the reference.
        images=images[:1],
        video=video,
        voices=voices,
        unused_voices=unused_voices,
        extra=extra,
    )


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid UTF-8 JSON ({e})") from e


def load_json_list(path: str | os.PathLike) -> list[Any]:
    """The raw records of a Uni-MoE JSON file; a file that is not a JSON list is a hard error."""
    path = os.fspath(path)
    data = _load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def iter_records(path: str | os.PathLike) -> Iterator[Record | RecordError]:
    """Each record of `path` in order, parsed, or the RecordError that says why it is bad."""
    file = os.fspath(path)
    for index, raw in enumerate(load_json_list(file)):
        try:
            yield parse_record(raw, index, file)
        except RecordError as e:
            yield e


def file_problem(name: str, path: str | os.PathLike | None) -> str | None:
    """What is wrong with a file a command line names as `name` (None: nothing, or not given)."""
    if path is None or os.path.isfile(path):
        return None
    what = "is a directory" if os.path.isdir(path) else "does not exist"
    return f"{name} {os.fspath(path)} {what}: give a file"


def media_root_problem(root: str | os.PathLike) -> str | None:
    """What is wrong with a media root (None: a folder or a readable zip archive)."""
    if not os.path.exists(root):
        return f"media root {os.fspath(root)} does not exist"
    if os.path.isfile(root) and not zipfile.is_zipfile(root):
        root = os.fspath(root)
        return f"media root {root} is a file but not a zip archive (corrupt or truncated?)"
    return None


class _StoredMember(io.RawIOBase):
    """An uncompressed zip member as a seekable stream of the archive's own bytes.

    Python 3.11's `ZipExtFile` seeks by reading forward in 16 MB blocks, and FFmpeg seeks to the
    end of every input to learn its size: each audio or video file would be read whole.
    """

    def __init__(self, archive: str, info: zipfile.ZipInfo):
        self._file = open(archive, "rb")
        self._file.seek(info.header_offset)
        local_header = self._file.read(_ZIP_LOCAL_HEADER_SIZE)
        name_len, extra_len = struct.unpack("<HH", local_header[26:30])
        self._start = info.header_offset + _ZIP_LOCAL_HEADER_SIZE + name_len + extra_len
        self._size, self._pos = info.file_size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self._size - self._pos))
        self._file.seek(self._start + self._pos)
        count = self._file.readinto(memoryview(buffer)[:count])
        self._pos += count
        return count

    def close(self) -> None:
        self._file.close()
        super().close()


class MediaStore:
    """Reads media files named by records, from a folder, a zip file, or as given (root None).

    Paths in the released files are absolute placeholders (`/coco_images/x.jpg`); under a root
    they are taken relative to it (leading '/' dropped), as the reference joins them with
    `--image_folder`.
    """

    def __init__(self, root: str | os.PathLike | None):
        self.root = None if root is None else os.fspath(root)
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1
        problem = None if self.root is None else media_root_problem(self.root)
        if problem:
            # A file that is not a zip would be read as a folder: every record "no such file".
            raise FileNotFoundError(problem)

    @property
    def is_zip(self) -> bool:
        return self.root is not None and zipfile.is_zipfile(self.root)

    def _zipfile(self) -> zipfile.ZipFile:
        # One handle per process: grain workers fork, and a shared handle's file offset races.
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip, self._zip_pid = zipfile.ZipFile(self.root), os.getpid()
        return self._zip

    def resolve(self, path: str) -> str:
        if self.root is None:
            return path
        if self.is_zip:
            return f"{self.root}:{path.lstrip('/')}"
        return os.path.join(self.root, path.lstrip("/"))

    def open(self, path: str) -> BinaryIO:
        """A binary stream of the file (a zip member is decompressed as it is read, never held
        whole); FileNotFoundError naming the resolved path if it is not there."""
        if self.is_zip:
            try:
                info = self._zipfile().getinfo(path.lstrip("/"))
            except KeyError:
                raise FileNotFoundError(f"{self.resolve(path)}: no such member") from None
            if info.compress_type == zipfile.ZIP_STORED:
                return io.BufferedReader(_StoredMember(self.root, info))
            return self._zipfile().open(info)
        resolved = self.resolve(path)
        if not os.path.isfile(resolved):
            raise FileNotFoundError(f"{resolved}: no such file")
        return open(resolved, "rb")

    def read(self, path: str) -> bytes:
        """The file's bytes; FileNotFoundError naming the resolved path if it is not there."""
        with self.open(path) as f:
            return f.read()

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "_zip": None, "_zip_pid": -1}
