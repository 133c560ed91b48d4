"""A researcher's mistakes on `python -m unimoe.convert` end with one line naming the path and what
to do, exit code 2, and no traceback (`--debug` shows it), as on `python -m unimoe.main`."""

import json
import subprocess
import sys

import numpy as np
import pytest

from unimoe.convert import hf_io
from unimoe.convert.cli import main

LLAMA_CONFIG = dict(
    model_type="llama",
    vocab_size=11,
    hidden_size=8,
    intermediate_size=12,
    num_hidden_layers=1,
    num_attention_heads=2,
)


def _folder(path, config=None, files=()):
    """A folder with `config` as its config.json and each of `files` (name -> bytes)."""
    path.mkdir()
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    for name, data in dict(files).items():
        (path / name).write_bytes(data)
    return path


def _truncated(tmp_path) -> bytes:
    """The first 5000 bytes of a 16 KB safetensors file."""
    hf_io.write_folder(tmp_path / "whole", {}, {"w": np.ones((64, 64), np.float32)})
    return (tmp_path / "whole" / hf_io.SINGLE_FILE).read_bytes()[:5000]


CASES = {
    "missing_folder": (
        lambda tmp: ["from-hf", f"{tmp}/nope", f"{tmp}/out"],
        "error: {tmp}/nope is not a folder: give a Hugging Face model folder (config.json and "
        "safetensors, as `save_pretrained` writes it)",
    ),
    "no_config": (
        lambda tmp: ["from-hf", str(_folder(tmp / "hf")), f"{tmp}/out"],
        "error: {tmp}/hf/config.json is missing, so {tmp}/hf is not a Hugging Face model folder: "
        "it needs the config.json `save_pretrained` writes beside the weights",
    ),
    "unsupported_model_type": (
        lambda tmp: ["from-hf", str(_folder(tmp / "hf", {"model_type": "gpt2"})), f"{tmp}/out"],
        "error: {tmp}/hf/config.json: model_type 'gpt2' is not supported; supported: ['clip', "
        "'clip_vision_model', 'llama', 'mixtral', 'qwen2_moe', 'whisper']",
    ),
    "damaged_bin": (
        lambda tmp: [
            "from-hf",
            str(_folder(tmp / "hf", LLAMA_CONFIG, {"pytorch_model.bin": b"pickle"})),
            f"{tmp}/out",
        ],
        "error: {tmp}/hf/pytorch_model.bin: torch.load(weights_only=True) cannot read it: it may "
        "be truncated or damaged (download or save it again), or hold Python objects besides "
        "tensors",
    ),
    "no_weights": (
        lambda tmp: ["from-hf", str(_folder(tmp / "hf", LLAMA_CONFIG)), f"{tmp}/out"],
        "error: {tmp}/hf: no weights: neither model.safetensors nor pytorch_model.bin, nor an "
        "index (model.safetensors.index.json or pytorch_model.bin.index.json) with its shards",
    ),
    "truncated_safetensors": (
        lambda tmp: [
            "from-hf",
            str(_folder(tmp / "hf", LLAMA_CONFIG, {"model.safetensors": _truncated(tmp)})),
            f"{tmp}/out",
        ],
        "error: {tmp}/hf/model.safetensors: not a readable safetensors file (Error while "
        "deserializing header: incomplete metadata, file not fully covered); it may be truncated "
        "or damaged: download or save it again",
    ),
    "to_hf_not_a_checkpoint": (
        lambda tmp: ["to-hf", str(_folder(tmp / "run")), f"{tmp}/out"],
        "error: {tmp}/run is neither a converted checkpoint nor a finished stage: give a "
        "directory `from-hf` wrote, or a finished stage WORKDIR/STAGE (with "
        "STAGE/checkpoints/DONE.json)",
    ),
    "out_dir_is_a_file": (
        lambda tmp: ["to-hf", str(_folder(tmp / "run")), str(_file(tmp / "out.txt"))],
        "error: {tmp}/out.txt exists and is not a directory: give a new or empty one",
    ),
}


def _file(path):
    path.write_text("notes")
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_input_mistakes_are_one_line_with_exit_code_2(case, tmp_path, capsys):
    argv, expected = CASES[case]
    with pytest.raises(SystemExit) as exit_info:
        main(argv(tmp_path))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [expected.format(tmp=tmp_path)]
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "out").exists()


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unimoe.convert", *args], capture_output=True, text=True, timeout=300
    )


def test_the_command_line_and_its_debug_flag(tmp_path):
    result = _convert("from-hf", f"{tmp_path}/nope", f"{tmp_path}/out")
    assert result.returncode == 2
    expected = f"error: {tmp_path}/nope is not a folder"
    assert result.stderr.strip().splitlines()[-1].startswith(expected)
    assert "Traceback" not in result.stderr
    debug = _convert("from-hf", f"{tmp_path}/nope", f"{tmp_path}/out", "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith(expected)
