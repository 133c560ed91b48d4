"""MLPProjector and QueryConnector: exact values, HF Whisper-decoder parity, masking."""

import math

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.models.whisper.modeling_whisper import WhisperDecoder

from unimoe.models.connectors import MLPProjector, QueryConnector

# Dims shared with the vision and audio tests, so eager JAX compiles each shape once.
QCFG = QueryConnector.Config(
    enc_dim=7, out_dim=13, num_queries=5, width=12, depth=2, num_heads=3, mlp_dim=13
)


def _np_gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def test_mlp_projector_hand_computed():
    proj = MLPProjector(MLPProjector.Config(in_dim=2, out_dim=1, hidden_dim=2), rngs=nnx.Rngs(0))
    proj.fc1.kernel[...] = np.array([[1.0, 0.0], [0.0, -1.0]])
    proj.fc1.bias[...] = np.array([0.0, 0.0])
    proj.fc2.kernel[...] = np.array([[2.0], [1.0]])
    proj.fc2.bias[...] = np.array([0.5])
    # fc1([1, 1]) = [1, -1]; gelu(1) = 0.841345, gelu(-1) = -0.158655; 2*0.841345 - 0.158655 + 0.5
    y = np.asarray(proj(np.array([[[1.0, 1.0]]], np.float32)))
    np.testing.assert_allclose(y, [[[2.024035]]], atol=1e-5)


def test_mlp_projector_matches_numpy():
    proj = MLPProjector(MLPProjector.Config(in_dim=7, out_dim=12), rngs=nnx.Rngs(0))
    assert proj.fc1.kernel.shape == (7, 12)  # hidden_dim 0 -> out_dim
    x_bnd = np.random.default_rng(0).normal(size=(2, 5, 7)).astype(np.float32)
    w1, b1 = np.asarray(proj.fc1.kernel[...]), np.asarray(proj.fc1.bias[...])
    w2, b2 = np.asarray(proj.fc2.kernel[...]), np.asarray(proj.fc2.bias[...])
    expected = _np_gelu(x_bnd @ w1 + b1) @ w2 + b2
    np.testing.assert_allclose(np.asarray(proj(x_bnd)), expected, atol=1e-5)


