"""QFormerConnector: parity with transformers' Blip2QFormerModel (+ query tokens and a projector,
as Uni-MoE-audio's AudioAligner), encoder masks, dropout, config and input checks."""

import dataclasses

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from unimoe.checkpoint import path_str
from unimoe.models.qformer import QFormerConnector

# Odd sizes: 3 layers with cross-attention on 0 and 2, enc_dim != width, 3 heads of 4.
CFG = QFormerConnector.Config(
    enc_dim=10, out_dim=7, num_queries=5, width=12, depth=3, num_heads=3, mlp_dim=17
)
BATCH, SEQ = 3, 11


def hf_qformer(cfg: QFormerConnector.Config, seed: int = 0) -> transformers.Blip2QFormerModel:
    """A random torch Q-Former of `cfg`'s sizes. Weights are redrawn at unit gain (HF's N(0, 0.02)
    leaves every sub-block a small correction to its residual, so even a tanh-approximated GELU
    passed the tolerance), LayerNorms and biases away from HF's ones / zeros."""
    torch.manual_seed(seed)
    model = transformers.Blip2QFormerModel(
        transformers.Blip2QFormerConfig(
            hidden_size=cfg.width,
            num_hidden_layers=cfg.depth,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.mlp_dim,
            cross_attention_frequency=cfg.cross_attention_every,
            encoder_hidden_size=cfg.enc_dim,
            layer_norm_eps=cfg.layer_norm_eps,
        )
    ).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn_like(param)
            if param.ndim == 2:
                param.copy_(noise / param.shape[1] ** 0.5)
            elif "LayerNorm.weight" in name or "layernorm.weight" in name:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.2 * noise)
    return model


def reference(qformer, query_tokens, projector, enc_bsd, mask_bs=None) -> np.ndarray:
    """Uni-MoE's AudioAligner.forward: the queries through the Q-Former, then the projector."""
    enc = torch.from_numpy(enc_bsd)
    with torch.no_grad():
        out = qformer(
            query_embeds=query_tokens.expand(enc.shape[0], -1, -1),
            encoder_hidden_states=enc,
            encoder_attention_mask=None if mask_bs is None else torch.from_numpy(mask_bs).long(),
        ).last_hidden_state
        return projector(out).numpy()


