"""BEATs: parity with SpeechBrain's PyTorch BEATs at the same weights (tiny random checkpoints,
several cfg variants, with and without padding), its relative position buckets and padding mask,
config defaults and validation."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.models import beats_checkpoints
from unimoe.convert import beats, beats_reference, core
from unimoe.models.abstract import abstract_module
from unimoe.models.beats import BEATs, relative_position_buckets, token_padding_mask

TOLERANCE = 1e-4
NUM_FRAMES = 43  # ten patches and a partial one for input_patch_size 4; odd


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("beats")
    return {
        name: beats_checkpoints.write(folder / f"{name}.pt", cfg, seed=i)
        for i, (name, cfg) in enumerate(beats_checkpoints.VARIANTS.items())
    }


@nnx.jit
def _features(model, fbank_bfm, padding_bf):
    return model(fbank_bfm, padding_bf)


def _ours(path, cfg_override=None):
    conv, _ = beats.read_beats(path)
    configs = conv.configs
    if cfg_override:
        configs = {beats.MODULE: dataclasses.replace(configs[beats.MODULE], **cfg_override)}
    model = core.abstract_modules(configs)[beats.MODULE]
    core.load_into({beats.MODULE: model}, conv.params)
    return model


def _fbank(model, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, NUM_FRAMES, model.cfg.num_mel_bins)).astype(np.float32)


@pytest.mark.parametrize("variant", sorted(beats_checkpoints.VARIANTS))
def test_features_match_speechbrain_with_and_without_padding(checkpoints, variant):
    model, reference = _ours(checkpoints[variant]), beats_reference.load(checkpoints[variant])
    fbank_bfm = _fbank(model, batch=3)
    features, no_mask = _features(model, jnp.asarray(fbank_bfm), None)
    expected, _ = beats_reference.features(reference, fbank_bfm)
    assert no_mask is None
    assert features.shape == expected.shape
    assert np.abs(np.asarray(features) - expected).max() < TOLERANCE

    # Row 0 whole, row 1 padded from a frame inside a token, row 2 from a token boundary.
    lengths_b = np.array([NUM_FRAMES, 25, 16])
    padding_bf = np.arange(NUM_FRAMES)[None, :] >= lengths_b[:, None]
    features, padding_bs = _features(model, jnp.asarray(fbank_bfm), jnp.asarray(padding_bf))
    expected, expected_padding = beats_reference.features(reference, fbank_bfm, lengths_b)
    np.testing.assert_array_equal(np.asarray(padding_bs), expected_padding)
    assert expected_padding[1:].any() and not expected_padding[0].any()
    assert np.abs(np.asarray(features) - expected).max() < TOLERANCE


@pytest.mark.parametrize(
    "variant, wrong",
    [
        ("iter3", {"deep_norm": False}),
        ("iter3", {"gru_rel_pos": False}),  # the bias kept, its gate dropped
        ("plain", {"relative_position_embedding": False}),
        ("prenorm", {"layer_norm_first": False}),
    ],
)
def test_the_comparison_sees_each_option(checkpoints, variant, wrong):
    """The same weights in a model with one option flipped miss the reference by far more than
    the tolerance: parity covers that option."""
    model = _ours(checkpoints[variant], wrong)
    fbank_bfm = _fbank(model)
    features, _ = _features(model, jnp.asarray(fbank_bfm), None)
    expected, _ = beats_reference.features(beats_reference.load(checkpoints[variant]), fbank_bfm)
    assert np.abs(np.asarray(features) - expected).max() > 100 * TOLERANCE


@pytest.mark.parametrize("num_buckets, max_distance", [(320, 800), (320, 1280), (14, 30), (11, 9)])
def test_relative_position_buckets_match_beats(num_buckets, max_distance):
    """Up to a 30 s clip's 1496 tokens (BEATs_iter3+ has 320 buckets, max distance 800): the
    float32 log puts the boundary distances (160, 320, 640 for 320 / 1280) in BEATs' buckets."""
    attention = beats_reference.speechbrain_beats().MultiheadAttention(
        6,
        2,
        self_attention=True,
        has_relative_attention_bias=True,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    length = 1496
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    expected = attention._relative_positions_bucket(relative, bidirectional=True).numpy()
    np.testing.assert_array_equal(
        relative_position_buckets(length, num_buckets, max_distance), expected
    )


@pytest.mark.parametrize("num_frames, num_tokens", [(2998, 1496), (43, 20), (30, 30), (31, 7)])
def test_token_padding_mask_matches_beats(num_frames, num_tokens):
    """Any frame mask (not only a padded tail) maps to tokens as BEATs' forward_padding_mask."""
    rng = np.random.default_rng(num_frames)
    padding_bf = rng.random((3, num_frames)) < 0.5
    padding_bf[0, num_frames // 3 :] = True  # a padded tail, as real clips have
    beats_module = beats_reference.speechbrain_beats()
    expected = beats_module.BEATs.forward_padding_mask(
        None, torch.zeros(3, num_tokens, 1), torch.from_numpy(padding_bf)
    ).numpy()
    np.testing.assert_array_equal(
        np.asarray(token_padding_mask(jnp.asarray(padding_bf), num_tokens)), expected
    )
    assert expected.any() and not expected.all()


def test_config_defaults_are_beats_defaults():
    """Every field but num_mel_bins (unimoe's; BEATs' fbank has 128) defaults as BEATsConfig;
    input_patch_size as SpeechBrain's (the official -1 builds no model)."""
    theirs = beats_reference.speechbrain_beats().BEATsConfig()
    ours = BEATs.Config()
    fields = [f.name for f in dataclasses.fields(ours) if f.name != "num_mel_bins"]
    assert {name: getattr(ours, name) for name in fields} == {
        name: getattr(theirs, name) for name in fields
    }
    assert ours.num_mel_bins == 128


@pytest.mark.parametrize(
    "override, message",
    [
        ({"encoder_layers": 0}, "encoder_layers must be a positive integer, got 0"),
        ({"conv_bias": 1}, "conv_bias must be true or false, got 1"),
        ({"encoder_attention_heads": 7}, "encoder_embed_dim (768) must be divisible by "
         "encoder_attention_heads (7)"),
        ({"conv_pos_groups": 5}, "must be divisible by conv_pos_groups (5)"),
        ({"activation_fn": "glu"}, "activation_fn 'glu' is not supported"),
        ({"deep_norm": True, "layer_norm_first": True}, "deep_norm and layer_norm_first"),
        ({"num_mel_bins": 8}, "num_mel_bins (8) must be at least input_patch_size (16)"),
        (
            {"relative_position_embedding": True, "num_buckets": 3},
            "num_buckets (3) must be at least 4",
        ),
    ],
)
def test_config_validation_names_the_field(override, message):
    with pytest.raises(ValueError) as info:
        BEATs.Config(**override)
    assert message in str(info.value)


def test_bad_inputs_are_refused_with_their_shapes():
    cfg = BEATs.Config(**beats_checkpoints.VARIANTS["iter3"])
    # Shapes are checked before any weight is used: abstract modules (no init) suffice.
    model = abstract_module(lambda rngs: BEATs(cfg, rngs=rngs))
    with pytest.raises(ValueError, match=r"fbank_bfm must have shape \[B, F, 8\], got \(1, 43, "):
        model(jnp.zeros((1, 43, 9)))
    with pytest.raises(ValueError, match="3 frames, fewer than one patch \\(4\\): the clip is too"):
        model(jnp.zeros((1, 3, 8)))
    with pytest.raises(ValueError, match=r"padding_mask_bf must have shape \[B, F\] = \(1, 43\)"):
        model(jnp.zeros((1, 43, 8)), jnp.zeros((1, 42), bool))
    # 12 mel bins in patches of 2: 6 tokens per 2 frames, more tokens than frames to map.
    wide_cfg = dataclasses.replace(cfg, num_mel_bins=12, input_patch_size=2)
    wide = abstract_module(lambda rngs: BEATs(wide_cfg, rngs=rngs))
    with pytest.raises(ValueError, match="43 frames, fewer than the 126 tokens"):
        wide(jnp.zeros((1, 43, 12)), jnp.zeros((1, 43), bool))
