"""How a benchmark is decoded: the official Uni-MoE evaluation protocol, or this project's.

'official' reproduces the `eval.py` of the released model's variant (github.com/HITsz-TMG/Uni-MoE:
`Uni_MoE/Uni_MoE_speech/eval.py` for speech_4e, `Uni_MoE/Uni_MoE_audio/eval.py` for audio_4e,
`Uni_MoE/Uni_MoE_8e/Uni_MoE_speech/eval.py` for 8e). Each script picks Hugging Face `generate`
arguments from its `--data_type` string, with an if-chain whose fall-through matters:
- speech_4e, 8e: greedy with 512 new tokens when the type contains 'vqa' or 'mmbench'; otherwise
  sampling at T=0.2 with 1024 ('video' sets the same values first, and the final else re-sets them);
- audio_4e: the chain ends `if 'clothov' ...: beam sampling, else: T=0.2`, so every type but
  'clothov*' is sampled at T=0.2 with 1024 tokens, VQA and MMBench included; 'clothov*' uses beam
  sampling (5 beams, T=1, 10 to 512 new tokens).
Sampling uses Hugging Face's defaults for what the script leaves unset (top_k 50, top_p 1.0), which
the base model's `generation_config.json` (copied by `convert from-unimoe`) may override; its
temperature never does (each script passes one).

Each script evaluates one question at a time (batch size 1). We batch, and keep the answers of
batch size 1: prompts are right-padded with per-row lengths, and each question samples from its own
stream (keyed by its index in the file), so neither padding nor batch composition changes an answer.

'ours' is this project's decoding for its own stages: greedy (video QA at T=0.2, as
`benchmarks.Benchmark.temperature`) with `--max-new-tokens` (default 16) and no top-k.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from unimoe import config as config_lib
from unimoe.eval import benchmarks
from unimoe.eval.generate import SamplingConfig

PROTOCOLS = config_lib.EVAL_PROTOCOLS
VARIANTS = config_lib.RELEASED_VARIANTS

# The `--data_type` the official scripts are run with per benchmark. Their help names 'vqa',
# 'mmbench', 'video', 'clothoaqa' and 'clothov1/2'; the image benchmarks scored by exact answers
# (POPE, SEED, MM-Vet) and the speech multiple-choice sets run as 'vqa' here (our reading: their
# answers are a word or a letter, which the scripts decode greedily only under 'vqa').
OFFICIAL_DATA_TYPE = {
    "vqav2": "vqa",
    "okvqa": "vqa",
    "aokvqa": "vqa",
    "textvqa": "vqa",
    "pope": "vqa",
    "seed": "vqa",
    "mmvet": "vqa",
    "race": "vqa",
    "english_listening": "vqa",
    "mmbench": "mmbench",
    "activitynet_qa": "video",
    "clothoaqa": "clothoaqa",
    "clotho": "clothov1",
}
# Hugging Face `generate`'s sampling defaults when neither the call nor generation_config sets them.
HF_TOP_K = 50
HF_TOP_P = 1.0
# The dtype each official eval.py runs the model in: weights loaded in float16
# (`load_all_pretrained_model`), then `model.bfloat16()` in the speech and 8E scripts; the audio
# script keeps float16.
OFFICIAL_DTYPE = {"speech_4e": "bfloat16", "8e": "bfloat16", "audio_4e": "float16"}


@dataclasses.dataclass(frozen=True)
class Decoding:
    """One benchmark's decoding: the sampling, the answer length, and beams (1: none)."""

    sampling: SamplingConfig
    max_new_tokens: int
    num_beams: int = 1
    min_new_tokens: int = 0


def _hf_sampling(
    temperature: float, generation_config: Mapping[str, Any], seed: int
) -> SamplingConfig:
    return SamplingConfig(
        temperature=temperature,
        top_k=int(generation_config.get("top_k", HF_TOP_K) or 0),
        top_p=float(generation_config.get("top_p", HF_TOP_P) or HF_TOP_P),
        seed=seed,
    )


def official_decoding(
    variant: str,
    benchmark: str,
    generation_config: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> Decoding:
    """The decoding the variant's official eval.py uses for `benchmark` (module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(
            f"the official protocol is the eval.py of a released Uni-MoE variant, one of "
            f"{VARIANTS}; got {variant!r} (set config.eval.released_variant, or pass "
            "--protocol=ours)"
        )
    data_type = OFFICIAL_DATA_TYPE[benchmarks.get(benchmark).name]
    generation_config = generation_config or {}
    if variant == "audio_4e":
        if "clothov" in data_type:
            return Decoding(
                _hf_sampling(1.0, generation_config, seed),
                max_new_tokens=512,
                num_beams=5,
                min_new_tokens=10,
            )
        return Decoding(_hf_sampling(0.2, generation_config, seed), max_new_tokens=1024)
    if "vqa" in data_type or "mmbench" in data_type:
        return Decoding(SamplingConfig(), max_new_tokens=512)
    return Decoding(_hf_sampling(0.2, generation_config, seed), max_new_tokens=1024)


def ours_decoding(
    benchmark: str,
    *,
    max_new_tokens: int,
    temperature: float | None = None,
    top_p: float = 1.0,
    seed: int = 0,
) -> Decoding:
    """This project's decoding: the benchmark's temperature unless one is given."""
    bench = benchmarks.get(benchmark)
    return Decoding(
        SamplingConfig(
            temperature=bench.temperature if temperature is None else temperature,
            top_p=top_p,
            seed=seed,
        ),
        max_new_tokens=max_new_tokens,
    )
