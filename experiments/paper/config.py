r"""The rows of Uni-MoE's Table 9 that this codebase trains, at paper scale, on Uni-MoE JSON data.

  python -m unimoe.main --workdir=runs/paper/moe_task4_8e_aux --config=experiments/paper/config.py:\
row=moe_task4_8e_aux,vicuna=ckpt/vicuna,clip=ckpt/clip,whisper=ckpt/whisper,\
tokenizer=ckpt/vicuna/tokenizer.model,data_dir=data/unimoe_json,media_root=data/media

The model, the pretrained sources and stage 1 are `configs/unimoe_paper_4e.py`'s; this file sets
per row the data (prepared `unimoe_json` datasets, README.md), the stage-2 experts, the expert
count, the router, the balance loss and the stage-3 schedule of the Uni-MoE paper and its training scripts: AdamW lr 4e-5,
cosine, warmup 3 %, weight decay 0, LoRA r8 / alpha 16 / dropout 0.05 on attention and experts,
max length 2048, global batch 8 (4E) or 64 (8E), 2 epochs (10 for MoE-Task3). Steps are epochs x
records / batch with the record counts below (`records=N` overrides them for your copy of the
data). Stage-1/2 schedules are not published: they keep the base config's choices.

Which stage-2 model is which expert follows issue #26 of the Uni-MoE repo:
4E speech = {LLaVA-1.5 FFN, short-speech expert, image expert, long-speech expert}; 8E = audio
caption, Vicuna, LLaVA, short speech, image, long speech, LLaVA, long speech. "Vicuna's FFN" is the
pretrained LM's, i.e. `s1_align`'s (stage 1 trains only connectors). The single-modality rows'
numbering (Task2 / 5 / 6) is mapped to stages by their modalities, an inference.
"""

import dataclasses
import math
import pathlib

import ml_collections

from unimoe import config as config_lib

BASE_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "unimoe_paper_4e.py"

# Stage-2 experts: stage name -> (unimoe_json sources, what they hold).
EXPERT_STAGES = {
    "s2_llava": ("llava_v1_5_mix665k", "LLaVA-v1.5-mix-665K: the LLaVA-1.5 FFN"),
    "s2_image": ("llava_instruct_150k", "LLaVA-Instruct-150K image instructions"),
    "s2_speech_short": ("image_speech_qa", "LLaVA-150K questions spoken (TTS) with the image"),
    "s2_speech_long": ("race_librispeech", "RACE articles spoken + LibriSpeech long speech"),
    "s2_audiocap": ("audio_caption", "WavCaps, AudioCaps, Clotho captions and ClothoAQA"),
}
VICUNA = "s1_align"  # the pretrained LM's FFN, unchanged by stage 1
EXPERTS_4E_SPEECH = ("s2_llava", "s2_speech_short", "s2_image", "s2_speech_long")
EXPERTS_4E_AUDIO = ("s2_llava", "s2_audiocap", "s2_image", "s2_speech_long")
EXPERTS_8E = (
    "s2_audiocap", VICUNA, "s2_llava", "s2_speech_short",
    "s2_image", "s2_speech_long", "s2_llava", "s2_speech_long",
)  # fmt: skip
# Stage-3 mixtures (Uni-MoE's training recipe): Uni_MoE_Speech.json / Uni_MoE_Cap.json hold 453K records.
UMOE_SPEECH, UMOE_CAP, MIX665K = "uni_moe_speech", "uni_moe_cap", "llava_v1_5_mix665k"
# MoE-Task4 trains on the speech set and 665K as one file: batches in proportion to their sizes.
TASK4_WEIGHTS = (453_000, 665_000)


@dataclasses.dataclass(frozen=True)
class Row:
    title: str  # as in Table 9
    eval_stage: str  # the stage whose model the row reports
    experts: tuple[str, ...] = ()  # stage-3 expert sources (empty: a dense stage-2 row)
    sources: tuple[str, ...] = ()  # stage-3 unimoe_json datasets
    records: int = 0  # stage-3 records per epoch (sum over sources)
    weights: tuple[int, ...] = ()  # batches drawn per source in this ratio (() = equal)
    epochs: int = 2
    balance_coef: float = 0.0  # the 4E code has no aux loss; "+ Aux_loss" rows and 8E use 0.01
    audio_model: bool = False  # Uni-MoE-audio's layout (`audio_layout`)

    @property
    def num_experts(self) -> int:
        return len(self.experts)


ROWS = {
    "expert_task2": Row("Single-Modality-Expert-Task2 (I,T)", "s2_image"),
    "expert_task5": Row("Single-Modality-Expert-Task5 (I,T,S)", "s2_speech_short"),
    "expert_task6": Row("Single-Modality-Expert-Task6 (I,T,S)", "s2_speech_long"),
    "moe_task1_4e": Row(
        "Uni-MoE MoE-Task1 4E (I,T,S)", "s3_moe", EXPERTS_4E_SPEECH,
        ("llava_instruct_150k", "image_speech_qa", "race_librispeech"), 453_000,
    ),
    "moe_task2_4e": Row(
        "Uni-MoE MoE-Task2 4E (I,T,S,V)", "s3_moe", EXPERTS_4E_SPEECH, (UMOE_SPEECH,), 453_000
    ),
    "moe_task3_4e": Row(
        "Uni-MoE MoE-Task3 4E (I,T,A,V)", "s3_moe", EXPERTS_4E_AUDIO, (UMOE_CAP,), 453_000,
        epochs=10, audio_model=True,
    ),
    "moe_task4_4e": Row(
        "Uni-MoE MoE-Task4 4E (I,T,S,V)", "s3_moe", EXPERTS_4E_SPEECH, (UMOE_SPEECH, MIX665K),
        1_118_000, TASK4_WEIGHTS,
    ),
    "moe_task4_4e_aux": Row(
        "Uni-MoE MoE-Task4 4E (I,T,S,V) + Aux_loss", "s3_moe", EXPERTS_4E_SPEECH,
        (UMOE_SPEECH, MIX665K), 1_118_000, TASK4_WEIGHTS, balance_coef=0.01,
    ),
    "moe_task4_8e": Row(
        "Uni-MoE MoE-Task4 8E (I,T,S,V)", "s3_moe", EXPERTS_8E, (UMOE_SPEECH, MIX665K), 1_118_000,
        TASK4_WEIGHTS,
    ),
    "moe_task4_8e_aux": Row(
        "Uni-MoE MoE-Task4 8E (I,T,S,V) + Aux_loss", "s3_moe", EXPERTS_8E,
        (UMOE_SPEECH, MIX665K), 1_118_000, TASK4_WEIGHTS, balance_coef=0.01,
    ),
}  # fmt: skip


