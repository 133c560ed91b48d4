"""A tiny UniMoE config shared by model/stage tests (odd sizes so swapped axes fail loudly)."""

import dataclasses
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from unimoe.models.unimoe import ModelSpec, UniMoEConfig

TOKEN_IDS = dict(image_token_id=3, video_token_id=4, audio_token_id=5)


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """The fields of a tokenizer the model builder reads (the real one needs a built dataset)."""

    vocab_size: int = 41
    image_id: int = 3
    video_id: int = 4
    audio_id: int = 5


# A BEATs + Q-Former sound tower of odd sizes (`model_dict(sound=True)`), dropout-free.
SOUND = dict(
    sound=dict(
        input_patch_size=4, embed_dim=10, encoder_layers=2, encoder_embed_dim=12,
        encoder_ffn_embed_dim=14, encoder_attention_heads=3, conv_pos=5, conv_pos_groups=3,
        relative_position_embedding=True, num_buckets=8, max_distance=16, gru_rel_pos=True,
        deep_norm=True, num_mel_bins=8,
    ),
    sound_conn=dict(
        num_queries=3, width=12, depth=2, num_heads=3, mlp_dim=14, dropout_rate=0.0,
        attention_dropout_rate=0.0,
    ),
)  # fmt: skip


def model_dict(*, sound: bool = False) -> ml_collections.ConfigDict:
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
            **(SOUND if sound else {}),
        )
    )


def model_config(*, moe: bool = False, lora_rank: int = 0, sound: bool = False) -> UniMoEConfig:
    return UniMoEConfig.for_stage(
        ModelSpec.from_dict(model_dict(sound=sound)),
        vocab_size=TokenizerInfo.vocab_size,
        token_ids=TOKEN_IDS,
        num_labels=(5, 7),
        moe=moe,
        lora_rank=lora_rank,
    )


def random_module(build: Callable[[], nnx.Module], seed: int = 0, scale: float = 0.3) -> nnx.Module:
    """`build()` with every Param (LoRA included) drawn N(0, scale) with numpy, norm scales near 1.

    Far from the N(0, 0.02) init, so logits are far from uniform and argmax rarely ties. Built from
    `nnx.eval_shape` and numpy: initializing eagerly or under jit compiles every random op (seconds
    per model). The module must hold only Params (no RNG state: no dropout, no noisy router).
    """
    graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f'random_module: the module holds non-Param state {rest}')
    rng = np.random.default_rng(seed)

    def draw(path, var):
        noise = rng.normal(size=var.shape).astype(np.float32)
        is_norm_scale = any('norm' in str(p) for p in path) and str(path[-1]) == 'scale'
        return 1.0 + 0.1 * noise if is_norm_scale else scale * noise

    return nnx.merge(graphdef, jax.tree.map_with_path(draw, params), rest)
