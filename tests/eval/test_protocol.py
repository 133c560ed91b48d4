"""The official protocol's decoding per variant and benchmark, read off each variant's eval.py."""

import pytest

from unimoe.eval import benchmarks, protocol
from unimoe.eval.generate import SamplingConfig

GREEDY_512 = protocol.Decoding(SamplingConfig(), max_new_tokens=512)
SAMPLED_1024 = protocol.Decoding(SamplingConfig(temperature=0.2, top_k=50), max_new_tokens=1024)
BEAM_SAMPLED = protocol.Decoding(
    SamplingConfig(temperature=1.0, top_k=50), max_new_tokens=512, num_beams=5, min_new_tokens=10
)


@pytest.mark.parametrize(
    "variant, benchmark, expected",
    [
        # Speech and 8E: greedy only where --data_type contains 'vqa' or 'mmbench'.
        ("speech_4e", "textvqa", GREEDY_512),
        ("speech_4e", "mmbench", GREEDY_512),
        ("speech_4e", "activitynet_qa", SAMPLED_1024),
        ("speech_4e", "clothoaqa", SAMPLED_1024),
        ("8e", "pope", GREEDY_512),
        ("8e", "activitynet_qa", SAMPLED_1024),
        # Audio: the if-chain ends with `if 'clothov' ... else: T=0.2`, so VQA is sampled too and
        # 'clothoaqa''s own beam settings are overwritten.
        ("audio_4e", "textvqa", SAMPLED_1024),
        ("audio_4e", "mmbench", SAMPLED_1024),
        ("audio_4e", "clothoaqa", SAMPLED_1024),
        ("audio_4e", "clotho", BEAM_SAMPLED),
    ],
)
def test_official_decoding(variant, benchmark, expected):
    assert protocol.official_decoding(variant, benchmark) == expected


def test_every_benchmark_has_an_official_data_type():
    assert sorted(protocol.OFFICIAL_DATA_TYPE) == sorted(benchmarks.BENCHMARKS)


def test_generation_config_sets_what_the_scripts_leave_unset():
    decoding = protocol.official_decoding(
        "speech_4e", "activitynet_qa", {"temperature": 0.9, "top_p": 0.6, "top_k": 0}, seed=3
    )
    # The script's temperature wins; top_p and top_k come from the base model's file.
    assert decoding.sampling == SamplingConfig(temperature=0.2, top_p=0.6, top_k=0, seed=3)


def test_the_official_protocol_needs_a_released_variant():
    with pytest.raises(ValueError, match="released_variant"):
        protocol.official_decoding("", "textvqa")
