"""Hugging Face folder <-> unimoe parameters <-> orbax checkpoint.

A converted checkpoint directory (`from_hf`'s OUT_DIR) is a `unimoe.checkpoint.Checkpointer`
directory whose step 0 holds `{'params': ...}` under `UniMoE` parameter paths ('llm/...',
'vision/...', 'audio/...', 'audio_conn/...'; 'sound/...' from a BEATs file, `convert/beats.py`)
and whose DONE.json lists them as `defined_params`, like a finished training stage; beside it
`unimoe_convert.json` (family, module configs, the HF config.json and each HF tensor's dtype) and
`hf_extra.safetensors` (HF tensors unimoe does not use, kept so `to_hf` rebuilds the folder
exactly).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from unimoe.checkpoint import Checkpointer, flat_params, path_str
from unimoe.convert import hf_io
from unimoe.convert.families import FAMILIES, MODULES, Options, Rule, family_of
from unimoe.models.abstract import abstract_module

META_FILE = "unimoe_convert.json"
EXTRA_FILE = "hf_extra.safetensors"
# Module parameters that no HF tensor holds (Uni-MoE's additions): left at their init.
NEW_PARAMS = ("audio_conn/query_tokens", "audio_conn/out_proj/", "audio_conn/enc_proj/")


@dataclasses.dataclass
class Converted:
    """One HF model in unimoe terms. params: unimoe path -> array in the HF tensor's stored dtype
    (modules cast to float32 when loading; a bf16 checkpoint stays half the size); extra: HF
    tensors kept verbatim; dtypes: every HF tensor's stored dtype, restored by `to_hf_tensors`."""

    family: str
    hf_config: dict
    configs: dict[str, Any]
    params: dict[str, np.ndarray]
    extra: dict[str, np.ndarray]
    dtypes: dict[str, str]

    def rules(self) -> list[Rule]:
        return FAMILIES[self.family].rules(self.hf_config, self.configs, set(self.dtypes))


def abstract_modules(configs: Mapping[str, Any]) -> dict[str, nnx.Module]:
    """The modules of `configs`, shapes only (no memory for the weights)."""
    return {
        name: abstract_module(lambda rngs, name=name, cfg=cfg: MODULES[name](cfg, rngs=rngs))
        for name, cfg in configs.items()
    }


