"""A tiny UniMoE config shared by model/stage tests (odd sizes so swapped axes fail loudly)."""

import dataclasses

import ml_collections

from unimoe.models.unimoe import UniMoEConfig

TOKEN_IDS = dict(image_token_id=3, video_token_id=4, audio_token_id=5)


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """The fields of a tokenizer the model builder reads (the real one needs a built dataset)."""

    vocab_size: int = 41
    image_id: int = 3
    video_id: int = 4
    audio_id: int = 5


def model_dict() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            llm=dict(dim=24, num_layers=2, num_heads=3, num_kv_heads=1, ffn_dim=20),
            vision=dict(
                image_size=12,
                patch_size=4,
                width=16,
                depth=2,
                num_heads=2,
                mlp_dim=24,
                select_layer=-2,
            ),
            audio=dict(num_mel_bins=8, max_frames=14, width=16, depth=1, num_heads=2, mlp_dim=24),
            audio_conn=dict(num_queries=3, width=16, depth=1, num_heads=2, mlp_dim=24),
            moe_layers='all',
            moe=dict(num_experts=3, top_k=2, router='topk_softmax'),
            lora=dict(alpha=16.0, dropout=0.0),
        )
    )


def model_config(*, moe: bool = False, lora_rank: int = 0) -> UniMoEConfig:
    return UniMoEConfig.from_dict(
        model_dict(),
        vocab_size=TokenizerInfo.vocab_size,
        token_ids=TOKEN_IDS,
        num_labels=(5, 7),
        moe=moe,
        lora_rank=lora_rank,
    )
