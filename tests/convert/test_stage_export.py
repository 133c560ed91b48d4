"""`python -m unimoe.convert to-hf WORKDIR/STAGE OUT`: a finished stage as Hugging Face folders that
transformers runs to our logits and `from-hf` reads back to the stage's parameters."""

import json
import pathlib

import numpy as np
import pytest
import transformers
from flax import nnx
from safetensors.numpy import load_file

from tests.convert.stages import logits_diff, stage_model, write_stage
from tests.tiny_model import random_module
from unimoe import config as config_lib, factory
from unimoe.checkpoint import Checkpointer, path_str
from unimoe.convert import core, parity, stage as stage_export
from unimoe.convert.cli import main
from unimoe.convert.families import Options
from unimoe.data import builtin
from unimoe.experiment import from_config_dict
from unimoe.models.llm import LLMConfig
from unimoe.moe.config import MoEConfig

TINY = pathlib.Path(__file__).parents[2] / "configs" / "unimoe_tiny.py"
# Adapters whose B is not zero, as after training; the scale is the tiny recipe's alpha / rank.
LORA_RANK = 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
    """A workdir of the tiny recipe (its config.json and built-in tokenizer) with two finished
    stages of random weights: s3_moe (MoE in every layer, LoRA) and s0_llm (only the LM defined)."""
    workdir = tmp_path_factory.mktemp("stage_export") / "run"
    config = config_lib.load_config(f"{TINY}:mode=test")
    config.data.data_dir = str(workdir.parent / "data")
    config.model.lora.dropout = 0.0  # `random_module` holds Params only
    config.model.sound_conn.update(dropout_rate=0.0, attention_dropout_rate=0.0)
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    tokenizer = builtin.load_or_train_tokenizer(workdir.parent / "data" / builtin.TOKENIZER_FILE)
    experiment = from_config_dict(config)
    for name, moe, lora_rank, seed in (("s3_moe", True, LORA_RANK, 0), ("s0_llm", False, 0, 1)):
        model = random_module(
            lambda: factory.build_model(
                experiment.model, tokenizer, moe=moe, lora_rank=lora_rank, seed=seed
            ),
            seed=seed,
        )
        paths = [path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
        defined = paths if moe else [p for p in paths if p.startswith("llm/")]
        write_stage(workdir, name, model, defined)
    return workdir


@pytest.fixture(scope="module")
def moe_export(workdir, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("moe_export") / "hf"
    assert main(["to-hf", str(workdir / "s3_moe"), str(out)]) == 0
    return out


def _merged(params: dict, kernel: str, a: str, b: str, subscripts: str) -> np.ndarray:
    """kernel + A @ B * alpha / rank, per expert for the banks (the adapter's update, by hand)."""
    scale = 16.0 / LORA_RANK
    return params[kernel] + np.einsum(subscripts, params[a], params[b]) * scale


def test_moe_stage_exports_as_mixtral_with_lora_merged(workdir, moe_export, tmp_path):
    assert json.loads((moe_export / "llm" / "config.json").read_text())["model_type"] == "mixtral"
    diff = logits_diff(stage_model(workdir, "s3_moe"), moe_export / "llm")
    assert diff <= 1e-4, diff
    # from-hf reads the folder back: the stage's weights, each adapter folded into its kernel.
    assert main(["from-hf", str(moe_export / "llm"), str(tmp_path / "back")]) == 0
    back = core.load(tmp_path / "back").params
    params, _ = Checkpointer(workdir / "s3_moe" / "checkpoints").final_params()
    layer = "llm/layers/1"
    expected = {
        f"{layer}/attn/q/kernel": _merged(
            params, f"{layer}/attn/q/kernel", f"{layer}/attn/q/lora_a", f"{layer}/attn/q/lora_b",
            "dr,rf->df",
        ),
        f"{layer}/ffn/experts/w_down_efd": _merged(
            params,
            f"{layer}/ffn/experts/w_down_efd",
            f"{layer}/ffn/experts/lora_down_a_efr",
            f"{layer}/ffn/experts/lora_down_b_erd",
            "efr,erd->efd",
        ),
    }
    for path, value in expected.items():
        np.testing.assert_allclose(back[path], value, rtol=0, atol=1e-6, err_msg=path)
        assert np.abs(value - params[path]).max() > 1e-2  # the adapter did change the kernel
    for path in ("llm/embed/embedding", f"{layer}/ffn/router/kernel", "llm/lm_head/kernel"):
        np.testing.assert_array_equal(back[path], params[path], err_msg=path)
    assert not any("lora" in path for path in back)


@pytest.mark.parametrize(
    "tower, options", [("vision", Options(select_layer=-2)), ("audio", Options(num_queries=8))]
)
def test_towers_match_transformers_and_read_back_exactly(workdir, moe_export, tower, options):
    diffs = parity.parity(moe_export / tower, options)
    assert max(diffs.values()) <= 1e-4, diffs
    back = core.read_hf(moe_export / tower, options).params
    params, _ = Checkpointer(workdir / "s3_moe" / "checkpoints").final_params()
    assert back and all(path.split("/")[0] in ("vision", "audio", "audio_conn") for path in back)
    for path, value in back.items():
        np.testing.assert_array_equal(value, params[path], err_msg=path)


def test_extras_readme_and_tokenizer(workdir, moe_export):
    extras = load_file(moe_export / stage_export.EXTRA_FILE)
    params, _ = Checkpointer(workdir / "s3_moe" / "checkpoints").final_params()
    # The tiny recipe's connector has the encoder's width: no enc_proj.
    no_hf_counterpart = (
        "image_proj/",
        "image_head/",
        "audio_head/",
        "audio_conn/query_tokens",
        "audio_conn/out_proj/",
        "sound/",  # the sound tower: BEATs and its Q-Former
        "sound_conn/",
        "sound_head/",
    )
    expected = {p for p in params if p.startswith(no_hf_counterpart)}
    assert set(extras) == expected
    for path, value in extras.items():
        np.testing.assert_array_equal(value, params[path], err_msg=path)
    readme = (moe_export / stage_export.README_FILE).read_text()
    assert "MixtralForCausalLM with its LoRA (rank 8) merged" in readme
    assert "`audio_conn/query_tokens`" in readme and "`image_proj/`" in readme
    assert "`sound/`: sound tower: BEATs" in readme
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(moe_export / "llm")
    ours = builtin.experiment_tokenizer("", workdir.parent / "data", on_missing="error")
    text = "USER: <image> what is red? ASSISTANT: a ball</s>"
    assert hf_tokenizer.encode(text, add_special_tokens=False) == ours.encode(text)


def test_dense_stage_exports_only_what_it_defined(workdir, tmp_path):
    out = tmp_path / "hf"
    assert main(["to-hf", str(workdir / "s0_llm"), str(out)]) == 0
    assert json.loads((out / "llm" / "config.json").read_text())["model_type"] == "llama"
    assert logits_diff(stage_model(workdir, "s0_llm"), out / "llm") <= 1e-4
    # Its towers and connectors are the random init: not exported.
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "llm"]
    assert "`vision/`: not written" in (out / "README.md").read_text()


def test_an_lm_without_hf_counterpart_is_refused_naming_each_setting():
    lm = dict(vocab_size=10, dim=8, num_layers=2, num_heads=2, num_kv_heads=1, ffn_dim=8)
    assert stage_export.hf_lm_family(LLMConfig(**lm)) == "llama"
    assert stage_export.hf_lm_family(LLMConfig(**lm, moe_layers=(0, 1))) == "mixtral"
    moe = MoEConfig(router="softmax_topk", num_shared_experts=1)
    with pytest.raises(
        ValueError,
        match=r"MoE in layers \[0\] of 2; config\.model\.moe\.router='softmax_topk'; "
        r"config\.model\.moe\.num_shared_experts=1$",
    ):
        stage_export.hf_lm_family(LLMConfig(**lm, moe_layers=(0,), moe=moe))


def test_a_trained_recipe_stage_exports(tiny_recipe_run, tmp_path):
    """The stage `python -m unimoe.main` trained (its workdir's config.json, DONE.json and
    tokenizer as written by the run), not a built one. The session trains it anyway."""
    _, workdir, _ = tiny_recipe_run
    out = tmp_path / "hf"
    assert main(["to-hf", str(workdir / "s3_moe"), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "audio", "llm", stage_export.EXTRA_FILE, "vision"
    ]
    assert logits_diff(stage_model(workdir, "s3_moe"), out / "llm") <= 1e-4