def param_shapes(modules: Mapping[str, nnx.Module]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, module in modules.items():
        for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
            shapes[f"{name}/{path_str(path)}"] = tuple(variable.get_value().shape)
    return shapes


def hf_shape(rule: Rule, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape each HF tensor of `rule` must have for a unimoe param of `shape`."""
    if rule.kind == "copy":
        return shape
    if rule.kind == "linear":
        return shape[::-1]
    if rule.kind == "conv1d":  # HF [out, in, k], ours [k, in, out]
        return (shape[2], shape[1], shape[0])
    if rule.kind == "conv2d":  # HF [out, in, kh, kw], ours [kh, kw, in, out]
        return (shape[3], shape[2], shape[0], shape[1])
    if rule.kind == "stack_linear":
        return (shape[2], shape[1])
    raise ValueError(f"no fixed HF shape for rule kind {rule.kind!r}")


def to_ours(rule: Rule, arrays: list[np.ndarray]) -> np.ndarray:
    a = arrays[0]
    if rule.kind == "copy":
        out = a
    elif rule.kind == "linear":
        out = a.T
    elif rule.kind == "conv1d":
        out = a.transpose(2, 1, 0)
    elif rule.kind == "conv2d":
        out = a.transpose(2, 3, 1, 0)
    elif rule.kind == "stack_linear":
        out = np.stack([x.T for x in arrays])
    elif rule.kind == "rows":
        out = a[: rule.rows]
    else:
        raise ValueError(f"unknown rule kind {rule.kind!r}")
    return np.ascontiguousarray(out)


def _to_hf(rule: Rule, value: np.ndarray, extra: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = rule.hf_names
    if rule.kind == "copy":
        return {names[0]: value}
    if rule.kind == "linear":
        return {names[0]: value.T}
    if rule.kind == "conv1d":
        return {names[0]: value.transpose(2, 1, 0)}
    if rule.kind == "conv2d":
        return {names[0]: value.transpose(3, 2, 0, 1)}
    if rule.kind == "stack_linear":
        return {name: value[e].T for e, name in enumerate(names)}
    if rule.kind == "rows":
        full = np.array(extra[names[0]])
        full[: rule.rows] = value
        return {names[0]: full}
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def read_hf(hf_dir: str | pathlib.Path, options: Options = Options()) -> Converted:
    """Reads an HF folder into unimoe parameters; every failure names the file and tensor."""
    hf_dir = pathlib.Path(hf_dir)
    hf_config = hf_io.read_config(hf_dir)
    family_name = family_of(hf_config, str(hf_dir / hf_io.CONFIG_FILE))
    family = FAMILIES[family_name]
    configs = family.configs(hf_config, options)
    files = hf_io.tensor_files(hf_dir)
    tensors = hf_io.read_tensors(hf_dir)
    family.check(hf_config, tensors, files)
    dtypes = {name: str(tensor.dtype) for name, tensor in tensors.items()}
    shapes = param_shapes(abstract_modules(configs))
    params: dict[str, np.ndarray] = {}
    extra: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for rule in family.rules(hf_config, configs, set(tensors)):
        shape = shapes[rule.path]
        for name in rule.hf_names:
            if name not in tensors:
                raise ValueError(
                    f"{hf_dir}: tensor {name!r} is missing (config.json, model_type "
                    f"{hf_config.get('model_type')!r}, needs it for unimoe param {rule.path})"
                )
            got = tuple(tensors[name].shape)
            if rule.kind == "rows":
                ok = len(got) == 2 and got[0] >= rule.rows and got[1] == shape[1]
                want = f"(>= {rule.rows}, {shape[1]})"
            else:
                ok = got == hf_shape(rule, shape)
                want = str(hf_shape(rule, shape))
            if not ok:
                raise ValueError(
                    f"{files[name]}: tensor {name!r} has shape {got}, but config.json implies "
                    f"{want} (unimoe param {rule.path})"
                )
        params[rule.path] = to_ours(rule, [tensors[n] for n in rule.hf_names])
        used.update(rule.hf_names)
        if rule.kind == "rows":
            extra[rule.hf_names[0]] = tensors[rule.hf_names[0]]
        for name in rule.hf_names:  # converted: free the HF copy (7B models are large)
            tensors[name] = None
    unknown = sorted(n for n in tensors if n not in used and not family.kept(n))
    if unknown:
        raise ValueError(
            f"{files[unknown[0]]}: tensor {unknown[0]!r} (and {len(unknown) - 1} more) has no "
            f"place in unimoe's {family_name} model; config.json does not describe this layout"
        )
    extra.update({n: tensors[n] for n in tensors if n not in used})
    uncovered = sorted(p for p in shapes if p not in params and not p.startswith(NEW_PARAMS))
    if uncovered:
        raise AssertionError(f"{family_name} map leaves unimoe params unset: {uncovered[:5]}")
    return Converted(family_name, hf_config, configs, params, extra, dtypes)


def to_hf_tensors(conv: Converted) -> dict[str, np.ndarray]:
    """The HF tensors of `conv`, in their original names and dtypes."""
    tensors = dict(conv.extra)
    for rule in conv.rules():
        if rule.path not in conv.params:
            raise ValueError(f"converted checkpoint lacks unimoe param {rule.path}")
        tensors.update(_to_hf(rule, np.asarray(conv.params[rule.path]), conv.extra))
    return {name: np.asarray(t).astype(jnp.dtype(conv.dtypes[name])) for name, t in tensors.items()}


def load_into(modules: Mapping[str, nnx.Module], params: Mapping[str, np.ndarray]) -> None:
    """Sets every param of `modules` that `params` has ('<module>/<path>' keys), shape-checked."""
    for name, module in modules.items():
        for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
            key = f"{name}/{path_str(path)}"
            if key not in params:
                continue
            value = params[key]
            if tuple(value.shape) != tuple(variable.get_value().shape):
                raise ValueError(
                    f"param {key}: checkpoint has {value.shape}, module expects "
                    f"{variable.get_value().shape}"
                )
            variable.set_value(jnp.asarray(value, jnp.float32))


def _config_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def save(conv: Converted, out_dir: str | pathlib.Path, *, source: str = "") -> pathlib.Path:
    """Writes `conv` as a converted checkpoint directory (see the module docstring)."""
    out_dir = pathlib.Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; refusing to overwrite it")
    nested: dict = {}
    for path, value in conv.params.items():
        *parents, leaf = path.split("/")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    with Checkpointer(out_dir, async_save=False) as ckpt:
        ckpt.save(0, {"params": nested}, force=True)
        ckpt.mark_done(
            {"final_step": 0, "defined_params": sorted(conv.params), "converted_from": source}
        )
    meta = {
        "family": conv.family,
        "configs": {name: _config_dict(cfg) for name, cfg in conv.configs.items()},
        "hf_config": conv.hf_config,
        "dtypes": conv.dtypes,
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if conv.extra:
        save_file({n: np.ascontiguousarray(t) for n, t in conv.extra.items()}, out_dir / EXTRA_FILE)
    return out_dir


def load(ckpt_dir: str | pathlib.Path) -> Converted:
    """Reads a directory written by `save`."""
    ckpt_dir = pathlib.Path(ckpt_dir).absolute()
    meta_path = ckpt_dir / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} missing: {ckpt_dir} is not a converted checkpoint")
    meta = json.loads(meta_path.read_text())
    with Checkpointer(ckpt_dir) as ckpt:
        params = flat_params(ckpt.restore_raw(0)["params"])
    extra = {}
    if (ckpt_dir / EXTRA_FILE).is_file():
        with safe_open(ckpt_dir / EXTRA_FILE, "flax") as f:
            extra = {n: np.asarray(f.get_tensor(n)) for n in f.keys()}
    configs = {name: MODULES[name].Config(**cfg) for name, cfg in meta["configs"].items()}
    return Converted(meta["family"], meta["hf_config"], configs, params, extra, meta["dtypes"])


def from_hf(
    hf_dir: str | pathlib.Path, out_dir: str | pathlib.Path, options: Options = Options()
) -> Converted:
    conv = read_hf(hf_dir, options)
    save(conv, out_dir, source=str(pathlib.Path(hf_dir).absolute()))
    return conv


def to_hf(
    ckpt_dir: str | pathlib.Path, out_dir: str | pathlib.Path, *, max_shard_bytes: int = 0
) -> list[pathlib.Path]:
    conv = load(ckpt_dir)
    if conv.family not in FAMILIES:
        raise ValueError(
            f"{ckpt_dir} holds a {conv.family} checkpoint, which has no Hugging Face form: "
            "to-hf writes Hugging Face folders only"
        )
    return hf_io.write_folder(
        out_dir, conv.hf_config, to_hf_tensors(conv), max_shard_bytes=max_shard_bytes
    )


def pretrained_params(ckpt_dirs: Mapping[str, str]) -> dict[str, np.ndarray]:
    """{unimoe path: array} merged from converted checkpoints ({label: directory}, e.g.
    {'llm': VICUNA_DIR, 'vision': CLIP_DIR, 'audio': WHISPER_DIR}; empty directories skipped).

    The form `unimoe.factory.load_params` takes as a source. Two directories defining the
    same parameter is an error.
    """
    merged: dict[str, np.ndarray] = {}
    owner: dict[str, str] = {}
    for label, ckpt_dir in ckpt_dirs.items():
        if not ckpt_dir:
            continue
        for path, value in load(ckpt_dir).params.items():
            if path in merged:
                raise ValueError(
                    f"param {path} is in both {owner[path]} and {ckpt_dir} ({label}); "
                    "each module must come from one converted checkpoint"
                )
            merged[path], owner[path] = value, ckpt_dir
    return merged
