"""TFDS builder `unimoe_json`: a Uni-MoE JSON file, given in `manual_dir`, as an array_record dataset.

Each record is stored as it is written (its JSON text) with its position, plus two keys the
samplers need without decoding media: Uni-MoE's modality type (video 4 + voice 2 + image 1) and
the conversation length in characters (for length bucketing). Validation, media decoding and
tokenization happen when the pipeline reads a record, so a bad record is handled there, by
`data.on_error`, with every other kind of bad input; a record that does not parse is stored with
type and length -1. Media stay in the media root (a folder or a zip), read at training time as
the reference does.

    builder = json_builder.prepare(data_dir, "speech", manual_dir, "train.json")
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from unimoe.data import formats

SPLIT = "train"


@dataclasses.dataclass(eq=False)
class JsonConfig(tfds.core.BuilderConfig):
    """`name` identifies the dataset in `data_dir`; `json_file` is relative to `manual_dir`."""

    json_file: str = "data.json"


class UnimoeJson(tfds.core.GeneratorBasedBuilder):
    """Records of a Uni-MoE JSON training file (conversations + media paths)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the JSON file (and its media root) in manual_dir."
    BUILDER_CONFIGS = [JsonConfig(name="default")]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup imports the `importlib_resources` backport, which is not installed.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "raw": tfds.features.Text(),
                    "index": tfds.features.Scalar(dtype=np.int64),
                    "modality_type": tfds.features.Scalar(dtype=np.int32),
                    "text_len": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        cfg: JsonConfig = self.builder_config
        return {SPLIT: self._generate_examples(dl_manager.manual_dir / cfg.json_file)}

    def _generate_examples(self, path: epath.Path):
        file = os.fspath(path)
        for index, raw in enumerate(formats.load_json_list(file)):
            try:
                record = formats.parse_record(raw, index, file)
                modality_type = record.modality_type
                text_len = sum(len(turn["value"]) for turn in record.conversations)
            except formats.RecordError:
                modality_type = text_len = -1
            yield (
                index,
                {
                    "raw": json.dumps(raw),
                    "index": index,
                    "modality_type": modality_type,
                    "text_len": text_len,
                },
            )


def builder(data_dir: str | os.PathLike, name: str, json_file: str = "data.json") -> UnimoeJson:
    return UnimoeJson(
        config=JsonConfig(name=name, json_file=json_file),
        data_dir=os.fspath(data_dir),
        file_format="array_record",
    )


def prepare(
    data_dir: str | os.PathLike, name: str, manual_dir: str | os.PathLike, json_file: str
) -> UnimoeJson:
    """Builds `unimoe_json/<name>` from `manual_dir/json_file` unless it is already there."""
    out = builder(data_dir, name, json_file)
    out.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    )
    return out
