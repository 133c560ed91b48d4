"""Real-data pipeline throughput against what the tiny stage-3 train step consumes (issue 7).

Pipeline: a Uni-MoE JSON of image + spoken-question records (COCO-sized 480x640 JPEGs, 22.05 kHz
stereo WAVs of 2-2.9 s) prepared as `unimoe_json`, read by `json_pipeline.make_dataset` with 2
grain worker processes: JSON validation, JPEG decode + CLIP transform, WAV decode + downmix +
resampling + Whisper log-mel, SentencePiece tokenization with the reference's Vicuna masks,
batching. Step: `configs/unimoe_tiny.py`'s `s3_moe` stage (MoE + LoRA + routers + connectors),
one jitted `make_train_step` call on a batch from that pipeline, with the tiny data shapes
(32 px images, 300 x 32 log-mel = 3-s chunks, 16 / 8 media tokens) and seq_len 128 (the
reference system prompt alone is ~50 SentencePiece tokens, over the tiny config's 80).

Both run in this one process, interleaved in rounds: a few train steps (each timed), then the
pipeline with fresh workers (start-up untimed, then a window of batches timed); the step's time
is the median over all steps after its compile, the pipeline's rate the median over rounds, so
both see the same load of the shared machine.

    python benchmarks/data_pipeline.py           # 160 records, batch 32, 3 rounds of 4 steps / 8 batches
    python benchmarks/data_pipeline.py --quick   # 24 records, batch 4: a smoke run

The last line is `RESULT pipeline_samples_per_s=<x> step_samples_per_s=<y> ratio=<x/y>`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import statistics
import sys
import tempfile
import time
import wave

import jax
import numpy as np
import sentencepiece as spm
from absl import app, flags
from flax import nnx
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's `unimoe`, not whichever one is installed

from unimoe import config as config_lib, experiment, factory  # noqa: E402
from unimoe.data import json_builder, json_pipeline  # noqa: E402
from unimoe.data.conversation import SYSTEM_PROMPT  # noqa: E402
from unimoe.data.tokenizer import PretrainedTokenizer  # noqa: E402
from unimoe.parallel import sharded  # noqa: E402
from unimoe.train import optim, step as step_lib  # noqa: E402

_QUICK = flags.DEFINE_bool("quick", False, "tiny sizes: a smoke run")
WORDS = "red green blue cat dog ball man woman table bed street car tree sky water".split()
SEQ_LEN = 128


def _wav(seconds: float, rng: np.random.Generator, rate: int = 22050) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.3 * np.sin(2 * np.pi * rng.uniform(150, 400) * t) + 0.01 * rng.standard_normal(len(t))
    pcm = (np.stack([mono, mono], 1) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def write_corpus(root: pathlib.Path, num_records: int) -> list[str]:
    """Media + `train.json` under root; returns the conversation texts (tokenizer corpus)."""
    rng = np.random.default_rng(0)
    media = root / "media"
    media.mkdir(parents=True)
    records, texts = [], [SYSTEM_PROMPT + " USER: ASSISTANT:"]
    for i in range(num_records):
        # Smooth noise compresses like a photo (a JPEG of pure noise would be 5x larger).
        small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.Resampling.BILINEAR).save(
            media / f"{i}.jpg", quality=90
        )
        (media / f"{i}.wav").write_bytes(_wav(rng.uniform(2.0, 2.9), rng))
        question = " ".join(rng.choice(WORDS, 6))
        answer = " ".join(rng.choice(WORDS, 4))
        texts += [question, answer]
        records.append(
            {
                "id": str(i),
                "image": f"/{i}.jpg",
                "voice": [f"/{i}.wav"],
                "conversations": [
                    {"from": "human", "value": f"<image>\n<audio>\n{question}"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    (root / "train.json").write_text(json.dumps(records))
    return texts


def train_tokenizer(path: pathlib.Path, texts: list[str]) -> PretrainedTokenizer:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=400,
        hard_vocab_limit=False,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return PretrainedTokenizer(path)


def step_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A pipeline batch in the tiny model's batch format (one 3-s audio chunk per row)."""
    out = {
        k: v
        for k, v in batch.items()
        if k not in ("audio_chunk_mask", "modality_type", "num_skipped")
    }
    out["audio_mel"] = batch["audio_mel"][:, 0]
    out["image_label"] = out["audio_label"] = np.full(len(batch["tokens"]), -1, np.int32)
    return out


