"""AudioEncoder: parity with Hugging Face's WhisperEncoder, shapes, validation."""

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from unimoe.models.audio import AudioEncoder

CFG = AudioEncoder.Config(num_mel_bins=7, max_frames=22, width=12, depth=2, num_heads=3, mlp_dim=13)


def _hf_encoder(cfg: AudioEncoder.Config, max_source_positions: int) -> WhisperEncoder:
    torch.manual_seed(0)
    hf_cfg = transformers.WhisperConfig(
        num_mel_bins=cfg.num_mel_bins,
        d_model=cfg.width,
        encoder_layers=cfg.depth,
        encoder_attention_heads=cfg.num_heads,
        encoder_ffn_dim=cfg.mlp_dim,
        max_source_positions=max_source_positions,
        decoder_layers=1,
        decoder_attention_heads=1,
        decoder_ffn_dim=4,
        vocab_size=11,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=0,
    )
    encoder = WhisperEncoder(hf_cfg).eval()
    # HF initialises LayerNorms to identity and biases to zero; randomise them so they are tested.
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return encoder


def _copy(module: nnx.Module, hf: dict, prefix: str) -> None:
    """Copies an HF Linear / Conv1d / LayerNorm into its nnx counterpart."""
    weight = hf[f"{prefix}.weight"]
    if isinstance(module, nnx.LayerNorm):
        module.scale[...] = weight
    elif isinstance(module, nnx.Conv):
        module.kernel[...] = weight.transpose(2, 1, 0)
    else:
        module.kernel[...] = weight.T
    if module.bias is not None:
        module.bias[...] = hf[f"{prefix}.bias"]


def _load(ours: AudioEncoder, encoder: WhisperEncoder) -> None:
    hf = {k: v.numpy() for k, v in encoder.state_dict().items()}
    for name in ("conv1", "conv2", "layer_norm"):
        _copy(getattr(ours, name), hf, name)
    for i, layer in enumerate(ours.layers):
        for name in ("self_attn_layer_norm", "fc1", "fc2", "final_layer_norm"):
            _copy(getattr(layer, name), hf, f"layers.{i}.{name}")
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _copy(getattr(layer.self_attn, proj), hf, f"layers.{i}.self_attn.{proj}")


@pytest.mark.parametrize("num_frames", [CFG.max_frames, 10])
def test_matches_hf_whisper_encoder(num_frames):
    # HF only accepts exactly 2 * max_source_positions frames; a shorter input is compared with an
    # HF encoder of that size (same weights, its sinusoid table is a prefix of the longer one).
    encoder = _hf_encoder(CFG, max_source_positions=num_frames // 2)
    ours = AudioEncoder(CFG, rngs=nnx.Rngs(1))
    _load(ours, encoder)  # embed_positions is not copied: ours must compute the same sinusoids
    mel_bma = torch.randn(2, CFG.num_mel_bins, num_frames)
    with torch.no_grad():
        expected = encoder(mel_bma).last_hidden_state.numpy()
    mel_bam = mel_bma.numpy().transpose(0, 2, 1)
    feats_bsd = np.asarray(ours(mel_bam))
    assert feats_bsd.shape == (2, num_frames // 2, CFG.width)
    np.testing.assert_allclose(feats_bsd, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(ours.pooled(mel_bam)), expected.mean(1), atol=1e-4)


@pytest.mark.parametrize("num_frames, num_positions", [(1, 1), (21, 11)])
def test_odd_lengths_give_ceil_half(num_frames, num_positions):
    ours = AudioEncoder(CFG, rngs=nnx.Rngs(0))
    feats_bsd = ours(np.ones((3, num_frames, CFG.num_mel_bins), np.float32))
    assert feats_bsd.shape == (3, num_positions, CFG.width)


def test_param_paths_mirror_hf():
    ours = AudioEncoder(CFG, rngs=nnx.Rngs(0))
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    assert {
        "conv1/kernel",
        "conv2/bias",
        "layers/1/self_attn/q_proj/bias",
        "layers/0/self_attn/k_proj/kernel",
        "layers/0/fc1/kernel",
        "layers/1/final_layer_norm/scale",
        "layer_norm/bias",
    } <= paths
    assert "layers/0/self_attn/k_proj/bias" not in paths
    assert not any("embed_positions" in p for p in paths)


def test_too_many_frames_raises():
    ours = AudioEncoder(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="23 frames"):
        ours(np.zeros((1, 23, CFG.num_mel_bins), np.float32))
    with pytest.raises(ValueError, match="mel_bam"):
        ours(np.zeros((1, 10, CFG.num_mel_bins + 1), np.float32))


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"max_frames": 21}, "max_frames"),
        ({"num_heads": 5}, "num_heads"),
        ({"width": 2}, "width"),
        ({"depth": 0}, "depth"),
    ],
)
def test_bad_config_raises(overrides, field):
    with pytest.raises(ValueError, match=field):
        AudioEncoder.Config(**{**CFG.__dict__, **overrides})
