"""The `config.model` dict of a released Uni-MoE model (`released.model_section`, `PAPER_MODEL`).

The dict `ModelSpec.from_dict` takes: sections llm, moe_layers, moe, lora, vision, audio,
audio_conn (and sound, sound_conn for 'audio_4e'), each a typed config's fields as plain JSON, so
that a converted checkpoint's recorded model and the published 7B sizes compare as dicts.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from unimoe import config as config_lib
from unimoe.convert import core
from unimoe.models import audio, beats, connectors, llm, vision
from unimoe.models.qformer import QFormerConnector
from unimoe.moe.config import MoEConfig
from unimoe.nn.lora import LoRAConfig

VARIANTS = config_lib.RELEASED_VARIANTS
# `unimoe_convert.json`'s family of a `from-unimoe` checkpoint, which also records its variant and
# config.model.
FAMILY = "unimoe_released"
# Uni-MoE-audio builds its Q-Former from `Blip2Config()` (blip2_config.py): BLIP-2's 12 heads.
BLIP2_QFORMER_HEADS = 12
# Parameters of the built model no released file holds, by path prefix: unimoe's stage-0 probe
# heads, and in the audio model (all audio through BEATs) the Whisper connector's learned
# queries and projection. Besides these, the vocabulary rows the tokenizer appends (the media
# placeholders) keep their init (`factory.load_params`).
_PROBE_HEADS = ("image_head/", "audio_head/")
NOT_IN_CHECKPOINT = {
    "speech_4e": _PROBE_HEADS,
    "8e": _PROBE_HEADS,
    "audio_4e": (*_PROBE_HEADS, "sound_head/", "audio_conn/query_tokens", "audio_conn/out_proj/"),
}
# Sections whose enc_dim / out_dim `ModelSpec.from_dict` sets from the towers and the LM.
_DERIVED = ("enc_dim", "out_dim")
# Fields `ModelSpec` owns: the tokenizer's vocabulary, the stage's MoE layers and LoRA.
_LM_OWNED = ("vocab_size", "moe", "lora", "moe_layers")


def moe_config(variant: str, num_experts: int, top_k: int) -> MoEConfig:
    """4E: softmax over the top-k logits (Mistral-style `MoeLayer`); 8E: DeepSpeed's top-2 gate,
    softmax over all then the top 2 renormalized, the second choice sampled with Gumbel noise."""
    if variant == "8e":
        return MoEConfig(
            num_experts=num_experts, top_k=top_k, router="softmax_topk", second_choice="gumbel"
        )
    return MoEConfig(num_experts=num_experts, top_k=top_k, router="topk_softmax")


def moe_layers_spec(layers: tuple[int, ...], num_layers: int) -> str | list[int]:
    if layers == tuple(range(num_layers)):
        return "all"
    if layers == tuple(range(0, num_layers, 2)):
        return "every_2"
    return list(layers)


def _plain(cfg: Any, drop: tuple[str, ...] = ()) -> dict:
    fields = json.loads(json.dumps(dataclasses.asdict(cfg)))
    return {name: value for name, value in fields.items() if name not in drop}


def model_dict(
    lm: llm.LLMConfig,
    lora: LoRAConfig,
    towers: dict[str, Any],
    sound_conn: QFormerConnector.Config | None = None,
) -> dict:
    """`config.model` for the LM `lm` (its MoE layers and router), the merged LoRA's settings
    and the towers' configs ('vision', 'audio', 'audio_conn', ['sound'])."""
    model = {
        "llm": _plain(lm, _LM_OWNED),
        "moe_layers": moe_layers_spec(lm.moe_layers, lm.num_layers),
        "moe": _plain(lm.moe),
        "lora": _plain(lora),
        "vision": _plain(towers["vision"]),
        "audio": _plain(towers["audio"]),
        "audio_conn": _plain(towers["audio_conn"], _DERIVED),
    }
    if sound_conn is not None:
        model["sound"] = _plain(towers["sound"])
        model["sound_conn"] = _plain(sound_conn, _DERIVED)
    return model


