"""Per-family maps between Hugging Face tensors and unimoe parameters.

A family reads an HF `config.json` into the configs of the unimoe modules it fills (named as in
`UniMoE`: 'llm', 'vision', 'audio', 'audio_conn'), and lists `Rule`s: each unimoe parameter path
with the HF tensors it is made of and how (transposed linear, permuted conv, stacked experts, the
first rows of a table). HF tensors no rule reads but a family knows (buffers, CLIP's text tower,
Whisper's token embeddings) are kept verbatim beside the checkpoint, so `to-hf` writes the folder
back whole; any other tensor is an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from unimoe.models import audio, beats, connectors, llm, rope, vision
from unimoe.moe.config import MoEConfig

@dataclasses.dataclass(frozen=True)
class Rule:
    """unimoe param `path` <- HF tensors `hf_names` by `kind`: 'copy', 'linear', 'conv1d', 'conv2d',
    'stack_linear' or 'rows' (the first `rows` rows). HF linears are [out, in], ours [in, out]."""

    path: str
    hf_names: tuple[str, ...]
    kind: str
    rows: int = 0


@dataclasses.dataclass(frozen=True)
class Options:
    """Choices config.json does not make. select_layer: the CLIP hidden state the ViT returns
    (Uni-MoE: -2); num_queries: the Whisper decoder positions the speech connector keeps
    (Uni-MoE: 50 learned queries)."""

    select_layer: int = -2
    num_queries: int = 50


@dataclasses.dataclass(frozen=True)
class Family:
    """configs(hf_config, options) -> {module name: module config}; rules(hf_config, configs,
    names) -> Rules, where names are the folder's tensor names; kept(name) -> whether an unmapped
    HF tensor is known and carried along verbatim; check(hf_config, tensors, files) raises on
    tensors no rule reads but unimoe relies on (files: tensor name -> its file, for errors)."""

    model_types: tuple[str, ...]
    configs: Callable[[dict, Options], dict[str, Any]]
    rules: Callable[[dict, dict[str, Any], set[str]], list[Rule]]
    kept: Callable[[str], bool]
    check: Callable[[dict, Mapping[str, np.ndarray], Mapping[str, Any]], None] = (
        lambda cfg, tensors, files: None
    )


MODULES: dict[str, type] = {
    "llm": llm.DecoderLM,
    "vision": vision.ViTEncoder,
    "audio": audio.AudioEncoder,
    "audio_conn": connectors.QueryConnector,
    # BEATs (`python -m unimoe.convert from-beats`, convert/beats.py): no HF family, no to-hf.
    "sound": beats.BEATs,
}


def _require(cfg: dict, key: str, model_type: str) -> Any:
    if key not in cfg:
        raise ValueError(f"config.json ({model_type}): missing field {key!r}")
    return cfg[key]


def _unsupported(cond: bool, what: str) -> None:
    if cond:
        raise ValueError(f"config.json: {what} is not supported by unimoe")


def _linear(prefix: str, hf_prefix: str, *, bias: bool) -> list[Rule]:
    rules = [Rule(f"{prefix}/kernel", (f"{hf_prefix}.weight",), "linear")]
    if bias:
        rules.append(Rule(f"{prefix}/bias", (f"{hf_prefix}.bias",), "copy"))
    return rules


def _layer_norm(prefix: str, hf_prefix: str) -> list[Rule]:
    return [
        Rule(f"{prefix}/scale", (f"{hf_prefix}.weight",), "copy"),
        Rule(f"{prefix}/bias", (f"{hf_prefix}.bias",), "copy"),
    ]


def _attention(prefix: str, hf_prefix: str, *, key_bias: bool) -> list[Rule]:
    rules = []
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        has_bias = key_bias or proj != "k_proj"
        rules += _linear(f"{prefix}/{proj}", f"{hf_prefix}.{proj}", bias=has_bias)
    return rules


# ---------------------------------------------------------------- decoder LMs


def _rope_scaling(cfg: dict) -> tuple[float, dict]:
    """(theta, RopeScaling kwargs) from transformers 5 `rope_parameters` or 4.x fields."""
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = {**(cfg.get("rope_scaling") or {}), **params}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    _unsupported(rope_type not in rope.ROPE_TYPES, f"rope_type {rope_type!r}")
    kwargs: dict[str, Any] = {"rope_type": rope_type}
    if rope_type != "default":
        kwargs["factor"] = float(scaling["factor"])
    if rope_type == "llama3":
        kwargs["low_freq_factor"] = float(scaling["low_freq_factor"])
        kwargs["high_freq_factor"] = float(scaling["high_freq_factor"])
        kwargs["original_max_positions"] = int(scaling["original_max_position_embeddings"])
    return float(theta), kwargs


def _lm_config(
    cfg: dict, *, ffn_dim: int, moe_layers: str | tuple[int, ...], moe: MoEConfig, qkv_bias: bool
) -> dict:
    model_type = cfg.get("model_type")
    _unsupported(cfg.get("hidden_act", "silu") != "silu", f"hidden_act {cfg.get('hidden_act')!r}")
    theta, rope = _rope_scaling(cfg)
    heads = _require(cfg, "num_attention_heads", model_type)
    return {
        "llm": llm.LLMConfig(
            vocab_size=_require(cfg, "vocab_size", model_type),
            dim=_require(cfg, "hidden_size", model_type),
            num_layers=_require(cfg, "num_hidden_layers", model_type),
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            ffn_dim=ffn_dim,
            head_dim=cfg.get("head_dim") or 0,
            rope_theta=theta,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            moe_layers=moe_layers,
            moe=moe,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            rope_scaling=rope,
        )
    }


def _llama_configs(cfg: dict, options: Options) -> dict:
    _unsupported(bool(cfg.get("attention_bias")), "LLaMA attention_bias=true")
    _unsupported(bool(cfg.get("mlp_bias")), "LLaMA mlp_bias=true")
    ffn = _require(cfg, "intermediate_size", "llama")
    return _lm_config(cfg, ffn_dim=ffn, moe_layers=(), moe=MoEConfig(), qkv_bias=False)


def _mixtral_configs(cfg: dict, options: Options) -> dict:
    _unsupported(cfg.get("sliding_window") is not None, "Mixtral sliding_window")
    moe = MoEConfig(
        num_experts=_require(cfg, "num_local_experts", "mixtral"),
        top_k=_require(cfg, "num_experts_per_tok", "mixtral"),
        # Softmax over all, top-k, renormalized = the softmax over the top-k logits.
        router="topk_softmax",
    )
    ffn = _require(cfg, "intermediate_size", "mixtral")
    return _lm_config(cfg, ffn_dim=ffn, moe_layers="all", moe=moe, qkv_bias=False)


def _qwen2_moe_sparse_layers(cfg: dict) -> tuple[int, ...]:
    step = cfg.get("decoder_sparse_step", 1)
    dense = set(cfg.get("mlp_only_layers") or ())
    num_layers = _require(cfg, "num_hidden_layers", "qwen2_moe")
    return tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)


def _qwen2_moe_configs(cfg: dict, options: Options) -> dict:
    _unsupported(bool(cfg.get("use_sliding_window")), "Qwen2-MoE use_sliding_window=true")
    shared_ffn = cfg.get("shared_expert_intermediate_size", 0)
    moe = MoEConfig(
        num_experts=_require(cfg, "num_experts", "qwen2_moe"),
        top_k=_require(cfg, "num_experts_per_tok", "qwen2_moe"),
        ffn_dim=_require(cfg, "moe_intermediate_size", "qwen2_moe"),
        router="softmax_topk",
        renormalize=bool(cfg.get("norm_topk_prob", False)),
        num_shared_experts=1 if shared_ffn else 0,
        shared_ffn_dim=shared_ffn,
        shared_gate=bool(shared_ffn),
    )
    return _lm_config(
        cfg,
        ffn_dim=_require(cfg, "intermediate_size", "qwen2_moe"),
        moe_layers=_qwen2_moe_sparse_layers(cfg),
        moe=moe,
        qkv_bias=bool(cfg.get("qkv_bias", True)),
    )


def _swiglu(prefix: str, hf_prefix: str, names: tuple[str, str, str]) -> list[Rule]:
    """gate/up/down linears from HF's (gate, up, down) projection names."""
    return [
        Rule(f"{prefix}/{ours}/kernel", (f"{hf_prefix}.{theirs}.weight",), "linear")
        for ours, theirs in zip(("gate", "up", "down"), names)
    ]


