"""The files of a released Uni-MoE model, read and applied in the official load order.

`released.read_unimoe` drives it; this module knows the files: the base shards, the side files
(`non_lora_trainables.bin`, `mm_audio_aligner.bin`, `mlp_gates.bin`), the peft adapter
(`adapter_config.json` + `adapter_model.bin` or `.safetensors`) and the 8E expert files
(`--experts=DIR/mlp_<name>.bin` and the fine-tuned `{e}_mlp_experts.bin`). Names are the official
model's (`LlavaLlamaForCausalLM`'s state dict); 8E's DeepSpeed names are renamed to the 4E ones
(`model.layers.L.mlp.gate.weight`, `model.layers.L.mlp.experts.E.<proj>.weight`) so one map
serves all variants.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Callable, Mapping

import numpy as np

from unimoe.convert import hf_io

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# The 8E experts' sources, expert e from EXPERT_LIST_8E[e] (train.py's and all_builder.py's
# `expert_list`; DeepSpeed places global expert e = rank * local + local index, which both
# loaders invert, so slot e of every MoE layer reads file e).
EXPERT_LIST_8E = (
    "mlp_audiocap", "mlp_basev", "mlp_base", "mlp_base1",
    "mlp_base4", "mlp_base7", "mlp_base", "mlp_base7",
)  # fmt: skip
PROJS = ("gate_proj", "up_proj", "down_proj")
_DENSE_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_DS_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\."
    r"(gate_proj|up_proj|down_proj)(_lora_A|_lora_B)?\.weight$"
)
_DS_GATE = re.compile(r"^model\.layers\.(\d+)\.mlp\.deepspeed_moe\.gate\.wg\.weight$")
_ADAPTER_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")


class ReleasedError(ValueError):
    """A released Uni-MoE folder unimoe cannot convert; the message names the file and key."""


def official_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Names as the official loader uses them: 'base_model.' dropped, then 'model.' too when
    some name starts 'model.model.' (peft-wrapped names saved unstripped)."""
    out = {name.removeprefix("base_model."): value for name, value in tensors.items()}
    if any(name.startswith("model.model.") for name in out):
        out = {name.removeprefix("model."): value for name, value in out.items()}
    return out


@dataclasses.dataclass
class State:
    """The official model's state dict as the loads leave it: name -> array, and the file each
    came from (for errors). `load` is `load_state_dict(strict=False)` made strict: a name the
    model lacks is an error unless `discard` gives the reason the official loader drops it."""

    known: frozenset[str]
    tensors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    origin: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def load(
        self,
        tensors: Mapping[str, np.ndarray],
        source: str,
        *,
        rename: Callable[[str], str] = lambda name: name,
        discard: Callable[[str], str | None] = lambda name: None,
    ) -> list[str]:
        """Sets each tensor; returns the names set. Discarded ones are noted once per reason."""
        dropped: dict[str, list[str]] = {}
        loaded = []
        for name, value in tensors.items():
            reason = discard(name)
            if reason:
                dropped.setdefault(reason, []).append(name)
                continue
            canonical = rename(name)
            if canonical not in self.known:
                raise ReleasedError(
                    f"{source}: tensor {name!r} has no place in the Uni-MoE model its "
                    "config.json describes (layers, experts, MoE layout): a file of another "
                    "model or variant?"
                )
            self.tensors[canonical], self.origin[canonical] = value, source
            loaded.append(canonical)
        for reason, names in dropped.items():
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            self.notes.append(f"{source}: {names[0]!r}{more} not used: {reason}")
        return loaded


def read_side_file(folder: pathlib.Path, name: str, *, required: bool) -> dict[str, np.ndarray]:
    """A torch side file's tensors under official names ({} when absent and not required)."""
    path = folder / name
    if not path.is_file():
        if required:
            raise FileNotFoundError(
                f"{path} is missing: the released Uni-MoE fine-tuned folders hold it (train.py "
                "writes it beside the adapter)"
            )
        return {}
    return official_names(hf_io.read_torch_file(path))


