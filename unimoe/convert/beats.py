"""BEATs checkpoints -> converted checkpoints (`python -m unimoe.convert from-beats FILE OUT_DIR`).

A published BEATs checkpoint (BEATs_iter3+ AS2M, which Uni-MoE-audio uses, and its kin) is a
torch file holding a dict: 'cfg' (BEATsConfig fields, any of them omitted taking BEATs' default,
training-only ones ignored) and 'model' (the state_dict, official names). Fine-tuned checkpoints
add the AudioSet classifier ('predictor.*' tensors, 'label_dict'), which Uni-MoE does not use:
they are ignored and the conversion says so. The output is a converted checkpoint as
`core.save` writes it, family 'beats', with the parameters under 'sound/...' (`UniMoE.sound`) and
the file's cfg as its config; BEATs has no Hugging Face form, so there is no `to-hf` for it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from unimoe.convert import core, hf_io
from unimoe.convert.families import Rule
from unimoe.models.beats import BEATs

FAMILY = "beats"
MODULE = "sound"
# The tensors and top-level entries of fine-tuned checkpoints (the AudioSet head).
PREDICTOR_PREFIX = "predictor."
# cfg fields the inference model takes; the rest (dropouts, layerdrop, layer-wise gradient decay,
# the predictor's settings, anything else) only training reads, so they are ignored.
# num_mel_bins is unimoe's (BEATs' fbank always has 128): a cfg may set it for a small model.
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(BEATs.Config))
LAYOUT = "a BEATs checkpoint is a torch file holding a dict with 'cfg' and 'model'"


class BeatsFileError(ValueError):
    """The file is not a BEATs checkpoint unimoe can convert; the message names file and key."""


def load_file(path: str | pathlib.Path) -> dict:
    """The checkpoint's dict, read with `torch.load(weights_only=True)` (no code from the file
    runs), its layout checked: 'cfg' a dict, 'model' a dict of tensors."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a folder: from-beats reads one BEATs checkpoint file (such as "
            "BEATs_iter3_plus_AS2M.pt); Hugging Face folders go to from-hf"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give a BEATs checkpoint file (.pt)")
    torch = hf_io.import_torch("reading a BEATs checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    # torch.load raises UnpicklingError, RuntimeError, EOFError, ... on files it cannot read, with
    # long messages that differ by torch version; --debug shows them.
    except Exception:  # noqa: BLE001
        raise BeatsFileError(
            f"{path}: torch.load(weights_only=True) cannot read it: not a torch file, a damaged "
            f"one, or one holding Python objects besides tensors and plain containers; {LAYOUT}"
        ) from None
    if not isinstance(checkpoint, dict) or not {"cfg", "model"} <= set(checkpoint):
        what = (
            f"a dict with keys {sorted(map(str, checkpoint))[:6]}"
            if isinstance(checkpoint, dict)
            else f"a {type(checkpoint).__name__}"
        )
        raise BeatsFileError(f"{path} holds {what}: {LAYOUT}")
    if not isinstance(checkpoint["cfg"], dict):
        raise BeatsFileError(
            f"{path}: 'cfg' is a {type(checkpoint['cfg']).__name__}, not a dict of BEATsConfig "
            "fields"
        )
    model = checkpoint["model"]
    entries = model.items() if isinstance(model, dict) else []
    bad = [name for name, value in entries if not torch.is_tensor(value)]
    if not isinstance(model, dict) or bad:
        what = f"entry {bad[0]!r} is not a tensor" if bad else f"it is a {type(model).__name__}"
        raise BeatsFileError(f"{path}: 'model' must be a state_dict of tensors, but {what}")
    return checkpoint


def config_from_cfg(cfg: dict, source: str) -> BEATs.Config:
    """The module config: each field from cfg, or BEATs' default where cfg omits it."""
    if "input_patch_size" not in cfg:
        raise BeatsFileError(
            f"{source}: cfg lacks 'input_patch_size' (BEATs' default, -1, builds no patch "
            "embedding; released checkpoints set 16)"
        )
    try:
        return BEATs.Config(**{name: cfg[name] for name in MODEL_FIELDS if name in cfg})
    except ValueError as err:
        raise BeatsFileError(f"{source}: cfg: {err}") from None


def _linear(path: str, name: str) -> list[Rule]:
    kernel = Rule(f"{path}/kernel", (f"{name}.weight",), "linear")
    return [kernel, _copy(f"{path}/bias", f"{name}.bias")]


def _layer_norm(path: str, name: str) -> list[Rule]:
    return [_copy(f"{path}/scale", f"{name}.weight"), _copy(f"{path}/bias", f"{name}.bias")]


def _copy(path: str, name: str) -> Rule:
    return Rule(path, (name,), "copy")


def rules(cfg: BEATs.Config) -> list[Rule]:
    """Each 'sound/...' param and the state_dict tensor it comes from."""
    top = MODULE
    out = [Rule(f"{top}/patch_embedding/kernel", ("patch_embedding.weight",), "conv2d")]
    if cfg.conv_bias:
        out.append(_copy(f"{top}/patch_embedding/bias", "patch_embedding.bias"))
    out += _layer_norm(f"{top}/layer_norm", "layer_norm")
    if cfg.embed_dim != cfg.encoder_embed_dim:
        out += _linear(f"{top}/post_extract_proj", "post_extract_proj")
    # The weight-normed conv's factors: g [1, 1, k] and v [out, in / groups, k], both as conv1d.
    pos = "encoder.pos_conv.0"
    out += [
        Rule(f"{top}/encoder/pos_conv/weight_g", (f"{pos}.weight_g",), "conv1d"),
        Rule(f"{top}/encoder/pos_conv/weight_v", (f"{pos}.weight_v",), "conv1d"),
        _copy(f"{top}/encoder/pos_conv/bias", f"{pos}.bias"),
    ]
    for i in range(cfg.encoder_layers):
        p, h = f"{top}/encoder/layers/{i}", f"encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += _linear(f"{p}/self_attn/{proj}", f"{h}.self_attn.{proj}")
        if cfg.relative_position_embedding and i == 0:
            out.append(
                _copy(
                    f"{p}/self_attn/relative_attention_bias/embedding",
                    f"{h}.self_attn.relative_attention_bias.weight",
                )
            )
        if cfg.gru_rel_pos:
            out += _linear(f"{p}/self_attn/grep_linear", f"{h}.self_attn.grep_linear")
            out.append(_copy(f"{p}/self_attn/grep_a", f"{h}.self_attn.grep_a"))
        out += _layer_norm(f"{p}/self_attn_layer_norm", f"{h}.self_attn_layer_norm")
        out += _linear(f"{p}/fc1", f"{h}.fc1") + _linear(f"{p}/fc2", f"{h}.fc2")
        out += _layer_norm(f"{p}/final_layer_norm", f"{h}.final_layer_norm")
    return out + _layer_norm(f"{top}/encoder/layer_norm", "encoder.layer_norm")


def _tied_copies(cfg: BEATs.Config, tensors: dict[str, np.ndarray], source: str) -> set[str]:
    """The state_dict repeats layer 0's relative position table under every layer (BEATs ties
    them); each copy must equal it. Returns the copies' names (read, as every tensor is)."""
    if not cfg.relative_position_embedding:
        return set()
    first = "encoder.layers.0.self_attn.relative_attention_bias.weight"
    copies = set()
    for i in range(1, cfg.encoder_layers):
        name = f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"
        if name in tensors and not np.array_equal(tensors[name], tensors[first]):
            raise BeatsFileError(
                f"{source}: tensor {name!r} differs from {first!r}; BEATs shares layer 0's "
                "relative position table with every layer, so the copies must be equal"
            )
        copies.add(name)
    return copies


def _ignored(checkpoint: dict, tensors: dict[str, np.ndarray]) -> list[str]:
    """What the file holds that the encoder does not use, as lines for the user."""
    notes = []
    head = sorted(name for name in tensors if name.startswith(PREDICTOR_PREFIX))
    if head:
        notes.append(
            f"{', '.join(head)} (the fine-tuned AudioSet classifier; Uni-MoE uses features)"
        )
    others = sorted(str(key) for key in checkpoint if key not in ("cfg", "model"))
    if others:
        notes.append(f"the file's other entries: {', '.join(others)}")
    return notes


def _tensors(model: dict) -> dict[str, np.ndarray]:
    # float32 for every floating tensor: numpy has no bfloat16, and BEATs is 90M parameters.
    return {
        name: t.detach().cpu().float().numpy() if t.is_floating_point() else t.cpu().numpy()
        for name, t in model.items()
    }


def read_beats(path: str | pathlib.Path) -> tuple[core.Converted, list[str]]:
    """(the converted checkpoint in memory, lines naming what the file holds that was ignored).
    Every tensor is used once and every parameter filled; the first tensor missing, extra or of
    the wrong shape is named."""
    source = str(path)
    checkpoint = load_file(path)
    config = config_from_cfg(checkpoint["cfg"], source)
    dtypes = {name: str(t.dtype).removeprefix("torch.") for name, t in checkpoint["model"].items()}
    tensors = _tensors(checkpoint["model"])
    shapes = core.param_shapes(core.abstract_modules({MODULE: config}))
    params: dict[str, np.ndarray] = {}
    mapped = rules(config)
    for rule in mapped:
        (name,) = rule.hf_names
        if name not in tensors:
            raise BeatsFileError(
                f"{source}: 'model' lacks tensor {name!r}, which its cfg needs (unimoe param "
                f"{rule.path})"
            )
        want, got = core.hf_shape(rule, shapes[rule.path]), tuple(tensors[name].shape)
        if got != want:
            raise BeatsFileError(
                f"{source}: tensor {name!r} has shape {got}, but its cfg implies {want} (unimoe "
                f"param {rule.path})"
            )
        params[rule.path] = core.to_ours(rule, [tensors[name]])
    used = {rule.hf_names[0] for rule in mapped} | _tied_copies(config, tensors, source)
    unknown = sorted(n for n in tensors if n not in used and not n.startswith(PREDICTOR_PREFIX))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise BeatsFileError(
            f"{source}: tensor {unknown[0]!r}{more} has no place in BEATs with this file's cfg "
            "(conv_bias, embed_dim, relative_position_embedding, gru_rel_pos decide which "
            "tensors exist)"
        )
    if set(shapes) != set(params):
        unset = sorted(set(shapes) - set(params))
        raise AssertionError(f"BEATs map leaves params unset: {unset[:5]}")
    cfg_json = json.loads(json.dumps(checkpoint["cfg"], default=str))
    conv = core.Converted(FAMILY, cfg_json, {MODULE: config}, params, {}, dtypes)
    return conv, _ignored(checkpoint, tensors)


def from_beats(
    path: str | pathlib.Path, out_dir: str | pathlib.Path
) -> tuple[core.Converted, list[str]]:
    """Converts the BEATs checkpoint at `path` into the directory `out_dir` (new or empty)."""
    conv, ignored = read_beats(path)
    core.save(conv, out_dir, source=str(pathlib.Path(path).absolute()))
    return conv, ignored