# BEATs_iter3+ (AS2M), the cfg its published file carries (`convert from-beats` reads the file's
# own; these are what the model is built with): deep norm, gated relative positions.
BEATS_ITER3_AS2M = dict(
    input_patch_size=16, embed_dim=512, conv_bias=False, encoder_layers=12, encoder_embed_dim=768,
    encoder_ffn_embed_dim=3072, encoder_attention_heads=12, activation_fn="gelu",
    layer_norm_first=False, deep_norm=True, conv_pos=128, conv_pos_groups=16,
    relative_position_embedding=True, num_buckets=320, max_distance=800, gru_rel_pos=True,
    num_mel_bins=128,
)
# Uni-MoE-audio's Q-Former (blip2_config.py): BLIP-2's, 50 queries, cross-attention every 2nd layer.
SOUND_QFORMER = dict(
    num_queries=50, width=768, depth=12, num_heads=12, mlp_dim=3072, cross_attention_every=2
)


def audio_layout(c: ml_collections.ConfigDict, beats: str) -> None:
    """Uni-MoE-audio (`Uni_MoE/Uni_MoE_audio`): every source's audio through BEATs (Kaldi fbank,
    30-s chunks of 480000 samples, at most 20 per file) and its Q-Former, MoE on the even layers
    (16 of 32), LoRA on the dense FFNs of the odd ones too (peft on every linear of the LM)."""
    c.model.sound = dict(BEATS_ITER3_AS2M)
    c.model.sound_conn = dict(SOUND_QFORMER)
    c.data.n_sound_tokens = SOUND_QFORMER["num_queries"]
    c.pretrained.sound = beats
    c.model.moe_layers = "every_2"
    c.model.lora.dense_ffn = True
    sources = sorted(
        {s for stage in c.stages.values() for s in stage.json_sources.split(",") if s}
    )
    c.json_data.update(
        sound_sources=",".join(sources), sound_chunk_samples=480_000, sound_mel_bins=128,
        max_sound_chunks=20,
    )  # fmt: skip


def _stage2(base: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    stage = ml_collections.ConfigDict(base.stages.s2_image.to_dict())
    stage.json_sources = EXPERT_STAGES[name][0]
    stage.tasks = ""
    return stage


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(
        arg,
        row="moe_task4_4e",
        vicuna="",
        clip="",
        whisper="",
        tokenizer="",
        data_dir="",
        media_root="",
        records=0,
        beats="",
    )
    if arg.row not in ROWS:
        raise ValueError(f"row={arg.row!r}; known rows: {sorted(ROWS)}")
    row = ROWS[arg.row]
    c = config_lib.load_config(
        f"{BASE_CONFIG}:vicuna={arg.vicuna},clip={arg.clip},whisper={arg.whisper},"
        f"tokenizer={arg.tokenizer}"
    )
    c.json_data = dict(
        data_dir=arg.data_dir, media_root=arg.media_root or None, on_error="raise", worker_count=8
    )
    c.stages.s1_align.json_sources = "alignment"
    c.stages.s1_align.tasks = ""
    moe_stage = c.stages.s3_moe
    stages = ml_collections.ConfigDict({"s1_align": c.stages.s1_align})
    needed = (row.eval_stage,) if not row.experts else row.experts
    order = ["s1_align"] + list(dict.fromkeys(s for s in needed if s in EXPERT_STAGES))
    for name in order[1:]:
        stages[name] = _stage2(c, name)
    if row.experts:
        batch = 64 if row.num_experts == 8 else 8
        records = arg.records or row.records
        steps = math.ceil(records * row.epochs / batch)
        stage3 = config_lib.stage(
            trains=moe_stage.trains,
            tasks=(),
            steps=steps,
            learning_rate=4e-5,
            warmup_fraction=0.03,
            batch_size=batch,
            init_from=("s1_align",),
            experts_from=row.experts,
            moe=True,
            lora_rank=8,
            balance_coef=row.balance_coef,
        )
        stage3.json_sources = ",".join(row.sources)
        stage3.json_weights = ",".join(str(w) for w in row.weights)
        stages.s3_moe = stage3
        order.append("s3_moe")
        c.model.moe.num_experts = row.num_experts
        if row.num_experts == 8:
            # 8E (DeepSpeed-MoE): softmax over all experts, top-2 renormalized, Gumbel 2nd choice.
            c.model.moe.router = "softmax_topk"
            c.model.moe.second_choice = "gumbel"
    c.stages = stages
    c.stage_order = ",".join(order)
    if row.audio_model:
        audio_layout(c, arg.beats)
    c.eval.stages = ""  # the built-in evaluation; benchmarks run with `python -m unimoe.eval`
    c.paper = dict(row=arg.row, title=row.title, eval_stage=row.eval_stage)
    return c
