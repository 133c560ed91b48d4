"""`python -m unimoe.convert from-beats FILE.pt OUT_DIR` and `parity FILE.pt`: BEATs' published
checkpoint format in, a converted checkpoint under sound/ out; cfg defaults, training-only cfg
keys and fine-tuned extras; every other layout refused with one line naming the file and key."""

import json
import pathlib
import runpy
import sys
from unittest import mock

import numpy as np
import pytest
import torch

from tests.models import beats_checkpoints
from unimoe.checkpoint import Checkpointer
from unimoe.convert import beats, core, parity
from unimoe.convert.cli import main

CFG = beats_checkpoints.VARIANTS["iter3"]


@pytest.fixture(scope="module")
def iter3_file(tmp_path_factory):
    return beats_checkpoints.write(tmp_path_factory.mktemp("beats") / "iter3.pt", CFG)


def test_from_beats_writes_a_sound_checkpoint(iter3_file, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["from-beats", str(iter3_file), str(out)]) == 0
    assert capsys.readouterr().out == f"beats: 68 params -> {out}\n"
    with Checkpointer(out) as ckpt:
        assert ckpt.all_steps() == [0]
        defined = ckpt.read_done()["defined_params"]
    loaded = core.load(out)
    assert defined == sorted(loaded.params) and all(p.startswith("sound/") for p in defined)
    assert loaded.family == "beats"
    assert loaded.configs == {"sound": beats.read_beats(iter3_file)[0].configs["sound"]}
    # What the trainer's loader takes, keyed by the model's paths, every parameter as read.
    merged = core.pretrained_params({"sound": str(out)})
    checkpoint = torch.load(iter3_file, weights_only=True)
    np.testing.assert_array_equal(
        merged["sound/encoder/layers/2/fc1/kernel"],
        checkpoint["model"]["encoder.layers.2.fc1.weight"].numpy().T,
    )
    assert json.loads((out / core.META_FILE).read_text())["hf_config"]["encoder_layerdrop"] == 0.05


def test_parity_command_passes_and_fails_on_tolerance(iter3_file, capsys):
    assert main(["parity", str(iter3_file)]) == 0
    out = capsys.readouterr().out
    assert "features_padded: max abs diff" in out and "padding_mask: max abs diff 0.000e+00" in out
    assert "PASS" in out
    # float32 rounding alone differs by ~1e-6, so a zero tolerance fails with exit status 1.
    argv = ["unimoe.convert", "parity", str(iter3_file), "--tolerance", "0"]
    with mock.patch.object(sys, "argv", argv), pytest.raises(SystemExit) as exit_info:
        runpy.run_module("unimoe.convert", run_name="__main__")
    assert exit_info.value.code == 1
    assert "FAIL: max abs diff" in capsys.readouterr().out


def test_omitted_cfg_keys_take_beats_defaults(tmp_path):
    """A cfg without the relative position sizes and the activation gets BEATs' 320 buckets,
    1280 max distance and GELU (SpeechBrain reads the file with the same defaults); unknown and
    training-only keys change nothing."""
    cfg = {k: v for k, v in CFG.items() if k not in ("num_buckets", "max_distance")}
    path = beats_checkpoints.write(tmp_path / "sparse.pt", {**cfg, "mask_prob": 0.75})
    conv, ignored = beats.read_beats(path)
    sound = conv.configs["sound"]
    assert (sound.num_buckets, sound.max_distance, sound.activation_fn) == (320, 1280, "gelu")
    assert ignored == []
    assert max(parity.parity(path).values()) < parity.TOLERANCE


def test_fine_tuned_extras_are_ignored_and_said(tmp_path, capsys):
    path = beats_checkpoints.write(tmp_path / "ft.pt", CFG, predictor_classes=5)
    assert main(["from-beats", str(path), str(tmp_path / "ckpt")]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "ignored: predictor.bias, predictor.weight (the fine-tuned AudioSet classifier; Uni-MoE "
        "uses features)",
        "ignored: the file's other entries: label_dict",
    ]
    assert not any("predictor" in p for p in core.load(tmp_path / "ckpt").params)
    assert max(parity.parity(path).values()) < parity.TOLERANCE


