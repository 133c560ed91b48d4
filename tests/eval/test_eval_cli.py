"""`python -m unimoe.eval` end to end on a tiny random stage checkpoint and the real eval records."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from tests.data import real_corpus
from unimoe import checkpoint, config as config_lib, experiment, factory
from unimoe.convert import core as convert_core
from unimoe.data import formats
from unimoe.eval import benchmarks, metrics, run_benchmark
from unimoe.experiment import ExperimentConfig

ROOT = pathlib.Path(__file__).parent.parent.parent
FIXTURES = ROOT / "tests" / "data" / "fixtures" / "unimoe_formats"
STAGE = "s3_moe"  # the tiny config's MoE stage: 4 experts, LoRA


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> dict:
    """A tiny config with a pretrained (SentencePiece) tokenizer and a finished random stage."""
    root = tmp_path_factory.mktemp("eval_cli")
    tokenizer_path = real_corpus.train_sentencepiece(root / "tokenizer.model")
    config_file = root / "tiny_eval.py"
    config_file.write_text(
        "from unimoe import config as config_lib\n\n\n"
        "def get_config(arg=None):\n"
        f"    c = config_lib.load_config({str(ROOT / 'configs' / 'unimoe_tiny.py')!r} + ':mode=test')\n"
        f"    c.tokenizer = {str(tokenizer_path)!r}\n"
        "    return c\n"
    )
    config = experiment.from_config_dict(config_lib.load_config(str(config_file)))
    tokenizer = run_benchmark.load_tokenizer(config)
    spec = config.stage(STAGE)
    model = factory.build_model(
        config.model, tokenizer, moe=spec.moe, lora_rank=spec.lora_rank, seed=config.seed
    )
    params = nnx.state(model, nnx.Param)
    ckpt = factory.stage_checkpointer(root / "run", STAGE)
    ckpt.save(0, {"params": params}, force=True)
    defined = [checkpoint.path_str(p) for p, _ in nnx.to_flat_state(params)]
    ckpt.mark_done({"final_step": 0, "defined_params": defined})
    ckpt.close()
    return {"root": root, "config_file": config_file, "config": config}


def write_images(records: list[dict], media: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    for record in records:
        path = media / record["image"].lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        real_corpus.write_jpeg(path, rng)


def run_aokvqa(stage, media, out, *flags) -> subprocess.CompletedProcess:
    """`python -m unimoe.eval` on the stage and the A-OKVQA fixture records."""
    command = [
        sys.executable, "-m", "unimoe.eval",
        f"--config={stage['config_file']}",
        f"--checkpoint={stage['root'] / 'run' / STAGE}",
        "--benchmark=aokvqa",
        f"--data={FIXTURES / 'eval_aokvqa.json'}",
        f"--media-root={media}",
        f"--output={out}",
        *flags,
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_writes_predictions_and_scores_that_match_them(stage):
    records = json.loads((FIXTURES / "eval_aokvqa.json").read_text())[:5]
    media = stage["root"] / "media"
    write_images(records, media)
    out = stage["root"] / "out"
    done = run_aokvqa(stage, media, out, "--max-new-tokens=3", "--batch-size=2", "--limit=5")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "aokvqa: vqa_accuracy = " in done.stdout

    predictions = json.loads((out / "aokvqa.predictions.json").read_text())
    scores = json.loads((out / "aokvqa.scores.json").read_text())
    # The input records, in order, each with its answer (5 of them: 2 full batches + 1 padded).
    assert [{k: v for k, v in p.items() if k != "prediction"} for p in predictions] == records
    assert all(isinstance(p["prediction"], str) for p in predictions)
    expected = np.mean([metrics.vqa_accuracy(p["prediction"], p["gt"]) for p in predictions])
    assert scores["vqa_accuracy"] == pytest.approx(expected)
    assert (scores["n"], scores["skipped_records"], scores["headline"]) == (5, 0, "vqa_accuracy")


def test_a_bad_record_is_one_line_naming_it(stage, tmp_path):
    (tmp_path / "media").mkdir()  # no images in it: the first record's image is missing
    done = run_aokvqa(stage, tmp_path / "media", tmp_path / "out", "--limit=2")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    first = json.loads((FIXTURES / "eval_aokvqa.json").read_text())[0]
    assert len(errors) == 1 and "record 0" in errors[0] and first["image"] in errors[0], errors
    assert errors[0].endswith("pass --on-error=skip to skip and count bad records"), errors


def test_audio_records_are_answered_and_scored(stage, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "rain.wav").write_bytes(real_corpus.wav_bytes(1.5, 16000))
    (media / "long.wav").write_bytes(real_corpus.wav_bytes(7.0, 22050, channels=2))

    def turns(question: str) -> list[dict]:
        return [{"from": "human", "value": question}, {"from": "gpt", "value": ""}]

    # 1.5 s is one 3-s chunk of the tiny config's audio, 7 s three; the last record has no audio.
    records = [
        {"id": "a0", "voice": ["/rain.wav"], "answer": "yes", "conversations": turns("<audio>\nRain?")},
        {"id": "a1", "voice": ["/long.wav"], "answer": ["2", "two"], "conversations": turns("<audio>\nHow many?")},
        {"id": "a2", "answer": "no", "conversations": turns("No audio here?")},
    ]  # fmt: skip
    data = tmp_path / "clothoaqa.json"
    data.write_text(json.dumps(records))
    scores = run_benchmark.evaluate_benchmark(
        stage["config"],
        checkpoint=str(stage["root"] / "run" / STAGE),
        benchmark="clothoaqa",
        data=str(data),
        output=str(tmp_path / "out"),
        media_root=str(media),
        batch_size=2,
        request=run_benchmark.Request(max_new_tokens=2),
    )
    predictions = json.loads((tmp_path / "out" / "clothoaqa.predictions.json").read_text())
    assert [p["id"] for p in predictions] == ["a0", "a1", "a2"]
    expected = metrics.exact_match_scores(
        [
            {
                "prediction": p["prediction"],
                "answers": p["answer"] if isinstance(p["answer"], list) else [p["answer"]],
            }
            for p in predictions
        ]
    )
    assert scores["accuracy"] == pytest.approx(expected["accuracy"])
    assert scores["sampling"] == {"temperature": 0.0, "top_p": 1.0, "seed": 0, "top_k": 0}


def test_records_with_missing_media_stop_the_run_or_are_skipped(stage, tmp_path):
    records = json.loads((FIXTURES / "eval_aokvqa.json").read_text())[:3]
    write_images(records[:2], tmp_path / "media")  # the third record's image is missing
    data = tmp_path / "aokvqa.json"
    data.write_text(json.dumps(records))
    kwargs = dict(
        checkpoint=str(stage["root"] / "run" / STAGE),
        benchmark="aokvqa",
        data=str(data),
        output=str(tmp_path / "out"),
        media_root=str(tmp_path / "media"),
        batch_size=2,
        request=run_benchmark.Request(max_new_tokens=1),
    )
    with pytest.raises(formats.RecordError, match=r"record 2 .*field 'image'.*no such file"):
        run_benchmark.evaluate_benchmark(stage["config"], **kwargs)
    scores = run_benchmark.evaluate_benchmark(stage["config"], on_error="skip", **kwargs)
    assert (scores["n"], scores["skipped_records"]) == (2, 1)
    predictions = json.loads((tmp_path / "out" / "aokvqa.predictions.json").read_text())
    assert [p["question_id"] for p in predictions] == [r["question_id"] for r in records[:2]]


def test_a_checkpoint_that_is_not_a_finished_stage_is_refused(stage, tmp_path):
    with pytest.raises(ValueError, match="not in the config's stages"):
        run_benchmark.load_stage(stage["config"], tmp_path / "nope", None)
    with pytest.raises(ValueError, match="has not finished"):
        run_benchmark.load_stage(stage["config"], tmp_path / "s2_image", None)


@pytest.fixture(scope="module")
def converted(stage) -> pathlib.Path:
    """The stage's parameters as a converted checkpoint (what `convert from-unimoe` writes)."""
    with factory.stage_checkpointer(stage["root"] / "run", STAGE) as ckpt:
        params = checkpoint.flat_params(ckpt.restore_raw(0)["params"])
    out = stage["root"] / "converted"
    convert_core.save(convert_core.Converted("test", {}, {}, params, {}, {}), out)
    return out