def _experts(
    prefix: str, hf_prefix: str, num_experts: int, names: tuple[str, str, str]
) -> list[Rule]:
    return [
        Rule(
            f"{prefix}/experts/{ours}",
            tuple(f"{hf_prefix}.{e}.{theirs}.weight" for e in range(num_experts)),
            "stack_linear",
        )
        for ours, theirs in zip(("w_gate_edf", "w_up_edf", "w_down_efd"), names)
    ]


_LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")
_MIXTRAL_EXPERT = ("w1", "w3", "w2")


def _lm_rules(model_type: str) -> Callable[[dict, dict, set[str]], list[Rule]]:
    def rules(cfg: dict, configs: dict, names: set[str]) -> list[Rule]:
        lm: llm.LLMConfig = configs["llm"]
        out = [Rule("llm/embed/embedding", ("model.embed_tokens.weight",), "copy")]
        for i in range(lm.num_layers):
            p, h = f"llm/layers/{i}", f"model.layers.{i}"
            out += [
                Rule(f"{p}/attn_norm/scale", (f"{h}.input_layernorm.weight",), "copy"),
                Rule(f"{p}/ffn_norm/scale", (f"{h}.post_attention_layernorm.weight",), "copy"),
            ]
            for ours, theirs in zip("qkvo", ("q_proj", "k_proj", "v_proj", "o_proj")):
                out += _linear(
                    f"{p}/attn/{ours}",
                    f"{h}.self_attn.{theirs}",
                    bias=lm.qkv_bias and ours != "o",
                )
            f = f"{p}/ffn"
            if i not in lm.moe_layers:
                out += _swiglu(f, f"{h}.mlp", _LLAMA_MLP)
            elif model_type == "mixtral":
                moe_prefix = f"{h}.block_sparse_moe"
                out += _linear(f"{f}/router", f"{moe_prefix}.gate", bias=False)
                out += _experts(f, f"{moe_prefix}.experts", lm.moe.num_experts, _MIXTRAL_EXPERT)
            else:
                out += _linear(f"{f}/router", f"{h}.mlp.gate", bias=False)
                out += _experts(f, f"{h}.mlp.experts", lm.moe.num_experts, _LLAMA_MLP)
                if lm.moe.num_shared_experts:
                    out += _swiglu(f"{f}/shared_experts", f"{h}.mlp.shared_expert", _LLAMA_MLP)
                    out += _linear(f"{f}/shared_gate", f"{h}.mlp.shared_expert_gate", bias=False)
        out.append(Rule("llm/final_norm/scale", ("model.norm.weight",), "copy"))
        if not lm.tie_embeddings:
            out.append(Rule("llm/lm_head/kernel", ("lm_head.weight",), "linear"))
        return out

    return rules


