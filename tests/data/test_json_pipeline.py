"""The `unimoe_json` TFDS builder, its grain pipeline (on_error, resume, sharding, mixtures,
grouping, buckets) and the `python -m unimoe.data check` CLI, on a corpus of real media files."""

import json
import pathlib
import subprocess
import sys
import zipfile

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from tests.data import real_corpus
from unimoe.data import check as check_cli, formats, json_builder, json_pipeline
from unimoe.data.tokenizer import PretrainedTokenizer
from unimoe.checkpoint import Checkpointer

NUM_GOOD = 7  # records per copy in real_corpus.write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Two prepared sources: 'clean' (3 copies of the good records), 'dirty' (1 copy + bad ones)."""
    root = tmp_path_factory.mktemp("corpus")
    clean = real_corpus.write_corpus(root / "clean", copies=3)
    dirty = real_corpus.write_corpus(root / "dirty", with_bad=True)
    data_dir = root / "tfds"
    json_builder.prepare(data_dir, "clean", clean.parent, clean.name)
    json_builder.prepare(data_dir, "dirty", dirty.parent, dirty.name)
    tokenizer_path = real_corpus.train_sentencepiece(root / "tokenizer.model")
    return {
        "root": root,
        "data_dir": str(data_dir),
        "dirty_json": dirty,
        "tokenizer_path": tokenizer_path,
        "tokenizer": PretrainedTokenizer(tokenizer_path),
    }


def _config(corpus, **overrides) -> json_pipeline.JsonDataConfig:
    values = dict(
        data_dir=corpus["data_dir"],
        sources=("clean",),
        # Both corpora write identical media; one root serves both sources.
        media_root=str(corpus["root"] / "dirty" / "media"),
        seq_len=512,
        batch_size=4,
        image_size=16,
        num_frames=4,
        num_mel_bins=16,
        audio_frames=200,  # 2-s chunks: the 4.5-s article is 3 chunks
        max_audio_chunks=5,
        n_image_tokens=3,
        n_video_tokens=3,
        n_audio_tokens=2,
    )
    return json_pipeline.JsonDataConfig(**{**values, **overrides})


def _ids(batch, tokenizer) -> list[str]:
    """Identifies rows by their decoded answer text (records are distinct within a copy)."""
    return [
        tokenizer.decode(row[mask > 0]) for row, mask in zip(batch["tokens"], batch["loss_mask"])
    ]


def test_builder_stores_every_record_with_sampling_keys(corpus):
    source = json_builder.builder(corpus["data_dir"], "dirty").as_data_source(json_builder.SPLIT)
    assert len(source) == NUM_GOOD + len(real_corpus.BAD_RECORDS)
    types = [int(source[i]["modality_type"]) for i in range(len(source))]
    assert types[:NUM_GOOD] == [1, 2, 2, 6, 3, 4, 0]
    assert types[NUM_GOOD + 3] == -1  # the malformed record is stored, to fail in the pipeline
    assert [int(source[i]["index"]) for i in range(len(source))] == list(range(len(source)))


def test_batches_have_the_documented_shapes(corpus):
    tok = corpus["tokenizer"]
    batch = next(iter(json_pipeline.make_dataset(_config(corpus), tok)))
    shapes = {k: v.shape for k, v in batch.items()}
    assert shapes["tokens"] == shapes["loss_mask"] == shapes["attn_mask"] == (4, 512)
    assert shapes["image"] == (4, 16, 16, 3) and shapes["video"] == (4, 4, 16, 16, 3)
    assert shapes["audio_mel"] == (4, 5, 200, 16) and shapes["audio_chunk_mask"] == (4, 5)
    # Each <audio> tag expands to n_audio_tokens per chunk of its own file.
    chunks = batch["audio_chunk_mask"].sum(axis=1)
    np.testing.assert_array_equal((batch["tokens"] == tok.audio_id).sum(axis=1), 2 * chunks)
    np.testing.assert_array_equal(batch["has_audio"], chunks > 0)
    assert not (batch["loss_mask"] * ~batch["attn_mask"]).any()


