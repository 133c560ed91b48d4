import dataclasses
import time

import grain.python as grain
import numpy as np
import pytest

from unimoe import config as config_lib
from unimoe.data import builtin, conversation, json_pipeline, media, pipeline, shapes, tasks

BATCH_KEYS = {
    "tokens": (np.int32, (6, 131)),
    "loss_mask": (np.float32, (6, 131)),
    "attn_mask": (np.bool_, (6, 131)),
    "image": (np.float32, (6, 32, 32, 3)),
    "has_image": (np.bool_, (6,)),
    "video": (np.float32, (6, 3, 32, 32, 3)),
    "has_video": (np.bool_, (6,)),
    "audio_mel": (np.float32, (6, 29, 7)),
    "has_audio": (np.bool_, (6,)),
    "image_label": (np.int32, (6,)),
    "audio_label": (np.int32, (6,)),
    "modality": (np.int32, (6,)),
    "task": (np.int32, (6,)),
}
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds_pipeline")
    start = time.perf_counter()
    builtin.prepare(data_dir, "test")
    print(f"built unimoe_builtin/test in {time.perf_counter() - start:.1f} s")
    return str(data_dir)


@pytest.fixture(scope="module")
def tok(data_dir):
    return builtin.load_or_train_tokenizer(f"{data_dir}/tokenizer.json")


@pytest.fixture()
def cfg(data_dir):
    # Odd sizes everywhere; 3 of the 4 stored frames; 29 mel frames of 7 bins.
    return pipeline.DataConfig(
        data_dir=data_dir,
        builder_config="test",
        seq_len=131,
        batch_size=6,
        image_size=32,
        num_frames=3,
        audio_frames=29,
        num_mel_bins=7,
        n_image_tokens=5,
        n_video_tokens=3,
        n_audio_tokens=7,
        seed=1,
    )


def _check_format(batch):
    assert set(batch) == set(BATCH_KEYS)
    for key, (dtype, shape) in BATCH_KEYS.items():
        assert batch[key].dtype == dtype and batch[key].shape == shape, key


def test_chat_batches_have_the_documented_format(cfg, tok):
    loader = pipeline.make_train_loader(cfg, tok, list(tasks.TASKS), "chat", seed=0)
    iterator = iter(loader)
    for _ in range(3):
        batch = next(iterator)
        _check_format(batch)
        tokens, loss_mask = batch["tokens"], batch["loss_mask"]
        np.testing.assert_array_equal(batch["attn_mask"], tokens != 0)
        assert np.all(tokens[:, 0] == tok.bos_id)
        is_media = np.isin(tokens, [tok.image_id, tok.video_id, tok.audio_id])
        assert is_media.any() and not loss_mask[is_media].any()
        assert not loss_mask[~batch["attn_mask"]].any()
        for row in range(6):
            task = tasks.TASK_NAMES[batch["task"][row]]
            assert tasks.MODALITIES[batch["modality"][row]] == tasks.TASKS[task]
            for key, token_id, n in (("has_image", 3, 5), ("has_video", 4, 3), ("has_audio", 5, 7)):
                assert (tokens[row] == token_id).sum() == (n if batch[key][row] else 0)
            # Answers plus one </s> are supervised.
            supervised = tokens[row][loss_mask[row] == 1]
            assert supervised[-1] == tok.eos_id and (supervised == tok.eos_id).sum() == 1
            for key, has_key in (
                ("image", "has_image"),
                ("video", "has_video"),
                ("audio_mel", "has_audio"),
            ):
                assert (
                    batch[key][row].std() > 0 if batch[has_key][row] else not batch[key][row].any()
                ), key


def test_eval_examples_media_and_prompts(cfg, tok, data_dir):
    examples = pipeline.load_eval_examples(cfg, tok, ["video_qa", "image_speech_qa"])
    assert len(examples) == 16
    source = builtin.prepare(data_dir, "test").as_data_source(split="eval")
    stored = {source[i]["id"].decode(): source[i] for i in range(len(source))}
    for ex in examples:
        record = stored[ex["id"]]
        assert ex["answer"] == record["answer"].decode() and ex["task"] in (
            "video_qa",
            "image_speech_qa",
        )
        prompt = ex["tokens"][: ex["prompt_len"]]
        assert tok.decode(prompt).endswith(" ASSISTANT:")
        assert (
            not ex["tokens"][ex["prompt_len"] :].any() and ex["attn_mask"].sum() == ex["prompt_len"]
        )
        if ex["task"] == "video_qa":
            # Frames 0, 2, 3 of 4 (evenly spaced, ends kept), CLIP-normalised.
            expected = (record["video"][[0, 2, 3]] / 255.0 - CLIP_MEAN) / CLIP_STD
            np.testing.assert_allclose(ex["video"], expected, atol=1e-5)
            assert ex["has_video"] and not ex["has_image"] and not ex["image"].any()
        else:
            np.testing.assert_allclose(
                ex["image"], (record["image"][0] / 255.0 - CLIP_MEAN) / CLIP_STD, atol=1e-5
            )
            wave = record["audio"].astype(np.float32) / 32767.0
            np.testing.assert_allclose(ex["audio_mel"], media.log_mel(wave, 7, 29), atol=1e-6)
            assert ex["audio_label"] >= 0 and ex["image_label"] >= 0


