"""Tiny random Uni-MoE folders in the released layout, written as the official code writes them.

`write_released(root, variant)` builds odd-sized random torch models and lays them out as the
released folders (section 9.1 of the reference notes; the official `train/train.py` of each
variant for the fine-tuned side files):

- base: fp32 `pytorch_model-0000N-of-0000M.bin` shards + `pytorch_model.bin.index.json`, the MoE
  assembled (`model.layers.L.mlp.experts.E.*`, `model.layers.L.mlp.gate.weight`) plus the vision
  projector (`model.mm_projector.*`) as LLaVA keeps it; `config.json` (`model_type: "llava"`,
  the fields the official config carries), `4config.json` / `8config.json`, `tokenizer.model`,
  `mm_projector.bin`, `mm_audio_aligner.bin` (the stage-1 connectors, later overridden).
- fine-tuned: a peft adapter saved by peft itself (`adapter_model.bin`, non-zero `lora_B`, the
  official target list), `config.json`, and the side files with train.py's key transforms:
  `non_lora_trainables.bin` (the projector under the peft prefix `base_model.model.model.`,
  as `safe_save_all_for_hf_trainer` overwrites it last), `mm_audio_aligner.bin` and
  `mlp_gates.bin` (prefix stripped to `model.`). Key names are peft 0.4's (the release's):
  a LoRA-wrapped router keeps `mlp.gate.weight` beside `mlp.gate.lora_{A,B}.default.weight`.
- 8E experts: `mlp_{audiocap,basev,base,base1,base4,base7}.bin` (dense FFN of every layer), and in
  the fine-tuned folder `{i}_mlp_experts.bin`, one expert each (expert parallel size 8, so the
  local index is 0), holding its LoRA and, as `named_parameters` lists them, its frozen base.

Every value a converter must take from a particular file differs from the value any other file
holds for the same name (base vs fine-tuned connectors and routers, the Whisper folder's
decoder vs the aligner's), so taking it from the wrong file moves the logits.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Any

import numpy as np
import peft
import torch
import transformers

from tests.convert import hf_models
from tests.convert import released_reference as ref
from tests.data.real_corpus import train_sentencepiece
from tests.models import beats_checkpoints

VARIANTS = ("speech_4e", "audio_4e", "8e")
VOCAB = 320  # the tiny SentencePiece model's size
# Odd sizes: hidden 56 (7 heads of 8), FFN 44; the towers are hf_models' CLIP and Whisper (48).
LM = dict(hidden_size=56, intermediate_size=44, num_attention_heads=7, num_key_value_heads=7)
LAYERS = {"speech_4e": 3, "audio_4e": 4, "8e": 2}
EXPERTS = {"speech_4e": 4, "audio_4e": 4, "8e": 8}
QUERIES = 7
LORA = dict(r=3, lora_alpha=7, lora_dropout=0.05)
SHARDS = 3
BEATS = ref.BEATS
EXPERT_LIST = ref.EXPERT_LIST


@dataclasses.dataclass(frozen=True)
class ReleasedFolders:
    variant: str
    base: pathlib.Path
    finetuned: pathlib.Path
    clip: pathlib.Path
    whisper: pathlib.Path
    experts: pathlib.Path | None = None  # 8E: the Uni-MoE-8e-Experts folder
    beats: pathlib.Path | None = None  # audio: the BEATs checkpoint file


def llava_config(variant: str, clip: pathlib.Path, audio_tower: pathlib.Path) -> dict[str, Any]:
    """config.json as the official LlavaConfig (transformers 4.31 LlamaConfig) saves it; the
    audio tower is the Whisper folder, or for the audio model the BEATs file."""
    audio_dim = BEATS["encoder_embed_dim"] if variant == "audio_4e" else 48
    cfg = dict(
        architectures=["LlavaLlamaForCausalLM"], model_type="llava", vocab_size=VOCAB, **LM,
        num_hidden_layers=LAYERS[variant], hidden_act="silu", max_position_embeddings=256,
        initializer_range=0.02, rms_norm_eps=1e-5, pretraining_tp=1, rope_scaling=None,
        tie_word_embeddings=False, use_cache=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        torch_dtype="float32", transformers_version="4.31.0",
        moe=True, num_experts=EXPERTS[variant], num_experts_per_tok=2,
        mm_vision_tower=str(clip), mm_hidden_size=hf_models.CLIP_VISION["hidden_size"],
        mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        mm_use_im_start_end=False, mm_use_im_patch_token=False, image_aspect_ratio="pad",
        use_mm_proj=True, tune_mm_mlp_adapter=False, freeze_mm_mlp_adapter=False,
        mm_audio_tower=str(audio_tower), mm_audio_hidden_size=audio_dim, audio_projector_type="linear",
        mm_audio_select_layer=0, mm_audio_select_feature="patch", query_tokens_size=QUERIES,
        mm_query_tokens=True, local_files_only=True, language="English", task="transcribe",
    )
    if variant == "8e":
        cfg.update(moe_type="dense", moe_stride=2, ep_size=1, capacity_factor=1.5,
                   lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=0.05,
                   use_fm_block=False, aux_balance_loss=True, aux_balance_loss_coef=0.01)
    return cfg


def _redraw(module: torch.nn.Module, rng: np.random.Generator, only: str = "") -> None:
    """Redraw every parameter whose name holds `only`: norm scales near 1, the rest 0.1 N(0, 1)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if only not in name:
                continue
            noise = torch.from_numpy(rng.normal(size=tuple(param.shape)).astype(np.float32))
            is_scale = ("norm" in name or "layer_norm" in name) and name.endswith("weight")
            param.copy_(1.0 + 0.1 * noise if is_scale else 0.1 * noise)