def test_raise_policy_names_file_record_and_field(corpus):
    cfg = _config(corpus, sources=("dirty",), on_error="raise", batch_size=1)
    it = iter(json_pipeline.make_dataset(cfg, corpus["tokenizer"]))
    with pytest.raises(formats.RecordError) as info:
        for _ in range(3 * (NUM_GOOD + 6)):
            next(it)
    error = info.value
    assert error.file == "unimoe_json/dirty" and error.index >= NUM_GOOD
    kind, field = real_corpus.BAD_RECORDS[error.index - NUM_GOOD]
    assert (error.record_id, error.field) == (kind, field)


def test_skip_policy_counts_every_bad_record_and_keeps_every_good_one(corpus):
    cfg = _config(corpus, sources=("dirty",), on_error="skip", batch_size=1, seq_len=400)
    it = iter(json_pipeline.make_dataset(cfg, corpus["tokenizer"]))
    epoch_len = NUM_GOOD + len(real_corpus.BAD_RECORDS)
    seen, skipped = [], 0
    while len(seen) + skipped < 2 * epoch_len:  # two whole epochs
        batch = next(it)
        seen += _ids(batch, corpus["tokenizer"])
        skipped += int(batch["num_skipped"].sum())
    assert skipped == 2 * len(real_corpus.BAD_RECORDS)
    assert len(seen) == 2 * NUM_GOOD and len(set(seen)) == NUM_GOOD


def test_resumed_iterator_continues_with_the_same_records(corpus):
    cfg = _config(corpus, sources=("clean", "dirty"), weights=(0.7, 0.3), on_error="skip")
    tok = corpus["tokenizer"]
    dataset = json_pipeline.make_dataset(cfg, tok)
    it = iter(dataset)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    resumed = iter(json_pipeline.make_dataset(cfg, tok))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_shards_split_the_records_and_the_batch(corpus):
    cfg = _config(corpus, batch_size=2)
    tok = corpus["tokenizer"]
    for index in range(2):
        it = iter(json_pipeline.make_dataset(cfg, tok, shard_index=index, shard_count=2))
        assert all(next(it)["tokens"].shape[0] == 1 for _ in range(3))
    with pytest.raises(ValueError, match="shard_index=2"):
        json_pipeline.make_dataset(cfg, tok, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="not divisible"):
        json_pipeline.make_dataset(_config(corpus, batch_size=3), tok, shard_count=2)


def test_shard_positions_are_disjoint(corpus):
    source = json_builder.builder(corpus["data_dir"], "clean").as_data_source(json_builder.SPLIT)
    shards = [grain.MapDataset.source(source)[i::2] for i in range(2)]
    indices = [{int(s[j]["index"]) for j in range(len(s))} for s in shards]
    assert indices[0].isdisjoint(indices[1]) and len(indices[0] | indices[1]) == 3 * NUM_GOOD


def test_weighted_mixture_draws_batches_in_proportion(corpus):
    cfg = _config(corpus, sources=("clean", "dirty"), weights=(3.0, 1.0), on_error="skip")
    it = iter(json_pipeline.make_dataset(cfg, corpus["tokenizer"]))
    # Only 'dirty' batches can carry skips; batches are drawn 3:1.
    with_skips = [int(next(it)["num_skipped"].sum() > 0) for _ in range(16)]
    assert 0 < sum(with_skips) <= 4


def test_modality_grouped_batches_share_one_type(corpus):
    cfg = _config(corpus, group_by_modality=True, batch_size=3)
    it = iter(json_pipeline.make_dataset(cfg, corpus["tokenizer"]))
    for _ in range(8):
        types = next(it)["modality_type"]
        assert len(set(types.tolist())) == 1, types


def test_epoch_order_groups_sorts_by_length_and_loses_no_record():
    keys = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    lengths = np.array([5, 1, 4, 2, 3, 9, 8, 7])
    order = json_pipeline._epoch_order(keys, lengths, 2, np.random.default_rng(0), grouped=True)
    batches = order.reshape(-1, 2)
    # 5 -> 3 batches of type 0, 3 -> 2 of type 1, each type's last batch completed by wrap-around
    # (the reference drops each type's last batch instead).
    assert len(order) == 10 and set(order) == set(range(8))
    for batch in batches:
        assert len(set(keys[batch])) == 1
    # Within a type, full batches before the wrap-around are longest first.
    type0 = [b for b in batches if keys[b[0]] == 0]
    assert sum(lengths[b[0]] >= lengths[b[1]] for b in type0) >= 2
    flat = json_pipeline._epoch_order(keys, lengths, 2, np.random.default_rng(0), grouped=False)
    assert sorted(flat) == list(range(8))


