"""Hugging Face model folders: config.json plus weights, single-file or sharded with an index.

Weights are safetensors or PyTorch pickles (`pytorch_model.bin`, sharded
`pytorch_model-0000N-of-0000M.bin` + `pytorch_model.bin.index.json`, and side files such as
Uni-MoE's `mm_projector.bin`: `read_torch_file`). Pickles are read with a lazily imported torch,
`torch.load(weights_only=True, mmap=True)`: no code from the file runs, and the tensors stay in
the file's pages until used (a 7B x 4-expert fp32 base is ~80 GB). Tensors are numpy arrays in
their stored dtype (bfloat16 via ml_dtypes), so a folder read and written back is byte-for-byte
the same tensors. Only safetensors are written.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# PyTorch pickles, which only torch reads (weights_only=True: no code from the file runs).
TORCH_SINGLE_FILE = "pytorch_model.bin"
TORCH_INDEX_FILE = "pytorch_model.bin.index.json"
TORCH_INSTALL = "pip install torch, or pip install -e '.[test]'"


def import_torch(purpose: str) -> Any:
    """torch, imported when a command reads a torch file; without it one line saying so."""
    try:
        import torch
    except ImportError:
        # from None: the CLI prints the innermost message, which should be this one.
        raise ImportError(
            f"{purpose} needs torch (its files are torch pickles): {TORCH_INSTALL}"
        ) from None
    return torch


def _torch_numpy(tensor: Any, torch: Any) -> np.ndarray:
    """The tensor's values as numpy, sharing its memory; bfloat16 through ml_dtypes."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _torch_load(path: pathlib.Path, torch: Any) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    # mmap needs the zip format torch.save writes since 1.6; older pickles load without it.
    except Exception:  # noqa: BLE001
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    # UnpicklingError, RuntimeError, EOFError, ...: long messages that differ by torch version;
    # --debug shows them.
    except Exception:  # noqa: BLE001
        raise ValueError(
            f"{path}: torch.load(weights_only=True) cannot read it: it may be truncated or "
            "damaged (download or save it again), or hold Python objects besides tensors"
        ) from None


def read_torch_file(path: str | pathlib.Path, purpose: str = "") -> dict[str, np.ndarray]:
    """A torch state-dict file ({name: tensor}) as {name: numpy array} in the stored dtypes."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing{f' ({purpose})' if purpose else ''}")
    torch = import_torch(f"reading {path.name}")
    state = _torch_load(path, torch)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    bad = [name for name, value in state.items() if not torch.is_tensor(value)]
    if bad:
        raise ValueError(f"{path}: entry {bad[0]!r} is not a tensor; a state dict holds tensors")
    return {str(name): _torch_numpy(value, torch) for name, value in state.items()}


def read_config(hf_dir: str | pathlib.Path) -> dict:
    hf_dir = pathlib.Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(
            f"{hf_dir} is not a folder: give a Hugging Face model folder (config.json and "
            "safetensors, as `save_pretrained` writes it)"
        )
    path = hf_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing, so {hf_dir} is not a Hugging Face model folder: it needs the "
            "config.json `save_pretrained` writes beside the weights"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        # The message names the file; the decoder's own error is only its position.
        raise ValueError(f"{path}: not valid JSON ({err})") from None


@contextlib.contextmanager
def open_safetensors(path: pathlib.Path, framework: str = "np") -> Iterator[Any]:
    """`safe_open(path)`, whose errors (a truncated or damaged file) name the file."""
    try:
        with safe_open(path, framework) as f:
            yield f
    except SafetensorError as err:
        raise ValueError(
            f"{path}: not a readable safetensors file ({err}); it may be truncated or damaged: "
            "download or save it again"
        ) from None


def _index(hf_dir: pathlib.Path) -> pathlib.Path | None:
    for name in (INDEX_FILE, TORCH_INDEX_FILE):
        if (hf_dir / name).is_file():
            return hf_dir / name
    return None


def tensor_files(hf_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """{tensor name: the file holding it}, from the index (safetensors or pytorch_model.bin) or
    the single file (model.safetensors, else pytorch_model.bin)."""
    hf_dir = pathlib.Path(hf_dir)
    index_path = _index(hf_dir)
    if index_path is not None:
        try:
            weight_map = json.loads(index_path.read_text()).get("weight_map")
        except json.JSONDecodeError as err:
            raise ValueError(f"{index_path}: not valid JSON ({err})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: no 'weight_map' of tensor name -> shard file")
        files = {name: hf_dir / shard for name, shard in weight_map.items()}
        for name, path in files.items():
            if not path.is_file():
                raise FileNotFoundError(
                    f"{index_path}: tensor {name!r} is in {path}, which is missing"
                )
        return files
    single = hf_dir / SINGLE_FILE
    if single.is_file():
        with open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    pickle = hf_dir / TORCH_SINGLE_FILE
    if pickle.is_file():
        return {name: pickle for name in read_torch_file(pickle)}
    raise FileNotFoundError(
        f"{hf_dir}: no weights: neither {SINGLE_FILE} nor {TORCH_SINGLE_FILE}, nor an index "
        f"({INDEX_FILE} or {TORCH_INDEX_FILE}) with its shards"
    )


def read_tensors(hf_dir: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder, in its stored dtype."""
    by_file: dict[pathlib.Path, list[str]] = {}
    for name, path in tensor_files(hf_dir).items():
        by_file.setdefault(path, []).append(name)
    tensors: dict[str, np.ndarray] = {}
    for path, names in by_file.items():
        if path.suffix == ".safetensors":
            # The flax reader knows bfloat16 (numpy's does not); np.asarray keeps it as ml_dtypes.
            with open_safetensors(path, "flax") as f:
                present = set(f.keys())
                stored = {n: np.asarray(f.get_tensor(n)) for n in names if n in present}
        else:
            stored = read_torch_file(path)
        for name in names:
            if name not in stored:
                raise ValueError(f"{path}: the index lists tensor {name!r}, the file lacks it")
            tensors[name] = stored[name]
    return tensors


def write_folder(
    out_dir: str | pathlib.Path,
    config: Mapping,
    tensors: Mapping[str, np.ndarray],
    *,
    max_shard_bytes: int = 0,
) -> list[pathlib.Path]:
    """Writes config.json and the tensors; sharded with an index when they exceed max_shard_bytes.

    max_shard_bytes 0 writes one model.safetensors. Returns the safetensors files written.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    names = sorted(tensors)
    total = sum(tensors[n].nbytes for n in names)
    metadata = {"format": "pt"}  # transformers refuses files without it
    arrays = {n: np.ascontiguousarray(tensors[n]) for n in names}
    if max_shard_bytes <= 0 or total <= max_shard_bytes:
        save_file(arrays, out_dir / SINGLE_FILE, metadata=metadata)
        return [out_dir / SINGLE_FILE]
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name in names:
        if shards[-1] and shard_bytes + arrays[name].nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += arrays[name].nbytes
    weight_map, paths = {}, []
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: arrays[n] for n in shard}, out_dir / file_name, metadata=metadata)
        weight_map.update({n: file_name for n in shard})
        paths.append(out_dir / file_name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return paths