# The published sizes: Vicuna-7B, CLIP ViT-L/14-336 (hidden_states[-2]), Whisper-small, BEATs
# iter3+ AS2M, BLIP-2's Q-Former; LoRA r8 / alpha 16 / dropout 0.05 (merged: rank 0).
_LM_7B = dict(
    vocab_size=32000, dim=4096, num_layers=32, num_heads=32, num_kv_heads=32, ffn_dim=11008,
    rope_theta=10000.0, norm_eps=1e-5,
)  # fmt: skip
_TOWERS_7B = {
    "vision": vision.ViTEncoder.Config(
        image_size=336, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096,
        select_layer=-2, layer_norm_eps=1e-5,
    ),
    "audio": audio.AudioEncoder.Config(
        num_mel_bins=80, max_frames=3000, width=768, depth=12, num_heads=12, mlp_dim=3072
    ),
    "audio_conn": connectors.QueryConnector.Config(
        enc_dim=768, out_dim=4096, num_queries=50, width=768, depth=12, num_heads=12, mlp_dim=3072
    ),
    "sound": beats.BEATs.Config(
        input_patch_size=16, embed_dim=512, conv_bias=False, encoder_layers=12,
        encoder_embed_dim=768, encoder_ffn_embed_dim=3072, encoder_attention_heads=12,
        activation_fn="gelu", layer_norm_first=False, deep_norm=True, conv_pos=128,
        conv_pos_groups=16, relative_position_embedding=True, num_buckets=320, max_distance=800,
        gru_rel_pos=True, num_mel_bins=128,
    ),
}  # fmt: skip
_LAYERS_7B = {
    "speech_4e": tuple(range(32)), "audio_4e": tuple(range(0, 32, 2)), "8e": tuple(range(32))
}  # fmt: skip


def _paper(variant: str) -> dict:
    lm = llm.LLMConfig(
        **_LM_7B,
        moe_layers=_LAYERS_7B[variant],
        moe=moe_config(variant, 8 if variant == "8e" else 4, 2),
    )
    lora = LoRAConfig(rank=0, alpha=16.0, dropout=0.05, dense_ffn=variant == "audio_4e")
    sound_conn = None
    if variant == "audio_4e":
        sound_conn = QFormerConnector.Config(enc_dim=768, out_dim=4096, num_queries=50)
    return model_dict(lm, lora, _TOWERS_7B, sound_conn)


PAPER_MODEL = {variant: _paper(variant) for variant in VARIANTS}


def not_in_checkpoint(variant: str) -> tuple[str, ...]:
    """Path prefixes of the built model's parameters the checkpoint does not define."""
    return NOT_IN_CHECKPOINT[variant]


def _meta(ckpt_dir: str | pathlib.Path) -> dict:
    path = pathlib.Path(ckpt_dir) / core.META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {ckpt_dir} is not a converted checkpoint")
    return json.loads(path.read_text())


def model_section(ckpt_dir: str | pathlib.Path) -> dict:
    """The `config.model` dict `from_unimoe` recorded in `ckpt_dir`."""
    meta = _meta(ckpt_dir)
    if meta.get("family") != FAMILY or "model" not in meta:
        raise ValueError(
            f"{pathlib.Path(ckpt_dir) / core.META_FILE}: a {meta.get('family')} checkpoint, not "
            "one `from-unimoe` wrote: it records no Uni-MoE config.model"
        )
    return meta["model"]


def not_in_checkpoint_of(ckpt_dir: str | pathlib.Path) -> tuple[str, ...]:
    """`not_in_checkpoint` of the variant a converted checkpoint holds; () for another family."""
    meta = _meta(ckpt_dir)
    return not_in_checkpoint(meta["variant"]) if meta.get("family") == FAMILY else ()