# ---------------------------------------------------------------- peft adapter


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A peft LoRA adapter: {module name: (A [r, in], B [out, r])} and its scale."""

    path: pathlib.Path
    rank: int
    scale: float
    alpha: float
    dropout: float
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]


def _adapter_config(folder: pathlib.Path) -> dict:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing, so {folder} is not a fine-tuned Uni-MoE folder (Uni-MoE-speech-"
            "e2, Uni-MoE-audio-e2, Uni-MoE-8e-e2): those hold the peft adapter train.py saves"
        )
    cfg = json.loads(path.read_text())
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise ReleasedError(f"{path}: field {key!r} is missing")
    unsupported = {
        "peft_type": cfg.get("peft_type", "LORA") != "LORA",
        "use_dora": bool(cfg.get("use_dora")),
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "modules_to_save": bool(cfg.get("modules_to_save")),
        "bias": cfg.get("bias", "none") != "none",
    }
    bad = [key for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ReleasedError(
            f"{path}: {bad[0]}={cfg.get(bad[0])!r} is not supported (Uni-MoE's adapters are plain "
            "LoRA: bias 'none', one rank and alpha, no modules_to_save)"
        )
    return cfg


def _targets(cfg: dict) -> Callable[[str], bool]:
    """peft's target_modules match: a regex over the whole name, or a list of name suffixes."""
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        return lambda module: re.fullmatch(targets, module) is not None
    return lambda module: any(module == t or module.endswith(f".{t}") for t in targets)


def read_adapter(folder: pathlib.Path) -> Adapter:
    """The adapter of a fine-tuned folder; each key must be a LoRA A or B of one targeted module,
    of the config's rank, in pairs."""
    cfg = _adapter_config(folder)
    files = [folder / name for name in ADAPTER_FILES if (folder / name).is_file()]
    if not files:
        raise FileNotFoundError(
            f"{folder}: neither {' nor '.join(ADAPTER_FILES)}: the adapter's weights are missing"
        )
    path = files[0]
    if path.suffix == ".safetensors":
        with hf_io.open_safetensors(path) as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    else:
        tensors = hf_io.read_torch_file(path)
    rank, is_target = int(cfg["r"]), _targets(cfg)
    halves: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        match = _ADAPTER_KEY.match(name)
        if match is None:
            raise ReleasedError(
                f"{path}: tensor {name!r} is not a LoRA matrix (base_model.model.<module>."
                "lora_A/lora_B.weight); a bias-'none' LoRA adapter holds only those"
            )
        module, half = match.groups()
        if not is_target(module):
            raise ReleasedError(
                f"{path}: tensor {name!r} adapts {module!r}, which {ADAPTER_CONFIG}'s "
                "target_modules does not name"
            )
        axis = 0 if half == "A" else 1
        if value.ndim != 2 or value.shape[axis] != rank:
            raise ReleasedError(
                f"{path}: tensor {name!r} has shape {tuple(value.shape)}, but {ADAPTER_CONFIG} "
                f"says r={rank} (lora_A is [r, in], lora_B [out, r]): an adapter of another rank"
            )
        halves.setdefault(module, {})[half] = value
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise ReleasedError(f"{path}: module {module!r} has lora_{set(pair).pop()} only")
    alpha = float(cfg["lora_alpha"])
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    pairs = {m: (p["A"], p["B"]) for m, p in sorted(halves.items())}
    return Adapter(path, rank, scale, alpha, float(cfg.get("lora_dropout", 0.0)), pairs)


def merged(weight: np.ndarray, a_ri: np.ndarray, b_or: np.ndarray, scale: float) -> np.ndarray:
    """W + (B @ A) * scale in float32 (peft's merge), back in W's dtype."""
    delta = (np.asarray(b_or, np.float32) @ np.asarray(a_ri, np.float32)) * np.float32(scale)
    return (np.asarray(weight, np.float32) + delta).astype(weight.dtype)