def _lm_kept(name: str) -> bool:
    # Old checkpoints store RoPE's buffer; tied ones may store the head (a copy of the embedding).
    return name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"


# ---------------------------------------------------------------- CLIP vision tower


def _clip_vision_cfg(cfg: dict) -> dict:
    return cfg["vision_config"] if cfg.get("model_type") == "clip" else cfg


def _clip_configs(cfg: dict, options: Options) -> dict:
    v = _clip_vision_cfg(cfg)
    _unsupported(
        v.get("hidden_act", "quick_gelu") != "quick_gelu",
        f"CLIP hidden_act {v.get('hidden_act')!r}",
    )
    _unsupported(v.get("num_channels", 3) != 3, "CLIP num_channels != 3")
    return {
        "vision": vision.ViTEncoder.Config(
            image_size=_require(v, "image_size", "clip vision"),
            patch_size=_require(v, "patch_size", "clip vision"),
            width=_require(v, "hidden_size", "clip vision"),
            depth=_require(v, "num_hidden_layers", "clip vision"),
            num_heads=_require(v, "num_attention_heads", "clip vision"),
            mlp_dim=_require(v, "intermediate_size", "clip vision"),
            select_layer=options.select_layer,
            layer_norm_eps=v.get("layer_norm_eps", 1e-5),
        )
    }