def test_collate_pads_the_last_batch(cfg, tok):
    examples = pipeline.load_eval_examples(cfg, tok, ["text_qa"])
    batches = pipeline.collate(examples, 5)
    assert len(batches) == 2
    last = batches[-1]
    np.testing.assert_array_equal(last["valid"], [True, True, True, False, False])
    assert last["answer"][:3] == [ex["answer"] for ex in examples[5:]] and last["answer"][3:] == [
        "",
        "",
    ]
    assert last["tokens"].shape == (5, 131) and last["prompt_len"].dtype == np.int32
    np.testing.assert_array_equal(last["task"], tasks.TASK_NAMES.index("text_qa"))
    assert last["task_name"][:3] == ["text_qa"] * 3


def test_lm_text_supervises_all_text(cfg, tok):
    batch = next(
        iter(pipeline.make_train_loader(cfg, tok, ["image_qa", "audio_caption"], "lm_text", seed=0))
    )
    _check_format(batch)
    np.testing.assert_array_equal(batch["loss_mask"][:, 1:], batch["attn_mask"][:, 1:])
    assert not batch["loss_mask"][:, 0].any()
    assert not np.isin(batch["tokens"], [3, 4, 5]).any()
    assert not (batch["has_image"] | batch["has_video"] | batch["has_audio"]).any()
    assert not batch["image"].any() and not batch["audio_mel"].any()


@pytest.mark.parametrize(
    "mode, label_key, label_tasks",
    [
        ("classify_image", "image_label", tasks.IMAGE_LABEL_TASKS),
        ("classify_audio", "audio_label", tasks.AUDIO_LABEL_TASKS),
    ],
)
def test_classify_modes_read_only_labelled_records(cfg, tok, mode, label_key, label_tasks):
    iterator = iter(pipeline.make_train_loader(cfg, tok, list(tasks.TASKS), mode, seed=0))
    seen = set()
    for _ in range(4):
        batch = next(iterator)
        _check_format(batch)
        assert (batch[label_key] >= 0).all()
        assert not batch["attn_mask"].any() and not batch["loss_mask"].any()
        # Only the classified medium is fed, also for image_speech_qa records (image and audio).
        medium = "has_image" if mode == "classify_image" else "has_audio"
        assert batch[medium].all()
        assert not batch["has_video"].any()
        assert not batch["has_audio" if mode == "classify_image" else "has_image"].any()
        seen |= {tasks.TASK_NAMES[i] for i in batch["task"]}
    assert seen <= set(label_tasks) and len(seen) > 1


def test_task_selection(cfg, tok):
    iterator = iter(pipeline.make_train_loader(cfg, tok, ["speech_qa"], "chat", seed=0))
    for _ in range(3):
        assert (next(iterator)["task"] == tasks.TASK_NAMES.index("speech_qa")).all()


def test_restored_iterator_yields_the_same_next_batch(cfg, tok, tmp_path):
    loader = pipeline.make_train_loader(
        cfg, tok, ["image_qa", "speech_qa", "text_qa"], "chat", seed=5
    )
    iterator = iter(loader)
    for _ in range(4):
        next(iterator)
    (tmp_path / "data").mkdir()
    grain.PyGrainCheckpointHandler().save(
        tmp_path / "data", args=grain.PyGrainCheckpointSave(iterator)
    )
    expected = [
        next(iterator) for _ in range(6)
    ]  # records 24-59: across the 48-record epoch boundary
    restored = iter(
        pipeline.make_train_loader(cfg, tok, ["image_qa", "speech_qa", "text_qa"], "chat", seed=5)
    )
    grain.PyGrainCheckpointHandler().restore(
        tmp_path / "data", args=grain.PyGrainCheckpointRestore(restored)
    )
    for want in expected:
        got = next(restored)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # A different seed gives a different order.
    other = next(
        iter(
            pipeline.make_train_loader(
                cfg, tok, ["image_qa", "speech_qa", "text_qa"], "chat", seed=6
            )
        )
    )
    first = next(
        iter(
            pipeline.make_train_loader(
                cfg, tok, ["image_qa", "speech_qa", "text_qa"], "chat", seed=5
            )
        )
    )
    assert not np.array_equal(other["tokens"], first["tokens"])


def test_shards_read_disjoint_records(cfg, tok):
    seen = []
    for shard_index in range(2):
        loader = pipeline.make_train_loader(
            cfg, tok, ["audio_qa"], "chat", seed=0, shard_index=shard_index, shard_count=2
        )
        batch = next(iter(loader))
        assert batch["tokens"].shape == (3, 131)  # per-shard batch
        seen.append({m.tobytes() for m in batch["audio_mel"]})
    assert not seen[0] & seen[1]