def merge_adapter(state: State, adapter: Adapter) -> list[str]:
    """Folds every pair into the state's `<module>.weight`, as `merge_and_unload`; returns the
    weight names merged."""
    names = []
    for module, (a_ri, b_or) in adapter.pairs.items():
        name = f"{module}.weight"
        if name not in state.tensors:
            raise ReleasedError(
                f"{adapter.path}: LoRA for {module!r}, whose weight {name!r} the model lacks"
            )
        weight = state.tensors[name]
        if weight.shape != (b_or.shape[0], a_ri.shape[1]):
            raise ReleasedError(
                f"{adapter.path}: LoRA for {module!r} is [{b_or.shape[0]}, r] @ [r, "
                f"{a_ri.shape[1]}], but {name!r} ({state.origin[name]}) is {tuple(weight.shape)}"
            )
        state.tensors[name] = merged(weight, a_ri, b_or, adapter.scale)
        names.append(name)
    return names


# ---------------------------------------------------------------- 8E experts


def canonical_8e(name: str) -> str:
    """DeepSpeed's expert and gate names -> the 4E names (`mlp.experts.E`, `mlp.gate`)."""
    match = _DS_GATE.match(name)
    if match:
        return f"model.layers.{match.group(1)}.mlp.gate.weight"
    return name


def gate_layers(gates: Mapping[str, np.ndarray]) -> list[int]:
    return sorted(int(m.group(1)) for m in map(_DS_GATE.match, gates) if m)


def load_experts_8e(
    state: State, experts_dir: pathlib.Path, finetuned: pathlib.Path, num_experts: int
) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """Loads expert e's FFNs from `experts_dir/EXPERT_LIST_8E[e].bin` into slot e of every MoE
    layer; returns {expert weight name: (A, B, file)} from `{e}_mlp_experts.bin`, merged by the
    caller once every file is loaded (the official model adds the LoRA at run time). Base weights
    inside `{e}_mlp_experts.bin` are dropped: the official loader reads the expert_list file after
    it, which overwrites them."""
    if num_experts != len(EXPERT_LIST_8E):
        raise ReleasedError(
            f"config.json: num_experts={num_experts}, but the 8E loader's expert_list has "
            f"{len(EXPERT_LIST_8E)} entries"
        )
    lora: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
    for e, stem in enumerate(EXPERT_LIST_8E):
        path = experts_dir / f"{stem}.bin"
        ffn = hf_io.read_torch_file(path, f"expert {e} of the 8E model, from --experts")
        state.load(ffn, str(path), rename=lambda name, e=e: _expert_name(name, e, path))
        lora.update(_expert_lora(finetuned / f"{e}_mlp_experts.bin", e, state))
    return lora


def _expert_name(name: str, e: int, path: pathlib.Path) -> str:
    match = _DENSE_MLP.match(name)
    if match is None:
        raise ReleasedError(
            f"{path}: tensor {name!r} is not a dense FFN weight (model.layers.L.mlp."
            "{gate,up,down}_proj.weight), all an 8E expert file holds"
        )
    layer, proj = match.groups()
    return f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"


def _expert_lora(
    path: pathlib.Path, e: int, state: State
) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    tensors = official_names(
        hf_io.read_torch_file(path, f"expert {e}'s LoRA, in the fine-tuned 8E folder")
    )
    halves: dict[str, dict[str, np.ndarray]] = {}
    slots, base = set(), []
    for name, value in tensors.items():
        match = _DS_EXPERT.match(name)
        if match is None:
            raise ReleasedError(
                f"{path}: tensor {name!r} is not an expert weight (model.layers.L.mlp."
                "deepspeed_moe.experts.deepspeed_experts.J.<proj>[_lora_A|_lora_B].weight)"
            )
        layer, slot, proj, half = match.groups()
        slots.add(slot)
        target = f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
        if target not in state.known:
            raise ReleasedError(f"{path}: tensor {name!r} is for a layer that is not MoE")
        if half:
            halves.setdefault(target, {})[half[-1]] = value
        else:
            base.append(name)
    if len(slots) > 1:
        raise ReleasedError(
            f"{path}: holds local experts {sorted(slots)}; the loader maps one file to one "
            "expert (this one was saved with ep_size < num_experts)"
        )
    if base:
        state.notes.append(
            f"{path}: {base[0]!r} and {len(base) - 1} more not used: the official loader "
            "overwrites the base expert weights with the expert_list file"
        )
    out = {}
    for target, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise ReleasedError(f"{path}: the LoRA of {target!r} has lora_{set(pair).pop()} only")
        out[target] = (pair["A"], pair["B"], str(path))
    return out