class NotWeights:
    """An object torch.load(weights_only=True) must refuse to build."""


def _edited(iter3_file, tmp_path, edit) -> str:
    checkpoint = torch.load(iter3_file, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, tmp_path / "edited.pt")
    return str(tmp_path / "edited.pt")


def _save(tmp_path, obj) -> str:
    torch.save(obj, tmp_path / "other.pt")
    return str(tmp_path / "other.pt")


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


L0, L2 = "encoder.layers.0", "encoder.layers.2"
TIED = "self_attn.relative_attention_bias.weight"
UNREADABLE = (
    "torch.load(weights_only=True) cannot read it: not a torch file, a damaged one, or one "
    "holding Python objects besides tensors and plain containers; a BEATs checkpoint is a torch "
    "file holding a dict with 'cfg' and 'model'"
)
CASES = {
    "folder": (
        lambda f, tmp: str(tmp),
        "{tmp} is a folder: from-beats reads one BEATs checkpoint file (such as "
        "BEATs_iter3_plus_AS2M.pt); Hugging Face folders go to from-hf",
    ),
    "missing_file": (
        lambda f, tmp: f"{tmp}/nope.pt",
        "{tmp}/nope.pt does not exist: give a BEATs checkpoint file (.pt)",
    ),
    "random_bytes": (
        lambda f, tmp: _write(tmp / "x.pt", b"\x00garbage" * 9),
        "{tmp}/x.pt: " + UNREADABLE,
    ),
    "truncated": (
        lambda f, tmp: _write(tmp / "x.pt", f.read_bytes()[:3000]),
        "{tmp}/x.pt: " + UNREADABLE,
    ),
    "code_in_pickle": (
        lambda f, tmp: _save(tmp, {"cfg": {}, "model": {}, "x": NotWeights()}),
        "{tmp}/other.pt: " + UNREADABLE,
    ),
    "no_cfg": (
        lambda f, tmp: _save(tmp, {"state_dict": {}, "epoch": 3}),
        "{tmp}/other.pt holds a dict with keys ['epoch', 'state_dict']: a BEATs checkpoint is a "
        "torch file holding a dict with 'cfg' and 'model'",
    ),
    "a_tensor": (
        lambda f, tmp: _save(tmp, torch.zeros(3)),
        "{tmp}/other.pt holds a Tensor: a BEATs checkpoint is a torch file holding a dict with "
        "'cfg' and 'model'",
    ),
    "cfg_not_a_dict": (
        lambda f, tmp: _edited(f, tmp, lambda c: c.update(cfg=[1, 2])),
        "{tmp}/edited.pt: 'cfg' is a list, not a dict of BEATsConfig fields",
    ),
    "model_entry_not_a_tensor": (
        lambda f, tmp: _edited(f, tmp, lambda c: c["model"].update(step=5)),
        "{tmp}/edited.pt: 'model' must be a state_dict of tensors, but entry 'step' is not a "
        "tensor",
    ),
    "no_patch_size": (
        lambda f, tmp: _edited(f, tmp, lambda c: c["cfg"].pop("input_patch_size")),
        "{tmp}/edited.pt: cfg lacks 'input_patch_size' (BEATs' default, -1, builds no patch "
        "embedding; released checkpoints set 16)",
    ),
    "bad_cfg_value": (
        lambda f, tmp: _edited(f, tmp, lambda c: c["cfg"].update(encoder_attention_heads=4)),
        "{tmp}/edited.pt: cfg: encoder_embed_dim (15) must be divisible by "
        "encoder_attention_heads (4)",
    ),
    "missing_tensor": (
        lambda f, tmp: _edited(f, tmp, lambda c: c["model"].pop(f"{L0}.self_attn.grep_a")),
        "{tmp}/edited.pt: 'model' lacks tensor 'encoder.layers.0.self_attn.grep_a', which its cfg "
        "needs (unimoe param sound/encoder/layers/0/self_attn/grep_a)",
    ),
    "extra_tensor": (
        lambda f, tmp: _edited(
            f, tmp, lambda c: c["model"].update({"patch_embedding.bias": torch.zeros(18)})
        ),
        "{tmp}/edited.pt: tensor 'patch_embedding.bias' has no place in BEATs with this file's "
        "cfg (conv_bias, embed_dim, relative_position_embedding, gru_rel_pos decide which "
        "tensors exist)",
    ),
    "wrong_shape": (
        lambda f, tmp: _edited(
            f, tmp, lambda c: c["model"].update({f"{L0}.fc1.weight": torch.zeros(15, 22)})
        ),
        "{tmp}/edited.pt: tensor 'encoder.layers.0.fc1.weight' has shape (15, 22), but its cfg "
        "implies (22, 15) (unimoe param sound/encoder/layers/0/fc1/kernel)",
    ),
    "untied_relative_bias": (
        lambda f, tmp: _edited(f, tmp, lambda c: c["model"][f"{L2}.{TIED}"].add_(1)),
        "{tmp}/edited.pt: tensor 'encoder.layers.2.self_attn.relative_attention_bias.weight' "
        "differs from 'encoder.layers.0.self_attn.relative_attention_bias.weight'; BEATs shares "
        "layer 0's relative position table with every layer, so the copies must be equal",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_other_layouts_are_refused_with_one_line(case, iter3_file, tmp_path, capsys):
    make_input, message = CASES[case]
    source = make_input(iter3_file, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["from-beats", source, str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {message.format(tmp=tmp_path)}\n"
    assert not (tmp_path / "out").exists()


def test_without_torch_the_message_says_what_to_install(iter3_file, tmp_path, capsys):
    with mock.patch.dict(sys.modules, {"torch": None}), pytest.raises(SystemExit) as exit_info:
        main(["from-beats", str(iter3_file), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: reading a BEATs checkpoint needs torch (its files are torch pickles): "
        "pip install torch, or pip install -e '.[test]'\n"
    )


def test_to_hf_refuses_a_beats_checkpoint(iter3_file, tmp_path, capsys):
    beats.from_beats(iter3_file, tmp_path / "ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path}/ckpt holds a beats checkpoint, which has no Hugging Face form: "
        "to-hf writes Hugging Face folders only\n"
    )


def test_an_experiment_whose_sound_config_differs_from_the_converted_beats_is_refused(
    iter3_file, tmp_path
):
    """Fields that change no shape (max_distance, gru_rel_pos) would load silently and compute
    another BEATs: the validation compares `config.model.sound` with the converted file's cfg."""
    from unimoe import config as config_lib
    from unimoe.config import ConfigError
    from unimoe.train import validate

    beats.from_beats(iter3_file, tmp_path / "ckpt")
    tiny = pathlib.Path(__file__).parents[2] / "configs" / "unimoe_tiny.py"
    config = config_lib.load_config(f"{tiny}:mode=test")
    config.data.sound_mel_bins = CFG["num_mel_bins"]
    config.model.sound = dict(CFG)
    config.pretrained = dict(sound=str(tmp_path / "ckpt"))
    validate.validate_experiment(config)  # the same cfg: accepted
    config.model.sound.update(max_distance=CFG["max_distance"] + 1, gru_rel_pos=False)
    with pytest.raises(ConfigError) as error:
        validate.validate_experiment(config)
    converted = f"the BEATs converted in {tmp_path / 'ckpt'}"
    assert f"config.model.sound.gru_rel_pos=False, but {converted} has True" in str(error.value)
    assert f"config.model.sound.max_distance={CFG['max_distance'] + 1}" in str(error.value)
