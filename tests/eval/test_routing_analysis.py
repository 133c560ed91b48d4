import numpy as np
from flax import nnx

from tests.tiny_model import model_config
from unimoe.eval.routing_analysis import expert_usage_by_layer
from unimoe.models.unimoe import UniMoE


def batch(rng: np.random.Generator, modalities: list[str], valid: list[bool], pad_from: int):
    tokens = rng.integers(6, 41, size=(len(modalities), 8)).astype(np.int32)
    attn_mask = np.ones_like(tokens, bool)
    attn_mask[:, pad_from:] = False
    return {
        'tokens': tokens,
        'attn_mask': attn_mask,
        'image': np.zeros((len(modalities), 12, 12, 3), np.float32),
        'video': np.zeros((len(modalities), 2, 12, 12, 3), np.float32),
        'audio_mel': np.zeros((len(modalities), 14, 8), np.float32),
        'has_image': np.zeros(len(modalities), bool),
        'has_video': np.zeros(len(modalities), bool),
        'has_audio': np.zeros(len(modalities), bool),
        'modality_name': modalities,
        'valid': np.asarray(valid),
    }


def test_usage_per_layer_counts_valid_rows_and_tokens_only():
    model = UniMoE(model_config(moe=True), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    batches = [
        batch(rng, ['text', 'image'], [True, True], pad_from=8),
        batch(rng, ['image', 'text'], [True, False], pad_from=5),
    ]
    usage = expert_usage_by_layer(model, batches)
    assert set(usage) == {'text', 'image'}  # the invalid padding row adds no modality
    for shares_le in usage.values():
        assert shares_le.shape == (2, 3)
        np.testing.assert_allclose(shares_le.sum(-1), 1.0)

    # Zero routers: every logit ties, so top-2 takes experts 0 and 1 for every token and layer.
    for layer in model.llm.layers:
        layer.ffn.router.kernel[...] = np.zeros_like(layer.ffn.router.kernel[...])
    usage = expert_usage_by_layer(model, batches)
    for shares_le in usage.values():
        np.testing.assert_allclose(shares_le, [[0.5, 0.5, 0.0]] * 2)
