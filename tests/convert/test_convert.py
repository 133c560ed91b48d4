"""HF folder -> orbax checkpoint -> HF folder round trips, parity with transformers, bad input."""

import argparse
import json
import pathlib
import runpy
import sys
from unittest import mock

import numpy as np
import pytest
import torch

from tests.convert import hf_models
from unimoe.convert import core, hf_io, parity
from unimoe.convert.cli import main, parse_size
from unimoe.convert.families import Options
from unimoe.checkpoint import Checkpointer

# The tiny Whisper decoder has 20 positions; the connector keeps 7 of them as query positions.
OPTIONS = {"whisper": Options(num_queries=7)}


def _cli_options(name: str) -> list[str]:
    return ["--num-queries", "7"] if name == "whisper" else []


def assert_same_folder(expected_dir: pathlib.Path, actual_dir: pathlib.Path) -> None:
    """Same config.json and the same tensors: names, dtypes and bits."""
    assert hf_io.read_config(actual_dir) == hf_io.read_config(expected_dir)
    expected, actual = hf_io.read_tensors(expected_dir), hf_io.read_tensors(actual_dir)
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        np.testing.assert_array_equal(actual[name], tensor, err_msg=name)


@pytest.mark.parametrize("name", sorted(hf_models.BUILDERS))
def test_round_trip_is_exact_and_outputs_match_transformers(name, tmp_path):
    hf_dir = hf_models.save(name, tmp_path / "hf")
    ckpt_dir = tmp_path / "ckpt"
    assert main(["from-hf", str(hf_dir), str(ckpt_dir), *_cli_options(name)]) == 0
    # The checkpoint is a finished-stage orbax directory listing what it defines.
    with Checkpointer(ckpt_dir) as ckpt:
        assert ckpt.all_steps() == [0]
        defined = ckpt.read_done()["defined_params"]
    assert defined == sorted(core.load(ckpt_dir).params)

    assert main(["to-hf", str(ckpt_dir), str(tmp_path / "back"), "--max-shard-size", "0"]) == 0
    assert_same_folder(hf_dir, tmp_path / "back")

    diffs = parity.parity(hf_dir, OPTIONS.get(name, Options()))
    assert diffs and max(diffs.values()) < parity.TOLERANCE, diffs


def test_sharded_folders_with_index_in_and_out(tmp_path):
    hf_dir = hf_models.save("qwen2_moe", tmp_path / "hf", max_shard_size="40KB")
    assert (hf_dir / hf_io.INDEX_FILE).is_file()
    assert len(set(hf_io.tensor_files(hf_dir).values())) > 1
    core.from_hf(hf_dir, tmp_path / "ckpt")
    files = core.to_hf(tmp_path / "ckpt", tmp_path / "back", max_shard_bytes=parse_size("30KB"))
    assert len(files) > 1 and (tmp_path / "back" / hf_io.INDEX_FILE).is_file()
    assert_same_folder(hf_dir, tmp_path / "back")
    # transformers reads the re-exported shards back to the same outputs.
    assert max(parity.parity(tmp_path / "back").values()) < parity.TOLERANCE


def test_bfloat16_checkpoint_round_trips_in_bfloat16(tmp_path):
    torch.manual_seed(0)
    model = hf_models.llama().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    assert str(hf_io.read_tensors(tmp_path / "hf")["model.norm.weight"].dtype) == "bfloat16"
    core.from_hf(tmp_path / "hf", tmp_path / "ckpt")
    # Stored as read (half the size of float32); modules cast when they load it.
    assert str(core.load(tmp_path / "ckpt").params["llm/final_norm/scale"].dtype) == "bfloat16"
    core.to_hf(tmp_path / "ckpt", tmp_path / "back")
    assert_same_folder(tmp_path / "hf", tmp_path / "back")


def test_parity_command_exit_status(tmp_path, capsys):
    hf_dir = hf_models.save("llama", tmp_path / "hf")
    assert main(["parity", str(hf_dir)]) == 0
    assert "PASS" in capsys.readouterr().out
    # float32 rounding alone differs by ~1e-6, so a zero tolerance must fail, with the exit status
    # of `python -m unimoe.convert` (run in-process: a fresh interpreter costs seconds).
    argv = ["unimoe.convert", "parity", str(hf_dir), "--tolerance", "0"]
    with mock.patch.object(sys, "argv", argv), pytest.raises(SystemExit) as exit_info:
        runpy.run_module("unimoe.convert", run_name="__main__")
    assert exit_info.value.code == 1
    assert "FAIL: max abs diff" in capsys.readouterr().out


