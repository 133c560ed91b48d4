"""A released Uni-MoE model end to end: `from-unimoe`, then `python -m unimoe.eval` with
configs/unimoe_released.py, against the PyTorch reference decoding greedily on the same inputs."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from tests.convert import released_models, released_reference as ref
from tests.data import real_corpus
from unimoe import checkpoint, config as config_lib, experiment, factory
from unimoe.convert import cli, released as released_lib
from unimoe.eval import benchmarks, run_benchmark

ROOT = pathlib.Path(__file__).parent.parent.parent
NEW_TOKENS = 4


# speech_4e end to end; the 8E model's logits: test_released_parity.py (suite time: one variant).
@pytest.fixture(scope="module", params=["speech_4e"])
def released(request, tmp_path_factory) -> dict:
    """A tiny release converted, and a small A-OKVQA-style eval file with media."""
    variant = request.param
    root = tmp_path_factory.mktemp(f"released_eval_{variant}")
    folders = released_models.write_released(root / "release", variant)
    out = root / "converted"
    experts = [f"--experts={folders.experts}"] if folders.experts else []
    assert cli.main([
        "from-unimoe", f"--variant={variant}", f"--base={folders.base}",
        f"--finetuned={folders.finetuned}", f"--clip={folders.clip}",
        f"--whisper={folders.whisper}", *experts, str(out),
    ]) == 0  # fmt: skip
    media = root / "media"
    media.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        real_corpus.write_jpeg(media / f"img{i}.jpg", rng)
    (media / "talk.wav").write_bytes(real_corpus.wav_bytes(0.7, 16000))

    def turns(question: str) -> list[dict]:
        return [{"from": "human", "value": question}, {"from": "gpt", "value": ""}]

    records = [
        {"id": "q0", "question_id": 10, "image": "/img0.jpg", "gt": ["cat"] * 10,
         "conversations": turns("<image>\nWhat is it?")},
        {"id": "q1", "question_id": 11, "image": "/img1.jpg", "voice": ["/talk.wav"],
         "gt": ["dog"] * 10, "conversations": turns("<image>\n<audio>\nAnd this one?")},
        {"id": "q2", "question_id": 12, "gt": ["no"] * 10, "conversations": turns("Text alone?")},
    ]  # fmt: skip
    data = root / "eval.json"
    data.write_text(json.dumps(records))
    # The 8E second choice by argmax, as the reference's deterministic gate.
    config_arg = f"configs/unimoe_released.py:variant={variant},checkpoint={out},gumbel=False"
    return {
        "root": root, "folders": folders, "out": out, "media": media, "data": data,
        "variant": variant, "config_arg": config_arg,
    }  # fmt: skip


def _sample(example: dict, tokenizer) -> ref.Sample:
    """Our example as the reference's prompt: each run of placeholder ids one official sentinel,
    the media channels-first (Whisper mels [C, mels, frames])."""
    sentinels = {
        tokenizer.image_id: ref.IMAGE_TOKEN,
        tokenizer.video_id: ref.VIDEO_TOKEN,
        tokenizer.audio_id: ref.AUDIO_TOKEN,
    }
    ids = []
    for token in map(int, example["prompt"]):
        if token not in sentinels:
            ids.append(token)
        elif not ids or ids[-1] != sentinels[token]:
            ids.append(sentinels[token])
    chunks = int(example["audio_chunk_mask"].sum())
    return ref.Sample(
        tuple(ids),
        image=example["image"].transpose(2, 0, 1) if example["has_image"] else None,
        audio=example["audio_mel"][:chunks].transpose(0, 2, 1) if chunks else None,
    )


def _reference_greedy(reference: ref.Reference, sample: ref.Sample, eos_id: int) -> tuple[list, np.ndarray]:
    """Greedy decoding by rerunning the reference on the whole sequence at every step."""
    ids, first = list(sample.ids), None
    for _ in range(NEW_TOKENS):
        logits = reference.logits([ref.Sample(tuple(ids), image=sample.image, audio=sample.audio)])
        first = logits[0, -1] if first is None else first
        ids.append(int(logits[0, -1].argmax()))
        if ids[-1] == eos_id:
            break
    return ids[len(sample.ids):], first


def test_eval_answers_a_released_model_as_the_reference_does(released):
    out_dir = released["root"] / "eval_out"
    config_arg = released["config_arg"]
    command = [
        sys.executable, "-m", "unimoe.eval", f"--config={config_arg}",
        f"--checkpoint={released['out']}", "--benchmark=aokvqa", f"--data={released['data']}",
        f"--media-root={released['media']}", f"--output={out_dir}", "--dtype=float32",
        f"--max-new-tokens={NEW_TOKENS}", "--save-logits", "--batch-size=2",
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    predictions = json.loads((out_dir / "aokvqa.predictions.json").read_text())
    scores = json.loads((out_dir / "aokvqa.scores.json").read_text())
    assert scores["protocol"] == "official" and scores["sampling"]["temperature"] == 0.0
    saved = np.load(out_dir / "aokvqa.logits.npz")

    # The same preprocessed inputs, decoded greedily by the reference.
    typed = experiment.from_config_dict(config_lib.load_config(config_arg))
    tokenizer = run_benchmark.load_tokenizer(typed)
    items, _ = benchmarks.read_items(benchmarks.get("aokvqa"), released["data"])
    _, examples, _ = run_benchmark.build_examples(typed, items, tokenizer, str(released["media"]))
    reference = ref.Reference.load(released["folders"], released["variant"])
    for example, prediction, key in zip(examples, predictions, ["10", "11", "12"]):
        ids, first = _reference_greedy(reference, _sample(example, tokenizer), tokenizer.eos_id)
        if tokenizer.eos_id in ids:
            ids = ids[: ids.index(tokenizer.eos_id)]
        assert prediction["prediction"] == tokenizer.decode(ids).strip(), key
        np.testing.assert_allclose(saved[key][: released_models.VOCAB], first, atol=1e-4)


def test_a_released_model_is_where_a_finetuning_stage_starts(released):
    """configs/unimoe_released.py's stage `finetune` takes every weight from the conversion
    (`config.pretrained.released`); only its new LoRA and the parts no release has start new."""
    typed = experiment.from_config_dict(config_lib.load_config(released["config_arg"]))
    tokenizer = run_benchmark.load_tokenizer(typed)
    model, origin = factory.build_stage_model(typed, "finetune", released["root"], tokenizer)
    params = [checkpoint.path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    new = {p for p in params if p not in origin}
    assert new and all(
        "lora" in p or p.startswith(released_lib.not_in_checkpoint(released["variant"]))
        for p in new
    ), sorted(new)[:5]
    assert set(origin.values()) == {"pretrained"}


def test_a_float16_conversion_loads_as_the_official_evaluation_loads_a_float32_one(released):
    """`--dtype=float16` stores what the official loader reads: under the official protocol
    (float16 load, bfloat16 compute) the model is the same, at half the size."""
    folders = released["folders"]
    half = released["root"] / "converted_fp16"
    if not half.exists():
        experts = [f"--experts={folders.experts}"] if folders.experts else []
        assert cli.main([
            "from-unimoe", f"--variant={released['variant']}", f"--base={folders.base}",
            f"--finetuned={folders.finetuned}", f"--clip={folders.clip}",
            f"--whisper={folders.whisper}", *experts, "--dtype=float16", str(half),
        ]) == 0  # fmt: skip
    sizes = [sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in (released["out"], half)]
    assert sizes[1] < 0.6 * sizes[0]
    typed = experiment.from_config_dict(config_lib.load_config(released["config_arg"]))
    tokenizer = run_benchmark.load_tokenizer(typed)
    states = [
        nnx.state(
            run_benchmark.load_converted(
                typed, ckpt, tokenizer, compute_dtype="bfloat16", weights_via_float16=True
            ),
            nnx.Param,
        )
        for ckpt in (released["out"], half)
    ]
    flat = [dict(nnx.to_flat_state(s)) for s in states]
    assert flat[0].keys() == flat[1].keys()
    for key, variable in flat[0].items():
        np.testing.assert_array_equal(
            np.asarray(variable.get_value(), np.float32),
            np.asarray(flat[1][key].get_value(), np.float32),
            err_msg=str(key),
        )
