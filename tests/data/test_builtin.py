import os
import time

import numpy as np
import pytest

from unimoe.data import builtin, media, tasks


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds_builtin")
    start = time.perf_counter()
    builder = builtin.prepare(data_dir, "test")
    print(f"built unimoe_builtin/test in {time.perf_counter() - start:.1f} s")
    return data_dir, builder


def test_split_sizes(built):
    _, builder = built
    cfg = builder.builder_config
    assert (cfg.train_per_task, cfg.eval_per_task) == (16, 8)
    assert builder.info.splits["train"].num_examples == 16 * len(tasks.TASKS)
    assert builder.info.splits["eval"].num_examples == 8 * len(tasks.INSTRUCTION_TASKS)


def test_records_are_stored_task_by_task(built):
    _, builder = built
    source = builder.as_data_source(split="train")
    for index in range(len(source)):
        record = source[index]
        task = tasks.TASK_NAMES[index // 16]
        assert record["task"].decode() == task
        assert record["id"].decode() == f"train-{task}-{index % 16:06d}"


def test_task_slices_select_exactly_those_tasks(built):
    _, builder = built
    cfg = builder.builder_config
    expression = builtin.task_slices(cfg, "eval", ["speech_qa", "text_qa"])
    # Eval holds the instruction tasks in TASKS order: text_qa first, speech_qa fourth.
    assert expression == "eval[0:8]+eval[24:32]"
    source = builder.as_data_source(split=expression)
    assert [source[i]["task"].decode() for i in range(len(source))] == ["text_qa"] * 8 + [
        "speech_qa"
    ] * 8
    with pytest.raises(ValueError, match="image_caption"):
        builtin.task_slices(cfg, "eval", ["image_caption"])


def test_stored_record_equals_regenerated_record(built):
    _, builder = built
    cfg = builder.builder_config
    source = builder.as_data_source(split="eval")
    task = "image_speech_qa"
    position = tasks.INSTRUCTION_TASKS.index(task) * 8 + 5
    stored = source[position]
    rng = np.random.default_rng(
        (cfg.seed, builtin.SPLITS.index("eval"), tasks.TASK_NAMES.index(task), 5)
    )
    expected = tasks.generate_example(
        task, 5, rng, media.SpeechSynthesizer(), cfg.example_config(), split="eval"
    )
    for key, value in expected.items():
        got = stored[key].decode() if isinstance(stored[key], bytes) else stored[key]
        np.testing.assert_array_equal(got, value, err_msg=key)


def test_absent_media_are_empty(built):
    _, builder = built
    record = builder.as_data_source(split="train")[0]  # text_qa
    assert record["image"].shape == (0, 32, 32, 3)
    assert record["video"].shape == (0, 32, 32, 3)
    assert record["audio"].shape == (0,)


def test_prepare_twice_reuses_the_data(built):
    data_dir, builder = built
    files = sorted(p for p in os.listdir(builder.data_dir))
    stamps = [os.stat(os.path.join(builder.data_dir, p)).st_mtime_ns for p in files]
    again = builtin.prepare(data_dir, "test")
    assert sorted(os.listdir(again.data_dir)) == files
    assert [os.stat(os.path.join(again.data_dir, p)).st_mtime_ns for p in files] == stamps


def test_unknown_config_raises(tmp_path):
    with pytest.raises(ValueError, match="config_name"):
        builtin.prepare(tmp_path, "huge")