def _save_shards(state: dict[str, torch.Tensor], folder: pathlib.Path) -> None:
    keys = list(state)
    weight_map, total = {}, 0
    for s, part in enumerate(np.array_split(np.arange(len(keys)), SHARDS)):
        name = f"pytorch_model-{s + 1:05d}-of-{SHARDS:05d}.bin"
        shard = {keys[i]: state[keys[i]].clone() for i in part}
        torch.save(shard, folder / name)
        weight_map.update({k: name for k in shard})
        total += sum(v.numel() * v.element_size() for v in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def _matching(model: torch.nn.Module, keywords: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """train.py's get_mm_adapter_state_maybe_zero_3, under peft 0.4's names (no base_layer)."""
    return {
        name.replace(".base_layer.", "."): p.detach().clone()
        for name, p in model.named_parameters() if any(k in name for k in keywords)
    }


def _strip_peft_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """train.py: drop 'base_model.', then 'model.' once keys start with 'model.model.'."""
    state = {(k[11:] if k.startswith("base_model.") else k): v for k, v in state.items()}
    if any(k.startswith("model.model.") for k in state):
        state = {(k[6:] if k.startswith("model.") else k): v for k, v in state.items()}
    return state


def _write_base(folders: ReleasedFolders, cfg: dict, lm: torch.nn.Module) -> None:
    base = folders.base
    base.mkdir(parents=True)
    state = {k: v for k, v in lm.state_dict().items()
             if not k.startswith(("model.mm_audio_aligner.", "model.query_tokens"))}
    if folders.variant == "8e":  # the 8E model reads the 4E speech base and ignores its MoE
        state = _speech_base_state(cfg, folders, state)
    _save_shards(state, base)
    for name in ("config.json", "4config.json"):
        (base / name).write_text(json.dumps(_four_e(cfg), indent=2))
    if folders.variant == "8e":
        (base / "8config.json").write_text(json.dumps(cfg, indent=2))
    train_sentencepiece(base / "tokenizer.model")
    torch.save(_matching(lm, ("mm_projector",)), base / "mm_projector.bin")
    torch.save(_matching(lm, ("mm_audio_aligner", "query_tokens")), base / "mm_audio_aligner.bin")


def _four_e(cfg: dict) -> dict:
    eight_only = ("moe_type", "moe_stride", "ep_size", "capacity_factor", "lora_r", "lora_alpha",
                  "lora_dropout", "use_fm_block", "aux_balance_loss", "aux_balance_loss_coef")
    return {k: (4 if k == "num_experts" else v) for k, v in cfg.items() if k not in eight_only}


def _speech_base_state(cfg: dict, folders: ReleasedFolders, state: dict) -> dict:
    """The shared Uni-MoE-speech-base shards: a 4-expert MoE in every layer, which 8E discards."""
    four = _four_e(cfg)
    whisper_cfg = transformers.WhisperConfig.from_pretrained(folders.whisper)
    donor = ref.build_llava(four, "speech_4e", whisper_cfg)
    _redraw(donor, np.random.default_rng(99), only=".mlp.")
    moe = {k: v for k, v in donor.state_dict().items() if ".mlp." in k}
    return {**{k: v for k, v in state.items() if ".mlp." not in k}, **moe}


def _write_finetuned(folders: ReleasedFolders, cfg: dict, lm: torch.nn.Module, seed: int) -> None:
    """Stage 3: new connectors and routers, then LoRA by peft, saved as train.py saves them."""
    out = folders.finetuned
    rng = np.random.default_rng(seed + 10)
    for part in ("mm_projector", "mm_audio_aligner", "query_tokens", "mlp.gate.", ".wg."):
        _redraw(lm, rng, only=part)
    targets = ref.find_all_llm_linear_names(lm, folders.variant)
    lora_cfg = peft.LoraConfig(**LORA, target_modules=targets, bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(lm, lora_cfg)
    _redraw(model, rng, only="lora_")  # lora_B non-zero, as after training
    lora_state = {k: v for k, v in model.named_parameters() if "lora_" in k}
    model.save_pretrained(out, state_dict=lora_state, safe_serialization=False)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    torch.save(_matching(model, ("mm_projector", "vision_resampler")), out / "non_lora_trainables.bin")
    aligner = _matching(model, ("mm_audio_aligner", "query_tokens"))
    torch.save(_strip_peft_prefix(aligner), out / "mm_audio_aligner.bin")
    gate_key = "mlp.deepspeed_moe.gate." if folders.variant == "8e" else "mlp.gate."
    torch.save(_strip_peft_prefix(_matching(model, (gate_key,))), out / "mlp_gates.bin")
    if folders.variant == "8e":
        _write_expert_files(folders, model)


def _write_expert_files(folders: ReleasedFolders, model: torch.nn.Module) -> None:
    """Uni-MoE-8e-Experts/mlp_*.bin hold each source's dense FFN; the fine-tuned folder holds
    `{e}_mlp_experts.bin` from rank e of an 8-way expert-parallel run (local index 0)."""
    folders.experts.mkdir(parents=True)
    experts = _strip_peft_prefix(
        _matching(model, ("mlp.deepspeed_moe.experts.deepspeed_experts.",))
    )
    written: dict[str, int] = {}
    for e, source in enumerate(EXPERT_LIST):
        mine = f".deepspeed_experts.{e}."
        ours = {k.replace(mine, ".deepspeed_experts.0."): v for k, v in experts.items() if mine in k}
        torch.save(ours, folders.finetuned / f"{e}_mlp_experts.bin")
        if source in written:
            continue  # a duplicated source: slot e reuses the file an earlier slot defined
        written[source] = e
        dense = {}
        for k, v in ours.items():
            proj = k.split(".")[-2]
            if "lora" not in proj:
                dense[f"model.layers.{k.split('.')[2]}.mlp.{proj}.weight"] = v
        torch.save(dense, folders.experts / f"{source}.bin")


def _tie_duplicate_experts(lm: torch.nn.Module) -> None:
    """Slots with the same source file start from the same FFN (LoRA differs later)."""
    with torch.no_grad():
        for layer in lm.model.layers:
            bank = layer.mlp.deepspeed_moe.experts.deepspeed_experts
            for e, source in enumerate(EXPERT_LIST):
                first = EXPERT_LIST.index(source)
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    getattr(bank[e], proj).weight.copy_(getattr(bank[first], proj).weight)


def write_released(root: pathlib.Path, variant: str, seed: int = 0) -> ReleasedFolders:
    """Writes the released folders of a tiny random `variant` under `root`."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {VARIANTS}")
    root = pathlib.Path(root)
    clip = hf_models.save("clip_full", root / "clip-vit", seed=seed + 1)
    whisper = hf_models.save("whisper", root / "whisper", seed=seed + 2)
    folders = ReleasedFolders(
        variant, root / "base", root / "finetuned", clip, whisper,
        experts=root / "experts" if variant == "8e" else None,
        beats=root / "BEATs_iter3_plus_AS2M.pt" if variant == "audio_4e" else None,
    )
    aligner = None
    if variant == "audio_4e":
        beats_checkpoints.write(folders.beats, BEATS, seed=seed + 3)
        aligner = ref.QFormerAligner(transformers.Blip2QFormerConfig(**ref.QFORMER), LM["hidden_size"], QUERIES)
    cfg = llava_config(variant, clip, folders.beats or whisper)
    torch.manual_seed(seed)
    whisper_cfg = transformers.WhisperConfig.from_pretrained(whisper)
    lm = ref.build_llava(cfg, variant, whisper_cfg, aligner)
    _redraw(lm, np.random.default_rng(seed))
    if variant == "8e":
        _tie_duplicate_experts(lm)
    _write_base(folders, cfg, lm)
    _write_finetuned(folders, cfg, lm, seed)
    return folders


def remove(folders: ReleasedFolders) -> None:
    shutil.rmtree(folders.base.parent)
