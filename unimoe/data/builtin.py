"""TFDS builder `unimoe_builtin`: the offline multimodal dataset of `unimoe.data.tasks`, as array_record.

Nothing is downloaded: every record is synthesized from a fixed seed, each from its own
`np.random.default_rng((seed, split, task, index))`, so a build is reproducible bit for bit.
Records are written in generation order (`disable_shuffling`): task by task in `TASK_NAMES` order,
so `task_slices` can select tasks by index range without reading any record.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from etils import epath

from unimoe.data import media, tasks
from unimoe.data.tokenizer import PretrainedTokenizer, TextTokenizer, Tokenizer

SPLITS: tuple[str, ...] = ("train", "eval")
# The built-in tokenizer, stored beside the built-in dataset in `config.data.data_dir`.
TOKENIZER_FILE = "unimoe_tokenizer.json"
# What `experiment_tokenizer` does when that file is missing.
ON_MISSING = ("train_and_save", "train", "error")


@dataclasses.dataclass(eq=False)
class BuiltinConfig(tfds.core.BuilderConfig):
    """Sizes of one build. Caption tasks have no eval records (they are alignment data)."""

    train_per_task: int = 16
    eval_per_task: int = 8
    image_size: int = 32
    num_frames: int = 4
    clip_samples: int = 3 * media.SAMPLE_RATE
    seed: int = 0

    def example_config(self) -> tasks.ExampleConfig:
        return tasks.ExampleConfig(
            image_size=self.image_size, num_frames=self.num_frames, clip_samples=self.clip_samples
        )

    def split_tasks(self, split: str) -> tuple[str, ...]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return tasks.TASK_NAMES if split == "train" else tasks.INSTRUCTION_TASKS

    def examples_per_task(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.train_per_task if split == "train" else self.eval_per_task


class UnimoeBuiltin(tfds.core.GeneratorBasedBuilder):
    """Synthetic image / video / speech / sound / text tasks in Uni-MoE's conversation format."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        BuiltinConfig(
            name="tiny",
            description="The demo: 600 train records per task, 60 eval per QA task.",
            train_per_task=600,
            eval_per_task=60,
            num_frames=8,
        ),
        BuiltinConfig(
            name="test",
            description="For tests: 16 train records per task, 8 eval per QA task.",
            train_per_task=16,
            eval_per_task=8,
        ),
    ]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup imports the `importlib_resources` backport, which is not installed.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg: BuiltinConfig = self.builder_config
        size = cfg.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "task": tfds.features.Text(),
                    "modality": tfds.features.Text(),
                    "conversations": tfds.features.Text(),
                    "answer": tfds.features.Text(),
                    # Variable first dims: absent media are zero-length and cost nothing.
                    "image": tfds.features.Tensor(shape=(None, size, size, 3), dtype=np.uint8),
                    "video": tfds.features.Tensor(shape=(None, size, size, 3), dtype=np.uint8),
                    "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16),
                    "image_label": tfds.features.Scalar(dtype=np.int32),
                    "audio_label": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is synthesized
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        cfg: BuiltinConfig = self.builder_config
        split_tasks = cfg.split_tasks(split)
        per_task = cfg.examples_per_task(split)
        example_cfg = cfg.example_config()
        synth = media.SpeechSynthesizer()
        progress = tqdm.tqdm(
            total=len(split_tasks) * per_task,
            desc=f"unimoe_builtin/{cfg.name} {split}",
            unit="ex",
            leave=False,
        )
        key = 0
        for task in split_tasks:
            task_index = tasks.TASK_NAMES.index(task)
            for index in range(per_task):
                rng = np.random.default_rng((cfg.seed, SPLITS.index(split), task_index, index))
                yield key, tasks.generate_example(task, index, rng, synth, example_cfg, split=split)
                key += 1
                progress.update()
        progress.close()


def task_slices(cfg: BuiltinConfig, split: str, selected_tasks: list[str] | tuple[str, ...]) -> str:
    """TFDS split expression selecting the records of `selected_tasks`, e.g. 'train[16:32]+train[48:64]'."""
    split_tasks = cfg.split_tasks(split)
    per_task = cfg.examples_per_task(split)
    missing = [t for t in selected_tasks if t not in split_tasks]
    if missing or not selected_tasks:
        raise ValueError(
            f"tasks {list(selected_tasks)} must be a non-empty subset of the {split!r} "
            f"tasks {split_tasks}; not there: {missing}"
        )
    parts = []
    for task in sorted(set(selected_tasks), key=split_tasks.index):
        start = split_tasks.index(task) * per_task
        parts.append(f"{split}[{start}:{start + per_task}]")
    return "+".join(parts)


def prepare(data_dir: str | os.PathLike, config_name: str) -> UnimoeBuiltin:
    """The builder of `config_name` in `data_dir`, generated first if it is not there yet."""
    names = [c.name for c in UnimoeBuiltin.BUILDER_CONFIGS]
    if config_name not in names:
        raise ValueError(f"config_name must be one of {names}, got {config_name!r}")
    builder = UnimoeBuiltin(
        config=config_name, data_dir=os.fspath(data_dir), file_format="array_record"
    )
    builder.download_and_prepare()  # a no-op when the data is already there
    return builder


def load_or_train_tokenizer(path: str | os.PathLike, vocab_size: int = 600) -> Tokenizer:
    """The built-in tokenizer cached at `path`, or trained on the built-in corpus and cached."""
    if os.path.exists(path):
        return Tokenizer.from_file(path)
    tokenizer = Tokenizer.train(tasks.tokenizer_corpus(), vocab_size)
    tokenizer.save(path)
    return tokenizer


def experiment_tokenizer(
    pretrained: str | None, data_dir: str | os.PathLike, *, on_missing: str
) -> TextTokenizer:
    """The one place that picks an experiment's tokenizer.

    `pretrained` (`config.tokenizer`, a pretrained LM's tokenizer file) when set; else the built-in
    tokenizer in `data_dir`. When that file is missing, `on_missing` says what to do:
    'train_and_save' (a training run), 'train' in memory (a dry run writes nothing) or 'error'
    (evaluation never trains the tokenizer its checkpoint was trained with).
    """
    if on_missing not in ON_MISSING:
        raise ValueError(f"on_missing must be one of {ON_MISSING}, got {on_missing!r}")
    if pretrained:
        return PretrainedTokenizer(pretrained)
    path = pathlib.Path(data_dir) / TOKENIZER_FILE
    if path.is_file():
        return Tokenizer.from_file(path)
    if on_missing == "error":
        raise FileNotFoundError(
            f"{path}: the built-in tokenizer is missing; run the experiment (or set "
            "config.tokenizer to the pretrained tokenizer the stages trained with)"
        )
    if on_missing == "train_and_save":
        return load_or_train_tokenizer(path)
    return Tokenizer.train(tasks.tokenizer_corpus())