def aokvqa_eval(stage, checkpoint_dir, out, config=None, **request) -> dict:
    records = json.loads((FIXTURES / "eval_aokvqa.json").read_text())[:3]
    write_images(records, stage["root"] / "media")
    return run_benchmark.evaluate_benchmark(
        config or stage["config"],
        checkpoint=str(checkpoint_dir),
        benchmark="aokvqa",
        data=str(FIXTURES / "eval_aokvqa.json"),
        output=str(out),
        media_root=str(stage["root"] / "media"),
        batch_size=2,
        limit=3,
        request=run_benchmark.Request(**request),
    )


def test_a_converted_checkpoint_answers_as_the_stage_it_holds(stage, converted, tmp_path):
    request = dict(max_new_tokens=3, save_logits=True, dtype="float32")
    from_stage = aokvqa_eval(stage, stage["root"] / "run" / STAGE, tmp_path / "a", **request)
    from_converted = aokvqa_eval(stage, converted, tmp_path / "b", **request)
    assert from_converted["vqa_accuracy"] == from_stage["vqa_accuracy"]
    predictions = [
        [p["prediction"] for p in json.loads((tmp_path / d / "aokvqa.predictions.json").read_text())]
        for d in "ab"
    ]
    assert predictions[0] == predictions[1]
    logits = [np.load(tmp_path / d / "aokvqa.logits.npz") for d in "ab"]
    records = json.loads((FIXTURES / "eval_aokvqa.json").read_text())[:3]
    assert sorted(logits[0].files) == sorted(str(r["question_id"]) for r in records)
    for key in logits[0].files:
        assert logits[0][key].shape == (run_benchmark.load_tokenizer(stage["config"]).vocab_size,)
        np.testing.assert_allclose(logits[1][key], logits[0][key], atol=1e-5)