def load_by_hf_names(conn: QFormerConnector, qformer, query_tokens, projector) -> None:
    """Fills `conn` by the naming rule alone: every Q-Former param path, '/' -> '.', is its HF
    name (kernel / scale -> weight, kernels transposed); every HF tensor must be used."""
    hf = {k: v.numpy() for k, v in qformer.state_dict().items()}
    hf["query_tokens"] = query_tokens.detach().numpy()
    hf["projector.weight"] = projector.weight.detach().numpy()
    hf["projector.bias"] = projector.bias.detach().numpy()
    used = set()
    for path, variable in nnx.to_flat_state(nnx.state(conn, nnx.Param)):
        *parents, leaf = path_str(path).split("/")
        name = ".".join([*parents, {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])
        value = hf[name].T if leaf == "kernel" else hf[name]
        assert value.shape == variable.get_value().shape, name
        variable.set_value(np.asarray(value, np.float32))
        used.add(name)
    assert used == set(hf)


def build_pair(cfg: QFormerConnector.Config, seed: int = 0):
    """(our connector in eval mode, the torch pieces), at the same weights."""
    qformer = hf_qformer(cfg, seed)
    query_tokens = torch.randn(1, cfg.num_queries, cfg.width)
    projector = torch.nn.Linear(cfg.width, cfg.out_dim)
    conn = QFormerConnector(cfg, rngs=nnx.Rngs(seed))
    load_by_hf_names(conn, qformer, query_tokens, projector)
    return nnx.view(conn, deterministic=True), (qformer, query_tokens, projector)


def _enc(seed: int, shape=(BATCH, SEQ, CFG.enc_dim)) -> np.ndarray:
    return (2.0 * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def _masks() -> np.ndarray:
    mask_bs = np.ones((BATCH, SEQ), bool)
    mask_bs[1, 7:] = False  # a padded tail, as BEATs' last chunk
    mask_bs[2, ::2] = False  # an irregular pattern
    return mask_bs


@pytest.fixture(scope="module")
def pair():
    return build_pair(CFG)


def test_layout_follows_cross_attention_frequency(pair):
    conn, (qformer, _, _) = pair
    ours = [layer.crossattention is not None for layer in conn.encoder.layer]
    assert ours == [layer.has_cross_attention for layer in qformer.encoder.layer]
    assert ours == [True, False, True]
    assert conn.encoder.layer[0].crossattention.attention.key.kernel.shape == (10, 12)


def test_matches_hf_without_mask(pair):
    conn, ref = pair
    enc_bsd = _enc(0)
    ours, theirs = np.asarray(conn(enc_bsd)), reference(*ref, enc_bsd)
    assert ours.shape == (BATCH, CFG.num_queries, CFG.out_dim)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    # Uni-MoE passes an all-ones encoder mask: the same as no mask.
    ones_bs = np.ones((BATCH, SEQ), bool)
    np.testing.assert_allclose(ours, reference(*ref, enc_bsd, ones_bs), atol=1e-5, rtol=0)


def test_matches_hf_with_a_different_mask_per_row(pair):
    conn, ref = pair
    enc_bsd, mask_bs = _enc(1), _masks()
    ours = np.asarray(conn(enc_bsd, mask_bs))
    np.testing.assert_allclose(ours, reference(*ref, enc_bsd, mask_bs), atol=1e-5, rtol=0)
    # Masked positions are not read: changing them changes nothing; unmasked, it shows.
    changed_bsd = enc_bsd.copy()
    changed_bsd[~mask_bs] = _enc(2)[~mask_bs]
    np.testing.assert_allclose(np.asarray(conn(changed_bsd, mask_bs)), ours, atol=1e-6, rtol=0)
    assert np.abs(np.asarray(conn(changed_bsd)) - np.asarray(conn(enc_bsd))).max() > 1e-3


def test_matches_hf_every_layer_cross_attending():
    cfg = dataclasses.replace(CFG, depth=2, cross_attention_every=1, enc_dim=12)
    conn, ref = build_pair(cfg, seed=1)
    enc_bsd, mask_bs = _enc(3, (BATCH, SEQ, 12)), _masks()
    np.testing.assert_allclose(
        np.asarray(conn(enc_bsd, mask_bs)), reference(*ref, enc_bsd, mask_bs), atol=1e-5, rtol=0
    )


def test_dropout_is_on_unless_deterministic():
    conn = QFormerConnector(CFG, rngs=nnx.Rngs(0))
    enc_bsd = _enc(0)
    first, second = np.asarray(conn(enc_bsd)), np.asarray(conn(enc_bsd))
    assert np.abs(first - second).max() > 1e-3
    evaluated = nnx.view(conn, deterministic=True)
    np.testing.assert_array_equal(np.asarray(evaluated(enc_bsd)), np.asarray(evaluated(enc_bsd)))
    no_dropout = QFormerConnector(
        dataclasses.replace(CFG, dropout_rate=0.0, attention_dropout_rate=0.0), rngs=nnx.Rngs(0)
    )
    assert not nnx.state(no_dropout, nnx.Not(nnx.Param))  # no RNG state at rate 0
    nnx.update(no_dropout, nnx.state(conn, nnx.Param))
    np.testing.assert_allclose(
        np.asarray(no_dropout(enc_bsd)), np.asarray(evaluated(enc_bsd)), atol=1e-6, rtol=0
    )


def test_defaults_are_blip2_qformer_defaults():
    hf = transformers.Blip2QFormerConfig()
    cfg = QFormerConnector.Config(enc_dim=768, out_dim=4096)
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim) == (
        hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.intermediate_size
    )
    assert cfg.cross_attention_every == hf.cross_attention_frequency
    assert cfg.layer_norm_eps == hf.layer_norm_eps
    assert (cfg.dropout_rate, cfg.attention_dropout_rate) == (
        hf.hidden_dropout_prob, hf.attention_probs_dropout_prob
    )
    assert hf.hidden_act == "gelu" and cfg.num_queries == 50  # Uni-MoE's query_tokens_size


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"enc_dim": 0}, "enc_dim must be positive"),
        ({"cross_attention_every": 0}, "cross_attention_every must be positive"),
        ({"num_heads": 5}, r"width \(12\) must be divisible by num_heads \(5\)"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps must be > 0"),
        ({"dropout_rate": 1.0}, r"dropout_rate must be in \[0, 1\)"),
    ],
)
def test_config_rejects(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CFG, **changes)


def test_bad_inputs_are_named(pair):
    conn, _ = pair
    with pytest.raises(ValueError, match=r"enc_bsd must have shape \[B, S, 10\]"):
        conn(_enc(0, (BATCH, SEQ, 12)))
    with pytest.raises(ValueError, match=r"enc_mask_bs must have shape \(3, 11\)"):
        conn(_enc(0), np.ones((BATCH, SEQ - 1), bool))