def make_step(config, tokenizer, batch):
    """`run(i)`: one tiny s3_moe train step on `batch` (state threaded through), blocking."""
    typed = experiment.from_config_dict(config)
    stage = typed.stage("s3_moe")
    model = factory.build_model(typed.model, tokenizer, moe=True, lora_rank=stage.lora_rank, seed=0)
    graphdef, trainable, rest = nnx.split(model, factory.trainable_filter(stage.trains), ...)
    optim_cfg = optim.OptimConfig(
        learning_rate=stage.learning_rate,
        total_steps=100,
        warmup_steps=1,
        weight_decay=0.0,
        grad_clip=1.0,
    )
    loss_cfg = step_lib.LossConfig(
        kind="chat", balance_coef=stage.balance_coef, z_coef=stage.z_coef
    )
    state = [trainable, optim.make_optimizer(optim_cfg).init(trainable), rest]
    train_step = step_lib.make_train_step(
        sharded.make_plan(None), graphdef, stage.trains, optim_cfg, loss_cfg
    )

    def run(i: int) -> None:
        trainable, opt_state, rest, metrics = train_step(*state, batch, np.int32(i))
        state[:] = [trainable, opt_state, rest]  # the step donates its inputs
        jax.block_until_ready(metrics["loss"])

    return run


def pipeline_rate(cfg: json_pipeline.JsonDataConfig, tokenizer, window: int) -> float:
    """Samples/s over `window` batches of a fresh iterator, from its first batch on.

    Fresh workers start with empty buffers and the loop takes each batch as soon as it is ready,
    so nothing buffered while the train step ran inflates the rate; start-up (until every worker
    has delivered a batch) is not timed.
    """
    batches = iter(json_pipeline.make_dataset(cfg, tokenizer))
    for _ in range(cfg.worker_count):  # one batch from each worker: all have started
        next(batches)
    elapsed = _seconds(lambda: [next(batches) for _ in range(window)])
    batches.close()  # stop the workers (and before their media folder is deleted)
    return window * cfg.batch_size / elapsed


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv):
    del argv
    quick = _QUICK.value
    num_records, batch_size = (24, 4) if quick else (160, 32)
    rounds, steps_per_round, window = (2, 1, 2) if quick else (3, 4, 8)
    config = config_lib.load_config(str(REPO / "configs" / "unimoe_tiny.py"))
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        texts = write_corpus(root, num_records)
        tokenizer = train_tokenizer(root / "tokenizer.model", texts)
        json_builder.prepare(root / "tfds", "bench", root, "train.json")
        data = config.data
        cfg = json_pipeline.JsonDataConfig(
            data_dir=str(root / "tfds"),
            sources=("bench",),
            media_root=str(root / "media"),
            seq_len=SEQ_LEN,
            batch_size=batch_size,
            image_size=data.image_size,
            num_frames=data.num_frames,
            num_mel_bins=data.num_mel_bins,
            audio_frames=data.audio_frames,
            max_audio_chunks=1,
            n_image_tokens=data.n_image_tokens,
            n_video_tokens=data.n_video_tokens,
            n_audio_tokens=data.n_audio_tokens,
            worker_count=2,
        )
        inline = dataclasses.replace(cfg, worker_count=0)
        first = next(iter(json_pipeline.make_dataset(inline, tokenizer)))
        run_step = make_step(config, tokenizer, step_batch(first))
        run_step(0)  # compile
        step_times, pipeline_rates = [], []
        for _ in range(rounds):
            step_times += [_seconds(lambda: run_step(1)) for _ in range(steps_per_round)]
            pipeline_rates.append(pipeline_rate(cfg, tokenizer, window))
    step_s = statistics.median(step_times)
    pipeline_samples_per_s = statistics.median(pipeline_rates)
    step_rate = batch_size / step_s
    print(f"step: {step_s * 1e3:.1f} ms per batch of {batch_size} (seq {SEQ_LEN})")
    print(f"pipeline: {[round(r, 1) for r in pipeline_rates]} samples/s with 2 workers")
    print(
        f"RESULT pipeline_samples_per_s={pipeline_samples_per_s:.1f} step_samples_per_s={step_rate:.1f} "
        f"ratio={pipeline_samples_per_s / step_rate:.2f}"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