def test_the_official_protocol_decodes_as_the_variants_eval_py(stage, converted, tmp_path):
    def official(variant: str) -> ExperimentConfig:
        return dataclasses.replace(
            stage["config"],
            eval=config_lib.EvalConfig(protocol="official", released_variant=variant),
        )

    # (The speech and 8E models' greedy VQA: tests/convert/test_released_eval.py.) The audio
    # model's eval.py samples everything but Clotho at T=0.2, with Hugging Face's top_k 50 and the
    # base model's generation_config.json top_p, in float16 after a float16 load.
    (converted / run_benchmark.GENERATION_CONFIG).write_text(json.dumps({"top_p": 0.6}))
    try:
        scores = aokvqa_eval(stage, converted, tmp_path / "a", official("audio_4e"), max_new_tokens=2)
    finally:
        (converted / run_benchmark.GENERATION_CONFIG).unlink()
    assert scores["protocol"] == "official" and scores["max_new_tokens"] == 2
    assert scores["sampling"] == {"temperature": 0.2, "top_p": 0.6, "seed": 0, "top_k": 50}
    # ... and captions Clotho by beam sampling: 5 beams, T=1, at least 10 new tokens.
    (tmp_path / "rain.wav").write_bytes(real_corpus.wav_bytes(1.0, 16000))
    clip = {
        "id": "c0", "voice": ["/rain.wav"], "captions": ["rain falls", "it rains"],
        "conversations": [{"from": "human", "value": "<audio>\nDescribe it."}, {"from": "gpt", "value": ""}],
    }  # fmt: skip
    (tmp_path / "clotho.json").write_text(json.dumps([clip]))
    scores = run_benchmark.evaluate_benchmark(
        official("audio_4e"), checkpoint=str(converted), benchmark="clotho",
        data=str(tmp_path / "clotho.json"), output=str(tmp_path / "c"), media_root=str(tmp_path),
        request=run_benchmark.Request(max_new_tokens=12),
    )  # fmt: skip
    assert (scores["num_beams"], scores["min_new_tokens"]) == (5, 10)
    assert scores["sampling"]["temperature"] == 1.0 and scores["n"] == 1


def test_benchmark_audio_goes_to_the_sound_tower_when_the_config_routes_it(stage, tmp_path):
    """Uni-MoE-audio: `config.json_data.sound_sources` naming 'benchmark' sends every benchmark
    clip to BEATs, each <audio> expanding to n_sound_tokens per chunk."""
    (tmp_path / "rain.wav").write_bytes(real_corpus.wav_bytes(7.0, 16000))
    record = {
        "id": "s0", "voice": ["/rain.wav"], "answer": "rain",
        "conversations": [{"from": "human", "value": "<audio>\nWhat is it?"}, {"from": "gpt", "value": ""}],
    }  # fmt: skip
    data = tmp_path / "clothoaqa.json"
    data.write_text(json.dumps([record]))
    config = stage["config"]
    json_data = dict(
        data_dir="", sources=("x",), media_root=None, sound_sources=(run_benchmark.BENCHMARK_SOURCE,),
        sound_chunk_samples=48000, sound_mel_bins=32, max_sound_chunks=3,
    )  # fmt: skip
    routed = dataclasses.replace(
        config,
        json_data=experiment._json_data(json_data, dataclasses.asdict(config.data)),
    )
    tokenizer = run_benchmark.load_tokenizer(config)
    items, _ = benchmarks.read_items(benchmarks.get("clothoaqa"), data)
    examples = {
        name: run_benchmark.build_examples(cfg, items, tokenizer, str(tmp_path))[1][0]
        for name, cfg in (("whisper", config), ("beats", routed))
    }
    assert examples["beats"]["has_sound"] and not examples["beats"]["has_audio"]
    assert examples["whisper"]["has_audio"] and "has_sound" not in examples["whisper"]
    # 7 s: three 3-s chunks of 48000 samples.
    assert examples["beats"]["sound_chunk_mask"].sum() == 3
    audio_tokens = {n: int((ex["prompt"] == tokenizer.audio_id).sum()) for n, ex in examples.items()}
    assert audio_tokens["beats"] == 3 * config.data.n_sound_tokens
    assert audio_tokens["whisper"] == 3 * config.data.n_audio_tokens
