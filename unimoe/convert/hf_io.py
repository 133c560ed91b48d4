"""Hugging Face model folders: config.json plus safetensors, single-file or sharded with an index.

Tensors are numpy arrays in their stored dtype (bfloat16 via ml_dtypes), so a folder read and
written back is byte-for-byte the same tensors.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# PyTorch pickles, which only torch reads (and running one can run code).
TORCH_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


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


def tensor_files(hf_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """{tensor name: the safetensors file holding it}, from the index or the single file."""
    hf_dir = pathlib.Path(hf_dir)
    index_path = hf_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map")
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
    if not single.is_file():
        torch_files = [name for name in TORCH_FILES if (hf_dir / name).is_file()]
        found = f"it has {torch_files[0]}, but " if torch_files else ""
        raise FileNotFoundError(
            f"{hf_dir}: {found}neither {SINGLE_FILE} nor {INDEX_FILE}; only safetensors are "
            "read: convert it with transformers, e.g. `AutoModel.from_pretrained(DIR)"
            ".save_pretrained(NEW_DIR, safe_serialization=True)`"
        )
    with open_safetensors(single) as f:
        return {name: single for name in f.keys()}


def read_tensors(hf_dir: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder, in its stored dtype."""
    by_file: dict[pathlib.Path, list[str]] = {}
    for name, path in tensor_files(hf_dir).items():
        by_file.setdefault(path, []).append(name)
    tensors: dict[str, np.ndarray] = {}
    for path, names in by_file.items():
        # The flax reader knows bfloat16 (numpy's does not); np.asarray keeps it as ml_dtypes.
        with open_safetensors(path, "flax") as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise ValueError(f"{path}: the index lists tensor {name!r}, the file lacks it")
                tensors[name] = np.asarray(f.get_tensor(name))
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