def test_epoch_order_shards_read_rows_of_the_same_global_batches():
    keys = np.repeat([0, 1, 3], [7, 5, 4])
    lengths = np.arange(16)
    shards = [
        json_pipeline._epoch_order(
            keys, lengths, 4, np.random.default_rng(3), grouped=True, shard_index=i, shard_count=2
        ).reshape(-1, 2)
        for i in range(2)
    ]
    global_batches = np.concatenate(shards, axis=1)
    assert len(global_batches) == 2 + 2 + 1  # ceil(7/4) + ceil(5/4) + ceil(4/4)
    for batch in global_batches:
        assert len(set(keys[batch])) == 1, batch
    assert set(global_batches.ravel()) == set(range(16))


def test_seq_buckets_trim_batches_to_the_smallest_fitting_length(corpus):
    cfg = _config(corpus, seq_buckets=(128, 256, 384), batch_size=2)
    it = iter(json_pipeline.make_dataset(cfg, corpus["tokenizer"]))
    for _ in range(4):
        batch = next(it)
        width, longest = batch["tokens"].shape[1], batch["attn_mask"].sum(axis=1).max()
        assert width in (128, 256, 384, 512) and longest <= width
        assert width == 128 or longest > {256: 128, 384: 256, 512: 384}[width]


def test_worker_processes_give_the_same_batches(corpus):
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags when it starts workers
        flags.FLAGS.mark_as_parsed()
    tok = corpus["tokenizer"]
    inline = iter(json_pipeline.make_dataset(_config(corpus, worker_count=0), tok))
    workers = iter(json_pipeline.make_dataset(_config(corpus, worker_count=2), tok))
    first = [next(workers) for _ in range(2)]
    assert all(b["tokens"].shape == (4, 512) for b in first)
    inline_rows = {s for _ in range(6) for s in _ids(next(inline), tok)}
    assert {s for b in first for s in _ids(b, tok)} <= inline_rows


def test_config_rejects_bad_values(corpus):
    with pytest.raises(ValueError, match="on_error"):
        _config(corpus, on_error="ignore")
    with pytest.raises(ValueError, match="weights"):
        _config(corpus, weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="max_audio_chunks=0 must be >= 1"):
        _config(corpus, max_audio_chunks=0)
    with pytest.raises(FileNotFoundError, match="unimoe_json/nothing"):
        json_pipeline.make_dataset(_config(corpus, sources=("nothing",)), corpus["tokenizer"])


def _run_check(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unimoe.data", "check", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=pathlib.Path(__file__).parent.parent.parent,
    )


def test_check_cli_reports_each_bad_record_and_a_summary(corpus):
    dirty = corpus["dirty_json"]
    out = _run_check(dirty, "--media-root", dirty.parent / "media")
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 1
    assert lines[-1] == f"{NUM_GOOD + 6} records, {NUM_GOOD + 1} ok, 5 errors"
    assert lines[0].startswith(f"record {NUM_GOOD} (id truncated_jpeg): image: ")
    assert "empty.wav: audio has no samples" in lines[1] and "nowhere.jpg" in lines[2]
    no_media = _run_check(dirty, "--no-media").stdout.strip().splitlines()
    assert no_media[-1] == f"{NUM_GOOD + 6} records, {NUM_GOOD + 4} ok, 2 errors"
    with_tokens = (
        _run_check(
            dirty, "--no-media", "--tokenizer", corpus["tokenizer_path"], "--seq-len", "1500"
        )
        .stdout.strip()
        .splitlines()
    )
    assert with_tokens[-2].startswith(f"record {NUM_GOOD + 5} (id too_long): conversations: ")
    assert with_tokens[-1] == f"{NUM_GOOD + 6} records, {NUM_GOOD + 3} ok, 3 errors"