def test_too_long_records_raise_or_are_skipped(cfg, tok):
    # With 60 image tokens every image_qa record exceeds 100 tokens, while text_qa records fit.
    long_cfg = dataclasses.replace(cfg, seq_len=100, n_image_tokens=60)
    with pytest.raises(conversation.SequenceTooLongError, match="seq_len=100"):
        next(iter(pipeline.make_train_loader(long_cfg, tok, ["image_qa"], "chat", seed=0)))
    skip_cfg = dataclasses.replace(long_cfg, skip_too_long=True)
    iterator = iter(
        pipeline.make_train_loader(skip_cfg, tok, ["image_qa", "text_qa"], "chat", seed=0)
    )
    for _ in range(3):
        assert (next(iterator)["task"] == tasks.TASK_NAMES.index("text_qa")).all()
    with pytest.raises(ValueError, match="every record"):
        next(iter(pipeline.make_train_loader(skip_cfg, tok, ["image_qa"], "chat", seed=0)))


def test_bad_configs_raise(cfg, tok, tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        pipeline.make_train_loader(
            dataclasses.replace(cfg, image_size=31), tok, ["image_qa"], "chat", seed=0
        )
    with pytest.raises(ValueError, match="num_frames"):
        pipeline.make_train_loader(
            dataclasses.replace(cfg, num_frames=5), tok, ["image_qa"], "chat", seed=0
        )
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.make_train_loader(cfg, tok, ["image_qa"], "chat", seed=0, shard_count=4)
    with pytest.raises(ValueError, match="mode"):
        pipeline.make_train_loader(cfg, tok, ["image_qa"], "vqa", seed=0)
    with pytest.raises(ValueError, match="tasks"):
        pipeline.make_train_loader(cfg, tok, ["ocr"], "chat", seed=0)
    with pytest.raises(ValueError, match="classify_image"):
        pipeline.make_train_loader(cfg, tok, ["audio_qa"], "classify_image", seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        dataclasses.replace(cfg, seq_len=0)
    with pytest.raises(FileNotFoundError, match="prepare"):
        pipeline.make_train_loader(
            dataclasses.replace(cfg, data_dir=str(tmp_path)), tok, ["image_qa"], "chat", seed=0
        )


def test_modality_grouped_global_batches_lose_no_record(cfg, tok):
    """Two shards, 3 rows each: every global batch one modality, every record read per epoch
    (records told apart by tokens and image; the synthetic text QA has a few equal records, so
    the expected set is what one plain shuffled epoch reads)."""
    selected = ["image_caption", "text_qa", "image_qa"]  # 32 image records, 16 text

    def epoch(cfg, num_batches):
        shards = [
            iter(
                pipeline.make_train_loader(
                    cfg, tok, selected, "chat", seed=2, shard_index=i, shard_count=2
                )
            )
            for i in range(2)
        ]
        seen, modalities = set(), []
        for _ in range(num_batches):
            halves = [next(shard) for shard in shards]
            modalities.append({int(m) for half in halves for m in half["modality"]})
            for half in halves:
                seen.update(
                    (t.tobytes(), i.tobytes()) for t, i in zip(half["tokens"], half["image"])
                )
        return seen, modalities

    everything, mixed = epoch(cfg, 48 // 6)
    assert any(len(m) > 1 for m in mixed)  # without the option, batches mix modalities
    grouped_cfg = dataclasses.replace(cfg, group_by_modality=True)
    seen, modalities = epoch(grouped_cfg, -(-32 // 6) + -(-16 // 6))
    assert all(len(m) == 1 for m in modalities)
    assert seen == everything and len(everything) > 40
    with pytest.raises(ValueError, match="skip_too_long"):
        dataclasses.replace(grouped_cfg, skip_too_long=True)


def test_both_pipelines_take_their_shapes_from_one_declaration():
    """`BatchShapes` declares and checks the shapes once; a stage's JSON pipeline gets exactly
    the built-in pipeline's, which are `config.data`'s (a field it leaves out at its default)."""
    with pytest.raises(ValueError, match=r"JsonDataConfig.seq_len must be >= 1, got 0"):
        json_pipeline.JsonDataConfig(
            data_dir="", sources=("x",), media_root=None, seq_len=0, batch_size=1
        )
    data = config_lib.load_config("configs/unimoe_tiny.py:mode=test").data
    with pytest.raises(ValueError, match=r"DataConfig.num_mel_bins must be >= 1, got -5"):
        pipeline.DataConfig(**{**data.to_dict(), "num_mel_bins": -5})
    json_cfg = json_pipeline.JsonDataConfig(
        data_dir="", sources=("x",), media_root=None, batch_size=2, **shapes.from_config_data(data)
    )
    builtin_cfg = pipeline.DataConfig(**data.to_dict())
    for field in dataclasses.fields(shapes.BatchShapes):
        if field.name != "batch_size":
            value = getattr(json_cfg, field.name)
            assert value == getattr(builtin_cfg, field.name), field.name
            assert value == data.get(field.name, field.default), field.name
