"""ViTEncoder: parity with Hugging Face CLIPVisionModel, validation."""

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from unimoe.models.vision import Attention, ViTEncoder

# Dims shared with the audio and connector tests, so eager JAX compiles each shape once.
CFG = ViTEncoder.Config(image_size=15, patch_size=5, width=12, depth=3, num_heads=3, mlp_dim=13)


def _hf_model(cfg: ViTEncoder.Config) -> transformers.CLIPVisionModel:
    torch.manual_seed(0)
    hf_cfg = transformers.CLIPVisionConfig(
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act="quick_gelu",
        layer_norm_eps=cfg.layer_norm_eps,
    )
    model = transformers.CLIPVisionModel(hf_cfg).eval()
    # HF initialises LayerNorms to identity and biases to zero; randomise them so they are tested.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def _copy_linear(linear: nnx.Linear, hf: dict, prefix: str) -> None:
    linear.kernel[...] = hf[f"{prefix}.weight"].T
    if linear.bias is not None:
        linear.bias[...] = hf[f"{prefix}.bias"]


def _copy_norm(norm: nnx.LayerNorm, hf: dict, prefix: str) -> None:
    norm.scale[...] = hf[f"{prefix}.weight"]
    norm.bias[...] = hf[f"{prefix}.bias"]


def _load(ours: ViTEncoder, model: transformers.CLIPVisionModel) -> None:
    hf = {k.removeprefix("vision_model."): v.numpy() for k, v in model.state_dict().items()}
    ours.patch_embedding.kernel[...] = hf["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0)
    ours.class_embedding[...] = hf["embeddings.class_embedding"]
    ours.position_embedding.embedding[...] = hf["embeddings.position_embedding.weight"]
    _copy_norm(ours.pre_layrnorm, hf, "pre_layrnorm")
    _copy_norm(ours.post_layernorm, hf, "post_layernorm")
    for i, block in enumerate(ours.layers):
        p = f"encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _copy_linear(getattr(block.self_attn, proj), hf, f"{p}.self_attn.{proj}")
        _copy_norm(block.layer_norm1, hf, f"{p}.layer_norm1")
        _copy_norm(block.layer_norm2, hf, f"{p}.layer_norm2")
        _copy_linear(block.mlp.fc1, hf, f"{p}.mlp.fc1")
        _copy_linear(block.mlp.fc2, hf, f"{p}.mlp.fc2")


@pytest.fixture(scope="module")
def hf_and_images():
    images_bchw = torch.randn(2, 3, CFG.image_size, CFG.image_size)
    model = _hf_model(CFG)
    with torch.no_grad():
        out = model(pixel_values=images_bchw, output_hidden_states=True)
    return model, images_bchw.numpy().transpose(0, 2, 3, 1), out


@pytest.mark.parametrize("select_layer", [-2, 0, 3, -1])
def test_features_match_hf_clip(hf_and_images, select_layer):
    model, images_bhwc, out = hf_and_images
    cfg = ViTEncoder.Config(**{**CFG.__dict__, "select_layer": select_layer})
    ours = ViTEncoder(cfg, rngs=nnx.Rngs(1))
    _load(ours, model)
    feats_bnd = np.asarray(ours(images_bhwc))
    assert feats_bnd.shape == (2, ours.num_patches, CFG.width) == (2, 9, 12)
    expected = out.hidden_states[select_layer][:, 1:].numpy()
    np.testing.assert_allclose(feats_bnd, expected, atol=1e-4, rtol=0)


def test_pooled_matches_hf_pooler_output(hf_and_images):
    model, images_bhwc, out = hf_and_images
    ours = ViTEncoder(CFG, rngs=nnx.Rngs(1))
    _load(ours, model)
    np.testing.assert_allclose(
        np.asarray(ours.pooled(images_bhwc)), out.pooler_output.numpy(), atol=1e-4, rtol=0
    )


def test_param_paths_mirror_hf():
    ours = ViTEncoder(CFG, rngs=nnx.Rngs(0))
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    assert {
        "patch_embedding/kernel",
        "class_embedding",
        "position_embedding/embedding",
        "pre_layrnorm/scale",
        "layers/2/self_attn/k_proj/bias",
        "layers/0/mlp/fc2/kernel",
        "layers/1/layer_norm2/bias",
        "post_layernorm/scale",
    } <= paths
    assert "patch_embedding/bias" not in paths


def test_attention_mask_blocks_keys():
    attn = Attention(Attention.Config(width=12, num_heads=3), rngs=nnx.Rngs(0))
    x_bqd = np.random.default_rng(0).normal(size=(1, 4, 12)).astype(np.float32)
    only_first_key = np.array([True, False, False, False])
    # With one visible key the softmax is one-hot, so every query reads v_proj(x[0]).
    expected = attn.out_proj(attn.v_proj(x_bqd[:, :1]))
    np.testing.assert_allclose(
        np.asarray(attn(x_bqd, mask_bqs=only_first_key)),
        np.broadcast_to(expected, (1, 4, 12)),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"image_size": 16, "patch_size": 5}, "image_size"),
        ({"select_layer": 4}, "select_layer"),
        ({"select_layer": -5}, "select_layer"),
        ({"mlp_dim": 0}, "mlp_dim"),
    ],
)
def test_bad_config_raises(overrides, field):
    with pytest.raises(ValueError, match=field):
        ViTEncoder.Config(**{**CFG.__dict__, **overrides})


def test_bad_input_raises():
    ours = ViTEncoder(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="images_bhwc"):
        ours(np.zeros((1, 3, 15, 15), np.float32))
    with pytest.raises(ValueError, match="num_heads"):
        ViTEncoder.Config(width=10, num_heads=4)