@pytest.mark.parametrize("name", ["train_samples.json", "eval_mmbench11.json", "eval_mmvet.json"])
def test_check_cli_passes_the_fixture_files_without_media(name):
    out = _run_check(real_corpus.FIXTURES / name, "--no-media")
    assert out.returncode == 0, out.stdout
    assert out.stdout.strip().splitlines()[-1].endswith(" ok, 0 errors")


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nope.json"], "FILE /nope.json does not exist: give a file"),
        (["{tmp}"], "FILE {tmp} is a directory: give a file"),
        (["{fixture}", "--seq-len", "0"], "--seq-len must be >= 1 (got 0)"),
        (["{fixture}", "--seq-len", "-5"], "--seq-len must be >= 1 (got -5)"),
        (["{fixture}", "--max-audio-chunks", "0"], "--max-audio-chunks must be >= 1 (got 0)"),
        (["{fixture}", "--max-audio-chunks=-5"], "--max-audio-chunks must be >= 1 (got -5)"),
        (["{fixture}", "--seq-len", "2k"], "argument --seq-len: invalid int value: '2k'"),
        (["{fixture}", "--tokenizer", "/nope.model"], "--tokenizer /nope.model does not exist"),
        (["{fixture}", "--media-root", "/nope"], "media root /nope does not exist"),
        (["{fixture}", "--media-root", "{fixture}"], "is a file but not a zip archive (corrupt"),
        (["{fixture}", "--media-root", "{tmp}/cut.zip"], "cut.zip is a file but not a zip archive"),
    ],
)
def test_check_cli_refuses_bad_arguments_in_one_line(args, message, tmp_path, capsys):
    fixture = real_corpus.FIXTURES / "eval_mmbench11.json"
    with zipfile.ZipFile(tmp_path / "media.zip", "w") as z:
        z.writestr("a.wav", real_corpus.wav_bytes(0.1))
    (tmp_path / "cut.zip").write_bytes((tmp_path / "media.zip").read_bytes()[:-30])
    argv = ["check", *(a.format(tmp=tmp_path, fixture=fixture) for a in args)]
    with pytest.raises(SystemExit) as exit_info:
        check_cli.main(argv)
    assert exit_info.value.code == 2
    (error,) = capsys.readouterr().err.strip().splitlines()  # no usage, no traceback
    assert error.startswith("error: ") and message.format(tmp=tmp_path) in error


def test_check_cli_reports_every_mistaken_argument(capsys):
    with pytest.raises(SystemExit) as exit_info:
        check_cli.main(["check", "/nope.json", "--seq-len", "0", "--max-audio-chunks", "-1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --seq-len must be >= 1 (got 0)",
        "error: --max-audio-chunks must be >= 1 (got -1)",
        "error: FILE /nope.json does not exist: give a file",
    ]


def test_too_many_audio_chunks_is_a_record_error(corpus):
    raw = json.loads(corpus["dirty_json"].read_text())[4]  # 3 voice files: 1 + 1 + 3 chunks
    builder = json_pipeline.ExampleBuilder(_config(corpus), corpus["tokenizer"])
    example = builder(json.dumps(raw), 4, "t.json")
    assert example["audio_chunk_mask"].sum() == 5
    short = json_pipeline.ExampleBuilder(_config(corpus, max_audio_chunks=4), corpus["tokenizer"])
    with pytest.raises(formats.RecordError, match="5 audio chunks of 200 frames") as info:
        short(json.dumps(raw), 4, "t.json")
    assert (info.value.index, info.value.field) == (4, "voice")


def test_project_checkpointer_restores_a_worker_pipeline(corpus, tmp_path):
    """Through `unimoe.checkpoint.Checkpointer` (orbax + grain), with worker processes and skips."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    cfg = _config(corpus, sources=("clean", "dirty"), on_error="skip", worker_count=2)
    tok, state = corpus["tokenizer"], {"w": jnp.arange(3.0)}
    iterator = iter(json_pipeline.make_dataset(cfg, tok))
    for _ in range(3):
        next(iterator)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state, iterator)
        ckpt.wait()
    following = [next(iterator) for _ in range(3)]
    iterator.close()
    fresh = iter(json_pipeline.make_dataset(cfg, tok))
    with Checkpointer(tmp_path) as ckpt:
        ckpt.restore(3, jax.eval_shape(lambda: state), fresh)
    for want in following:
        got = next(fresh)
        for key in ("tokens", "loss_mask", "image", "audio_mel", "num_skipped"):
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    fresh.close()
