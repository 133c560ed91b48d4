r"""Uni-MoE's released models, evaluated by the official protocol.

Convert a release once (local folders; nothing is downloaded; README "Real weights"):

  python -m unimoe.convert from-unimoe --variant=speech_4e --base=Uni-MoE-speech-base \
      --finetuned=Uni-MoE-speech-e2 --clip=clip-vit-large-patch14-336 --whisper=whisper-small \
      ckpt/speech_4e

then evaluate it, one command per benchmark (experiments/paper/README.md, "Released models"):

  python -m unimoe.eval --config=configs/unimoe_released.py:variant=speech_4e,checkpoint=ckpt/speech_4e \
      --checkpoint=ckpt/speech_4e --benchmark=textvqa --data=... --media-root=... --output=...

`variant` is speech_4e (Uni-MoE-speech: 4 experts in every layer, Whisper + Whisper-decoder
connector), audio_4e (Uni-MoE-audio: 4 experts in the even layers, BEATs + Q-Former) or 8e
(Uni-MoE 8E: 8 experts in every layer, DeepSpeed's gate). `checkpoint` (the converted folder) gives
the model its recorded `config.model` and tokenizer; without it the published 7B sizes are used
(`--dry_run` accounting, lowering) with `tokenizer=` (Vicuna's tokenizer.model). `python -m unimoe.main` with this config fine-tunes the release:
the stage `finetune` starts from the converted checkpoint (`config.pretrained.released`) with new
LoRA (r8, alpha 16) on the merged weights, training LoRA and routers as Uni-MoE's stage 3 does, on
the prepared `unimoe_json` sources `json_sources` (default uni_moe_speech) under `data_dir`, media
under `media_root`.

The evaluation defaults to the official protocol (`unimoe/eval/protocol.py`): each variant's
eval.py decoding per benchmark, weights loaded in float16 and the LM computed in bfloat16 (float16
for audio_4e), image preprocessing 'square' (CLIP resize + centre crop), speech cut into 30 s
chunks of 480000 samples taken every 480001 (`json_data.audio_chunk_gap=1`), BEATs clips into
chunks of 480000 with the last padded by its final sample, placeholder rows never generated.
Deviations we keep on purpose:
- Batched decoding (`--batch-size`, default 8) instead of one question at a time: answers are those
  of batch size 1 up to floating-point summation order (right padding with per-row lengths, one
  sampling stream per question), so a sampled answer is reproducible for a seed but never equal to
  PyTorch's draw.
- At most 20 audio chunks (10 minutes) per question for every variant, and a longer clip is an
  error naming the record: the 8E and audio code cut at 20 chunks silently, the v1 speech code
  has no limit.
- The vision and audio towers compute in float32 on the float16-rounded weights (the official code
  runs them in bfloat16); the LM follows the official dtype.
- The 8E model draws its second expert with Gumbel noise at inference, as the official code
  (`gumbel=False` in the config arg: argmax, deterministic answers); the noise is a JAX stream,
  so its draws, unlike the rest of decoding, depend on the batch a question is in.
- Clotho captioning (audio_4e) is beam sampling as transformers 5.x does it (`unimoe/eval/beam.py`);
  the official environment's transformers 4.31 divides a finished caption's score by the prompt
  length plus its own (not its own alone), which favours shorter captions for long prompts.
"""

import os

import ml_collections

from unimoe import config as config_lib
from unimoe.convert import released

_PAPER_4E = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'unimoe_paper_4e.py')


def _data(variant: str, model: dict) -> dict:
    """The media shapes of the released model: CLIP 336 px (576 tokens, video = 8 frames averaged),
    Whisper 30 s chunks of 80 mel bins, 50 tokens per chunk."""
    return dict(
        image_size=model['vision']['image_size'],
        n_image_tokens=(model['vision']['image_size'] // model['vision']['patch_size']) ** 2,
        n_video_tokens=(model['vision']['image_size'] // model['vision']['patch_size']) ** 2,
        num_frames=8,
        audio_frames=model['audio']['max_frames'],
        num_mel_bins=model['audio']['num_mel_bins'],
        n_audio_tokens=model['audio_conn']['num_queries'],
        seq_len=4096,
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(
        arg, variant='speech_4e', checkpoint='', gumbel=True, data_dir='', media_root='',
        json_sources='uni_moe_speech', tokenizer='',
    )  # fmt: skip
    if arg.variant not in config_lib.RELEASED_VARIANTS:
        raise ValueError(
            f"configs/unimoe_released.py: variant={arg.variant!r} is not one of "
            f"{config_lib.RELEASED_VARIANTS}"
        )
    c = config_lib.load_config(_PAPER_4E)
    model = released.model_section(arg.checkpoint) if arg.checkpoint else released.PAPER_MODEL[arg.variant]
    c.model = model
    if arg.variant == '8e':
        # DeepSpeed's gate draws the second expert at inference too (`gumbel=False`: argmax).
        c.model.moe.gumbel_at_inference = arg.gumbel
    c.tokenizer = arg.tokenizer or (
        os.path.join(arg.checkpoint, released.TOKENIZER_FILE) if arg.checkpoint else ''
    )
    c.pretrained = dict(released=arg.checkpoint)
    c.data.update(_data(arg.variant, model))
    c.json_data = dict(
        data_dir=arg.data_dir,
        media_root=arg.media_root,
        image_aspect='square',
        # Whisper chunks per record: 20 in the 8E (`_dp`) code; unlimited in the v1 speech code.
        max_audio_chunks=20,
        # 480001 samples per step, 480000 kept (Uni-MoE's speech eval.py and data.py).
        audio_chunk_gap=1,
    )
    if arg.variant == 'audio_4e':
        # Uni-MoE-audio hears every clip through BEATs: 480000-sample chunks, 128 mel bins, 20
        # chunks per file (`trunclen`); the benchmark's records are the source 'benchmark'.
        c.data.n_sound_tokens = model['sound_conn']['num_queries']
        c.json_data.update(
            sound_sources='benchmark', sound_chunk_samples=480_000, sound_mel_bins=128,
            max_sound_chunks=20,
        )  # fmt: skip
    c.stage_order = 'finetune'
    c.stages = ml_collections.ConfigDict()
    c.stages.finetune = config_lib.stage(
        trains='lora+router',
        tasks='',
        steps=1000,
        learning_rate=4e-5,
        batch_size=8,
        warmup_fraction=0.03,
        json_sources=arg.json_sources,
        moe=True,
        lora_rank=8,
        frozen_in_compute_dtype=True,
    )
    c.eval = dict(
        stages='', tasks='', batch_size=8, max_new_tokens=512, protocol='official',
        released_variant=arg.variant,
    )  # fmt: skip
    return c