def clip_prefix(names: set[str]) -> str:
    """'vision_model.' in CLIPModel folders (and older CLIPVisionModel ones), '' in
    transformers 5 CLIPVisionModel folders."""
    return "vision_model." if "vision_model.pre_layrnorm.weight" in names else ""


def _clip_rules(cfg: dict, configs: dict, names: set[str]) -> list[Rule]:
    vc: vision.ViTEncoder.Config = configs["vision"]
    top = clip_prefix(names)
    emb = f"{top}embeddings"
    out = [
        Rule("vision/patch_embedding/kernel", (f"{emb}.patch_embedding.weight",), "conv2d"),
        Rule("vision/class_embedding", (f"{emb}.class_embedding",), "copy"),
        Rule("vision/position_embedding/embedding", (f"{emb}.position_embedding.weight",), "copy"),
        *_layer_norm("vision/pre_layrnorm", f"{top}pre_layrnorm"),
    ]
    for i in range(vc.depth):
        p, h = f"vision/layers/{i}", f"{top}encoder.layers.{i}"
        out += _layer_norm(f"{p}/layer_norm1", f"{h}.layer_norm1")
        out += _attention(f"{p}/self_attn", f"{h}.self_attn", key_bias=True)
        out += _layer_norm(f"{p}/layer_norm2", f"{h}.layer_norm2")
        out += _linear(f"{p}/mlp/fc1", f"{h}.mlp.fc1", bias=True)
        out += _linear(f"{p}/mlp/fc2", f"{h}.mlp.fc2", bias=True)
    return out + _layer_norm("vision/post_layernorm", f"{top}post_layernorm")


# A full CLIPModel (as clip-vit-large-patch14-336) also holds these; Uni-MoE uses the vision tower.
_CLIP_NON_VISION = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")


def _clip_kept(name: str) -> bool:
    return name.endswith("embeddings.position_ids") or name.startswith(_CLIP_NON_VISION)


# ---------------------------------------------------------------- Whisper


def whisper_prefix(names: set[str]) -> str:
    """'model.' for WhisperForConditionalGeneration folders, '' for WhisperModel ones."""
    return "model." if "model.encoder.conv1.weight" in names else ""


def _whisper_configs(cfg: dict, options: Options) -> dict:
    _unsupported(cfg.get("activation_function", "gelu") != "gelu", "Whisper activation_function")
    width = _require(cfg, "d_model", "whisper")
    max_targets = _require(cfg, "max_target_positions", "whisper")
    num_queries = options.num_queries
    if not 0 < num_queries <= max_targets:
        raise ValueError(
            f"num_queries={num_queries}: the Whisper decoder has {max_targets} positions "
            "(max_target_positions)"
        )
    return {
        "audio": audio.AudioEncoder.Config(
            num_mel_bins=_require(cfg, "num_mel_bins", "whisper"),
            max_frames=2 * _require(cfg, "max_source_positions", "whisper"),
            width=width,
            depth=_require(cfg, "encoder_layers", "whisper"),
            num_heads=_require(cfg, "encoder_attention_heads", "whisper"),
            mlp_dim=_require(cfg, "encoder_ffn_dim", "whisper"),
        ),
        # Uni-MoE's speech aligner: the decoder fed learned queries; out_dim is the LM's, unknown
        # here, so the projection (not an HF tensor) is sized as the identity width.
        "audio_conn": connectors.QueryConnector.Config(
            enc_dim=width,
            out_dim=width,
            num_queries=num_queries,
            width=width,
            depth=_require(cfg, "decoder_layers", "whisper"),
            num_heads=_require(cfg, "decoder_attention_heads", "whisper"),
            mlp_dim=_require(cfg, "decoder_ffn_dim", "whisper"),
        ),
    }