def test_parity_catches_a_wrong_rope(tmp_path):
    """The same weights read with RoPE scaling dropped from config.json fail parity against
    transformers run with the scaling: the comparison sees RoPE, so the scaled variants are real."""
    hf_dir = hf_models.save("llama_rope_linear", tmp_path / "hf")
    conv = core.read_hf(hf_dir)
    assert conv.configs["llm"].rope_scaling.rope_type == "linear"
    plain = tmp_path / "plain"
    config = hf_io.read_config(hf_dir)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500.0}
    hf_io.write_folder(plain, config, hf_io.read_tensors(hf_dir))
    unscaled = core.read_hf(plain)
    scaled_diff = parity._lm(conv, hf_dir, np.random.default_rng(0))["logits"]
    wrong_diff = parity._lm(unscaled, hf_dir, np.random.default_rng(0))["logits"]
    assert scaled_diff < parity.TOLERANCE < wrong_diff


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> tuple[dict, dict]:
    hf_dir = hf_models.save("llama", tmp_path_factory.mktemp("llama"))
    return hf_io.read_config(hf_dir), hf_io.read_tensors(hf_dir)


def _write(out_dir: pathlib.Path, config: dict, tensors: dict) -> pathlib.Path:
    hf_io.write_folder(out_dir, config, tensors)
    return out_dir


def test_unknown_model_type_names_the_config(llama_folder, tmp_path):
    config, tensors = llama_folder
    hf_dir = _write(tmp_path / "hf", {**config, "model_type": "gpt2"}, tensors)
    with pytest.raises(ValueError, match=r"config\.json: model_type 'gpt2' is not supported"):
        core.read_hf(hf_dir)


def test_missing_tensor_names_the_folder_and_tensor(llama_folder, tmp_path):
    config, tensors = llama_folder
    missing = "model.layers.1.mlp.up_proj.weight"
    hf_dir = _write(tmp_path / "hf", config, {k: v for k, v in tensors.items() if k != missing})
    with pytest.raises(ValueError, match=rf"{hf_dir}: tensor '{missing}' is missing"):
        core.read_hf(hf_dir)


def test_index_naming_an_absent_shard_names_the_index(llama_folder, tmp_path):
    config, tensors = llama_folder
    hf_dir = _write(tmp_path / "hf", config, tensors)
    index = {"weight_map": {name: "model-00001-of-00002.safetensors" for name in tensors}}
    (hf_dir / hf_io.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"index\.json: tensor .* is in .*00001-of-00002"):
        core.read_hf(hf_dir)


def test_wrong_shape_names_the_file_and_tensor(llama_folder, tmp_path):
    config, tensors = llama_folder
    hf_dir = _write(tmp_path / "hf", {**config, "intermediate_size": 84}, tensors)
    with pytest.raises(
        ValueError,
        match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape "
        r"\(80, 96\), but config\.json implies \(84, 96\)",
    ):
        core.read_hf(hf_dir)


def test_unexpected_tensor_names_the_file_and_tensor(llama_folder, tmp_path):
    config, tensors = llama_folder
    extra = {**tensors, "model.layers.0.mlp.adapter.weight": np.zeros((2, 2), np.float32)}
    hf_dir = _write(tmp_path / "hf", config, extra)
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.adapter\.weight'"):
        core.read_hf(hf_dir)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_type 'yarn'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_unsupported_llama_variants_fail_clearly(llama_folder, tmp_path, override, message):
    config, tensors = llama_folder
    hf_dir = _write(tmp_path / "hf", {**config, **override}, tensors)
    with pytest.raises(ValueError, match=message):
        core.read_hf(hf_dir)


def test_whisper_encoder_positions_must_be_the_sinusoids(tmp_path):
    hf_dir = hf_models.save("whisper", tmp_path / "hf")
    tensors = hf_io.read_tensors(hf_dir)
    tensors["model.encoder.embed_positions.weight"] = (
        tensors["model.encoder.embed_positions.weight"] + 0.1
    )
    bad = _write(tmp_path / "bad", hf_io.read_config(hf_dir), tensors)
    with pytest.raises(ValueError, match=r"embed_positions\.weight' is not Whisper's sinusoid"):
        core.read_hf(bad, OPTIONS["whisper"])


def test_from_hf_refuses_to_overwrite(llama_folder, tmp_path):
    config, tensors = llama_folder
    hf_dir = _write(tmp_path / "hf", config, tensors)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        core.from_hf(hf_dir, tmp_path / "out")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("30KB") == 30_000
    assert parse_size("1000") == 1000 and parse_size("0") == 0 and parse_size("2M") == 2 * 10**6
    with pytest.raises(argparse.ArgumentTypeError, match="not like 5GB"):
        parse_size("5 gigs")
