"""Tiny random BEATs checkpoints in the published format: a torch file holding {'cfg', 'model'}
with the official state_dict names (the weight-normed pos_conv as weight_g / weight_v, layer 0's
relative position table repeated under every layer), built and read by SpeechBrain's BEATs.

Weights are redrawn at scales that make every part count (norm scales near 1, attention logits
of order 1, a strong relative position bias), so a transposed, swapped or dropped tensor moves
the features far past the parity tolerance.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch

from unimoe.convert import beats_reference

# Odd sizes; each variant switches a different set of BEATs' options. The mel bins hold at most
# input_patch_size patches, so that frames outnumber tokens, as BEATs' padding mask needs.
VARIANTS = {
    # BEATs_iter3+ in small: deep norm, gated relative bias, post_extract_proj, even conv_pos.
    "iter3": dict(
        input_patch_size=4, num_mel_bins=8, embed_dim=18, encoder_embed_dim=15,
        encoder_ffn_embed_dim=22, encoder_attention_heads=3, encoder_layers=3, conv_pos=6,
        conv_pos_groups=3, relative_position_embedding=True, num_buckets=14, max_distance=30,
        gru_rel_pos=True, deep_norm=True,
    ),
    # Post-LN without deep norm, ungated relative bias, conv bias, no projection, odd conv_pos,
    # a mel axis that leaves a partial patch.
    "plain": dict(
        input_patch_size=3, num_mel_bins=7, conv_bias=True, embed_dim=10, encoder_embed_dim=10,
        encoder_ffn_embed_dim=13, encoder_attention_heads=5, encoder_layers=2, conv_pos=5,
        conv_pos_groups=5, relative_position_embedding=True, num_buckets=11, max_distance=9,
        activation_fn="relu",
    ),
    # Pre-LN, no relative bias (gru_rel_pos' gate is built but acts on nothing), tanh GELU.
    "prenorm": dict(
        input_patch_size=4, num_mel_bins=12, embed_dim=21, encoder_embed_dim=14,
        encoder_ffn_embed_dim=19, encoder_attention_heads=7, encoder_layers=2, conv_pos=7,
        conv_pos_groups=1, layer_norm_first=True, gru_rel_pos=True, activation_fn="gelu_accurate",
    ),
}

# Training-only fields a real cfg carries (BEATs_iter3+ AS2M has these and more).
TRAINING_CFG = dict(
    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.05,
    dropout_input=0.0, layer_wise_gradient_decay_ratio=0.6, finetuned_model=False,
)

_TIED = "self_attn.relative_attention_bias.weight"


def _fresh_state_dict(cfg: dict, tmp: pathlib.Path) -> dict[str, torch.Tensor]:
    """The state_dict of a newly built SpeechBrain BEATs for cfg (names and shapes)."""
    module = beats_reference.speechbrain_beats()

    class Unloaded(module.BEATs):
        # SpeechBrain builds a BEATs only from a checkpoint file; this one has no weights yet.
        def load_state_dict(self, *args, **kwargs):
            return None

    path = tmp / "cfg_only.pt"
    torch.save({"cfg": cfg, "model": {}}, path)
    state = Unloaded(ckp_path=str(path)).state_dict()
    path.unlink()
    return state


def _redraw(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(size=shape)
    if name.endswith("norm.weight"):
        values = 1.0 + 0.1 * noise
    elif name.endswith(("original0", "grep_a")):  # weight-norm g, the gate's per-head scale
        values = 1.0 + 0.3 * np.abs(noise)
    elif name.endswith(_TIED):
        values = noise
    elif name.endswith(("weight", "original1")):  # unit-variance outputs for unit-variance inputs
        values = noise / np.sqrt(np.prod(shape[1:]))
    else:
        values = 0.1 * noise
    return values.astype(np.float32)  # as published


def write(
    path: pathlib.Path, cfg: dict, *, seed: int = 0, predictor_classes: int = 0
) -> pathlib.Path:
    """A checkpoint file of a random BEATs with `cfg` (stored as given, plus TRAINING_CFG);
    predictor_classes > 0 makes it a fine-tuned one (predictor head and label_dict)."""
    cfg = {**TRAINING_CFG, **cfg}
    if predictor_classes:
        cfg.update(finetuned_model=True, predictor_class=predictor_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    model = {}
    for name, tensor in _fresh_state_dict(cfg, path.parent).items():
        official = name.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        )
        model[official] = torch.from_numpy(_redraw(name, tuple(tensor.shape), rng))
    tied = [name for name in model if name.endswith(_TIED)]
    for name in tied[1:]:  # BEATs ties the layers' tables to layer 0's
        model[name] = model[tied[0]].clone()
    checkpoint = {"cfg": cfg, "model": model}
    if predictor_classes:
        checkpoint["label_dict"] = {i: f"/m/{i:04d}" for i in range(predictor_classes)}
    torch.save(checkpoint, path)
    return path