def _whisper_rules(cfg: dict, configs: dict, names: set[str]) -> list[Rule]:
    ac: audio.AudioEncoder.Config = configs["audio"]
    qc: connectors.QueryConnector.Config = configs["audio_conn"]
    enc = f"{whisper_prefix(names)}encoder"
    dec = f"{whisper_prefix(names)}decoder"
    out = []
    for conv in ("conv1", "conv2"):
        out += [
            Rule(f"audio/{conv}/kernel", (f"{enc}.{conv}.weight",), "conv1d"),
            Rule(f"audio/{conv}/bias", (f"{enc}.{conv}.bias",), "copy"),
        ]

    def block(p: str, h: str, *, cross: bool) -> list[Rule]:
        rules = _attention(f"{p}/self_attn", f"{h}.self_attn", key_bias=False)
        rules += _layer_norm(f"{p}/self_attn_layer_norm", f"{h}.self_attn_layer_norm")
        if cross:
            rules += _attention(f"{p}/encoder_attn", f"{h}.encoder_attn", key_bias=False)
            rules += _layer_norm(f"{p}/encoder_attn_layer_norm", f"{h}.encoder_attn_layer_norm")
        rules += _linear(f"{p}/fc1", f"{h}.fc1", bias=True)
        rules += _linear(f"{p}/fc2", f"{h}.fc2", bias=True)
        return rules + _layer_norm(f"{p}/final_layer_norm", f"{h}.final_layer_norm")

    for i in range(ac.depth):
        out += block(f"audio/layers/{i}", f"{enc}.layers.{i}", cross=False)
    out += _layer_norm("audio/layer_norm", f"{enc}.layer_norm")
    out.append(
        Rule(
            "audio_conn/embed_positions/embedding",
            (f"{dec}.embed_positions.weight",),
            "rows",
            rows=qc.num_queries,
        )
    )
    for i in range(qc.depth):
        out += block(f"audio_conn/layers/{i}", f"{dec}.layers.{i}", cross=True)
    return out + _layer_norm("audio_conn/layer_norm", f"{dec}.layer_norm")


def _whisper_kept(name: str) -> bool:
    # The encoder's sinusoids are recomputed (and checked); the decoder's token embeddings (and the
    # tied head) are unused with learned queries; the full position table rides along for to-hf.
    return (
        name.removeprefix("model.")
        in (
            "encoder.embed_positions.weight",
            "decoder.embed_tokens.weight",
            "decoder.embed_positions.weight",
        )
        or name == "proj_out.weight"
    )


def _whisper_check(cfg: dict, tensors: Mapping[str, np.ndarray], files: Mapping[str, Any]) -> None:
    """unimoe computes the encoder's position table; a stored one must be that sinusoid table."""
    name = f"{whisper_prefix(set(tensors))}encoder.embed_positions.weight"
    if name not in tensors:
        return
    stored = np.asarray(tensors[name], np.float32)
    table = audio.sinusoids(stored.shape[0], stored.shape[1])
    diff = float(np.max(np.abs(stored - table)))
    # float16 checkpoints round the table by up to ~5e-4.
    if diff > 1e-3:
        raise ValueError(
            f"{files[name]}: tensor {name!r} is not Whisper's sinusoid table (max difference {diff:.3g}); "
            "unimoe's AudioEncoder computes that table, so these positions cannot be converted"
        )


FAMILIES: dict[str, Family] = {
    "llama": Family(("llama",), _llama_configs, _lm_rules("llama"), _lm_kept),
    "mixtral": Family(("mixtral",), _mixtral_configs, _lm_rules("mixtral"), _lm_kept),
    "qwen2_moe": Family(("qwen2_moe",), _qwen2_moe_configs, _lm_rules("qwen2_moe"), _lm_kept),
    "clip_vision": Family(("clip_vision_model", "clip"), _clip_configs, _clip_rules, _clip_kept),
    "whisper": Family(
        ("whisper",), _whisper_configs, _whisper_rules, _whisper_kept, _whisper_check
    ),
}


def family_of(hf_config: dict, source: str) -> str:
    """The family name for a config.json's model_type; `source` names the file in errors."""
    model_type = hf_config.get("model_type")
    for name, family in FAMILIES.items():
        if model_type in family.model_types:
            return name
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported: {known}")