def _enc(seed: int, shape=(3, 9, QCFG.enc_dim)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_query_connector_shape_odd_dims():
    conn = QueryConnector(QCFG, rngs=nnx.Rngs(0))
    assert conn(_enc(0)).shape == (3, QCFG.num_queries, QCFG.out_dim)
    assert conn.enc_proj.kernel.shape == (QCFG.enc_dim, QCFG.width)


def test_query_connector_respects_encoder_mask():
    conn = QueryConnector(QCFG, rngs=nnx.Rngs(0))
    enc_bsd = _enc(0)
    mask_bs = np.ones((3, 9), bool)
    mask_bs[:, 6:] = False
    mask_bs[1, 2:] = False
    changed_bsd = enc_bsd.copy()
    changed_bsd[~mask_bs] = _enc(1)[~mask_bs]
    np.testing.assert_allclose(
        np.asarray(conn(changed_bsd, mask_bs)), np.asarray(conn(enc_bsd, mask_bs)), atol=1e-6
    )
    # Without the mask those positions are read, so the same change must show.
    assert np.abs(np.asarray(conn(changed_bsd)) - np.asarray(conn(enc_bsd))).max() > 1e-3


def test_query_connector_reads_encoder():
    conn = QueryConnector(QCFG, rngs=nnx.Rngs(0))
    changed_bsd = _enc(0)
    changed_bsd[2, 4] += 1.0  # only example 2 changes
    diff_bqd = np.abs(np.asarray(conn(changed_bsd)) - np.asarray(conn(_enc(0))))
    assert diff_bqd[2].min() > 0 and diff_bqd[2].max() > 1e-3
    np.testing.assert_allclose(diff_bqd[:2], 0.0, atol=1e-6)


def _copy(module: nnx.Module, hf: dict, prefix: str) -> None:
    weight = hf[f"{prefix}.weight"]
    if isinstance(module, nnx.LayerNorm):
        module.scale[...] = weight
    else:
        module.kernel[...] = weight.T
    if module.bias is not None:
        module.bias[...] = hf[f"{prefix}.bias"]


def test_query_connector_matches_hf_whisper_decoder():
    cfg = QueryConnector.Config(**{**QCFG.__dict__, "enc_dim": QCFG.width})
    torch.manual_seed(0)
    decoder = WhisperDecoder(
        transformers.WhisperConfig(
            d_model=cfg.width,
            decoder_layers=cfg.depth,
            decoder_attention_heads=cfg.num_heads,
            decoder_ffn_dim=cfg.mlp_dim,
            max_target_positions=cfg.num_queries,
            vocab_size=11,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
            decoder_start_token_id=0,
            encoder_layers=1,
            encoder_attention_heads=1,
            encoder_ffn_dim=4,
            num_mel_bins=4,
        )
    ).eval()
    with torch.no_grad():  # HF's identity LayerNorms and zero biases would test nothing
        for name, param in decoder.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    conn = QueryConnector(cfg, rngs=nnx.Rngs(0))
    assert conn.enc_proj is None
    hf = {k: v.numpy() for k, v in decoder.state_dict().items()}
    conn.embed_positions.embedding[...] = hf["embed_positions.weight"]
    _copy(conn.layer_norm, hf, "layer_norm")
    for i, layer in enumerate(conn.layers):
        for name in (
            "self_attn_layer_norm",
            "encoder_attn_layer_norm",
            "fc1",
            "fc2",
            "final_layer_norm",
        ):
            _copy(getattr(layer, name), hf, f"layers.{i}.{name}")
        for attn in ("self_attn", "encoder_attn"):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                _copy(getattr(getattr(layer, attn), proj), hf, f"layers.{i}.{attn}.{proj}")
    enc_bsd = _enc(0, (2, 9, cfg.width))
    queries_bqd = torch.tensor(np.asarray(conn.query_tokens[...]))[None].repeat(2, 1, 1)
    with torch.no_grad():
        hidden_bqd = decoder(
            inputs_embeds=queries_bqd, encoder_hidden_states=torch.tensor(enc_bsd), use_cache=False
        ).last_hidden_state.numpy()
    out_kernel, out_bias = (
        np.asarray(conn.out_proj.kernel[...]),
        np.asarray(conn.out_proj.bias[...]),
    )
    expected = hidden_bqd @ out_kernel + out_bias
    np.testing.assert_allclose(np.asarray(conn(enc_bsd)), expected, atol=1e-4, rtol=0)


def test_param_paths():
    conn = QueryConnector(QCFG, rngs=nnx.Rngs(0))
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(conn, nnx.Param))}
    assert {
        "query_tokens",
        "embed_positions/embedding",
        "enc_proj/kernel",
        "layers/1/encoder_attn/q_proj/kernel",
        "layers/0/self_attn_layer_norm/scale",
        "layers/0/fc2/bias",
        "layer_norm/scale",
        "out_proj/kernel",
    } <= paths
    assert "layers/0/encoder_attn/k_proj/bias" not in paths


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (MLPProjector, {"in_dim": 0, "out_dim": 3}, "in_dim"),
        (MLPProjector, {"in_dim": 2, "out_dim": 3, "hidden_dim": -1}, "hidden_dim"),
        (QueryConnector, {**QCFG.__dict__, "num_queries": 0}, "num_queries"),
        (QueryConnector, {**QCFG.__dict__, "num_heads": 5}, "num_heads"),
    ],
)
def test_bad_config_raises(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls.Config(**kwargs)


def test_bad_input_raises():
    conn = QueryConnector(QCFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="enc_dim"):
        conn(_enc(0, (3, 9, QCFG.enc_dim + 1)))
    with pytest.raises(ValueError, match="enc_mask_bs"):
        conn(_enc(0), np.ones((3, 8), bool))
    proj = MLPProjector(MLPProjector.Config(in_dim=7, out_dim=12), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="in_dim"):
        proj(np.zeros((1, 2, 4), np.float32))
