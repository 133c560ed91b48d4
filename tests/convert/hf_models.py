"""Tiny random Hugging Face models at odd sizes, saved with `save_pretrained` (no downloads).

Weights are redrawn larger than HF's N(0, 0.02) init (norm scales near 1), so a transposed,
swapped or dropped tensor moves the outputs far past the parity tolerance.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers

# hidden 96, 6 heads, 2 KV heads, 6 experts, top-3, as the issue asks; layers and vocab kept small.
LM = dict(
    vocab_size=61,
    hidden_size=96,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=64,
    attn_implementation="eager",
)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.from_numpy(rng.normal(size=tuple(param.shape)).astype(np.float32))
            is_norm = "norm" in name or "layernorm" in name
            param.copy_(1.0 + 0.1 * noise if is_norm and name.endswith("weight") else 0.1 * noise)


def llama(**overrides) -> transformers.PreTrainedModel:
    cfg = transformers.LlamaConfig(**{**LM, "intermediate_size": 80, **overrides})
    return transformers.LlamaForCausalLM(cfg)


def mixtral() -> transformers.PreTrainedModel:
    cfg = transformers.MixtralConfig(
        **LM, intermediate_size=40, num_local_experts=6, num_experts_per_tok=3
    )
    return transformers.MixtralForCausalLM(cfg)


def qwen2_moe() -> transformers.PreTrainedModel:
    cfg = transformers.Qwen2MoeConfig(
        **LM,
        intermediate_size=80,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=56,
        num_experts=6,
        num_experts_per_tok=3,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[1],  # one dense layer: the map must handle both kinds
    )
    return transformers.Qwen2MoeForCausalLM(cfg)


CLIP_VISION = dict(
    hidden_size=48,
    intermediate_size=72,
    num_hidden_layers=3,
    num_attention_heads=6,
    image_size=20,
    patch_size=4,
    hidden_act="quick_gelu",
)


def clip_vision() -> transformers.PreTrainedModel:
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP_VISION))


def clip_full() -> transformers.PreTrainedModel:
    """A whole CLIPModel, as the published clip-vit-large-patch14-336 folder."""
    text = dict(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    cfg = transformers.CLIPConfig(text_config=text, vision_config=CLIP_VISION, projection_dim=24)
    return transformers.CLIPModel(cfg)


def whisper() -> transformers.PreTrainedModel:
    cfg = transformers.WhisperConfig(
        vocab_size=53,
        num_mel_bins=10,
        d_model=48,
        encoder_layers=2,
        encoder_attention_heads=6,
        encoder_ffn_dim=72,
        decoder_layers=2,
        decoder_attention_heads=6,
        decoder_ffn_dim=72,
        max_source_positions=15,
        max_target_positions=20,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    return transformers.WhisperForConditionalGeneration(cfg)


BUILDERS = {
    "llama": llama,
    "llama_rope_linear": lambda: llama(
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}
    ),
    "llama_rope_llama3": lambda: llama(
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 500000.0,
        },
        tie_word_embeddings=True,
    ),
    "mixtral": mixtral,
    "qwen2_moe": qwen2_moe,
    "clip_vision": clip_vision,
    "clip_full": clip_full,
    "whisper": whisper,
}


def save(name: str, out_dir: pathlib.Path, *, seed: int = 0, **save_kwargs) -> pathlib.Path:
    torch.manual_seed(seed)
    model = BUILDERS[name]().eval()
    _randomize(model, seed)
    if name == "whisper":
        # Whisper's encoder positions are the fixed sinusoid table, not free weights.
        from unimoe.models.audio import sinusoids

        table = model.model.encoder.embed_positions.weight
        with torch.no_grad():
            table.copy_(torch.from_numpy(sinusoids(*table.shape)))
    model.save_pretrained(out_dir, **save_kwargs)
    return out_dir
