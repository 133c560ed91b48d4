"""The Q-Former connector's weight maps: HF BLIP-2 names and Uni-MoE's mm_audio_aligner.bin names,
each loaded into `sound_conn` and checked against the torch forward; strictness of both."""

import dataclasses

import numpy as np
import pytest
import torch
from flax import nnx

from tests.models.test_qformer import CFG, hf_qformer, reference
from unimoe.convert import qformer_names
from unimoe.convert.core import load_into
from unimoe.models.qformer import QFormerConnector


class UniMoEQformer(torch.nn.Module):
    """Uni-MoE-audio's `Qformer` wrapper: the HF model under the attribute `qformer`."""

    def __init__(self, model):
        super().__init__()
        self.qformer = model


class AudioAligner(torch.nn.Module):
    """Uni-MoE-audio's `AudioAligner` (attribute names as in `audio_aligner/builder.py`)."""

    def __init__(self, model, width: int, out_dim: int, num_queries: int):
        super().__init__()
        self.qformer = UniMoEQformer(model)
        self.projector = torch.nn.Linear(width, out_dim)
        self.query_tokens = torch.nn.Parameter(torch.randn(1, num_queries, width))


class LlavaModel(torch.nn.Module):
    def __init__(self, aligner):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(5, 3)
        self.mm_audio_aligner = aligner


class LlavaForCausalLM(torch.nn.Module):
    """Enough of `LlavaLlamaForCausalLM` for its parameter names: `model.mm_audio_aligner.*`."""

    def __init__(self, aligner):
        super().__init__()
        self.model = LlavaModel(aligner)
        self.lm_head = torch.nn.Linear(3, 5)


@pytest.fixture(scope="module")
def aligner():
    torch.manual_seed(1)
    return AudioAligner(hf_qformer(CFG, seed=1), CFG.width, CFG.out_dim, CFG.num_queries)


def uni_moe_file(aligner) -> dict[str, np.ndarray]:
    """What Uni-MoE-audio's train.py writes to mm_audio_aligner.bin: the named parameters
    matching 'mm_audio_aligner' or 'query_tokens'."""
    named = LlavaForCausalLM(aligner).named_parameters()
    keys_to_match = ("mm_audio_aligner", "query_tokens")
    return {
        k: v.detach().numpy() for k, v in named if any(key in k for key in keys_to_match)
    }


def hf_blip2_dict(aligner, prefix: str = "qformer.") -> dict[str, np.ndarray]:
    """The same tensors as HF `Blip2Model` names them."""
    tensors = {prefix + k: v.numpy() for k, v in aligner.qformer.qformer.state_dict().items()}
    tensors["query_tokens"] = aligner.query_tokens.detach().numpy()
    tensors["language_projection.weight"] = aligner.projector.weight.detach().numpy()
    tensors["language_projection.bias"] = aligner.projector.bias.detach().numpy()
    return tensors


def check_outputs(params: dict[str, np.ndarray], aligner) -> None:
    conn = QFormerConnector(CFG, rngs=nnx.Rngs(7))
    load_into({qformer_names.ROOT: conn}, params)
    enc_bsd = np.random.default_rng(0).normal(size=(3, 11, CFG.enc_dim)).astype(np.float32)
    mask_bs = np.ones((3, 11), bool)
    mask_bs[0, 6:] = False
    ref = (aligner.qformer.qformer, aligner.query_tokens, aligner.projector)
    ours = np.asarray(nnx.view(conn, deterministic=True)(enc_bsd, mask_bs))
    np.testing.assert_allclose(ours, reference(*ref, enc_bsd, mask_bs), atol=1e-5, rtol=0)


def test_uni_moe_names_load_and_match_torch(aligner):
    tensors = uni_moe_file(aligner)
    cross_key = "qformer.qformer.encoder.layer.0.crossattention.attention.key.weight"
    assert f"model.mm_audio_aligner.{cross_key}" in tensors
    assert "model.mm_audio_aligner.query_tokens" in tensors
    params = qformer_names.from_uni_moe(tensors, CFG)
    assert all(path.startswith("sound_conn/") for path in params)
    assert params["sound_conn/query_tokens"].shape == (1, CFG.num_queries, CFG.width)
    check_outputs(params, aligner)


@pytest.mark.parametrize("prefix", ["qformer.", ""])
def test_hf_blip2_names_load_and_match_torch(aligner, prefix):
    params = qformer_names.from_hf(hf_blip2_dict(aligner, prefix), CFG, prefix=prefix)
    check_outputs(params, aligner)


def test_both_namings_give_the_same_params(aligner):
    from_hf = qformer_names.from_hf(hf_blip2_dict(aligner), CFG, root="conn")
    from_uni_moe = qformer_names.from_uni_moe(uni_moe_file(aligner), CFG, root="conn")
    assert from_hf.keys() == from_uni_moe.keys()
    for path, value in from_hf.items():
        np.testing.assert_array_equal(value, from_uni_moe[path], err_msg=path)


def _without(tensors: dict, name: str) -> dict:
    return {k: v for k, v in tensors.items() if k != name}


def test_missing_tensor_is_named(aligner):
    name = "qformer.qformer.encoder.layer.2.crossattention.output.LayerNorm.bias"
    tensors = _without(uni_moe_file(aligner), f"model.mm_audio_aligner.{name}")
    with pytest.raises(
        ValueError,
        match=r"mm_audio_aligner.bin .*: tensor 'qformer.qformer.encoder.layer.2.crossattention."
        r"output.LayerNorm.bias' is missing .*encoder/layer/2/crossattention/output/LayerNorm/bias",
    ):
        qformer_names.from_uni_moe(tensors, CFG)


def test_extra_tensor_is_named(aligner):
    tensors = hf_blip2_dict(aligner)
    tensors["qformer.encoder.layer.1.intermediate.dense.weight"] = np.zeros((17, 12), np.float32)
    with pytest.raises(
        ValueError, match=r"'qformer.encoder.layer.1.intermediate.dense.weight' \(and 0 more\)"
    ):
        qformer_names.from_hf(tensors, CFG)
    # A checkpoint of a deeper Q-Former does not fit a shallower config.
    shallower = dataclasses.replace(CFG, depth=2)
    with pytest.raises(ValueError, match=r"'qformer.encoder.layer.2.attention.attention.key.bias'"):
        qformer_names.from_hf(hf_blip2_dict(aligner), shallower)


def test_wrong_shape_is_named(aligner):
    cfg = dataclasses.replace(CFG, num_queries=4)
    with pytest.raises(
        ValueError,
        match=r"tensor 'query_tokens' has shape \(1, 5, 12\), but the connector config implies "
        r"\(1, 4, 12\) \(param sound_conn/query_tokens\)",
    ):
        qformer_names.from_uni_moe(uni_moe_file(aligner), cfg)


def test_names_outside_the_aligner_are_refused(aligner):
    tensors = uni_moe_file(aligner)
    tensors["model.query_tokens"] = tensors["model.mm_audio_aligner.query_tokens"]
    with pytest.raises(ValueError, match=r"'model.query_tokens' is not under 'mm_audio_aligner.'"):
        qformer_names.from_uni_moe(tensors, CFG)
    # Two prefixes of one aligner tensor: ambiguous, not silently one of them.
    tensors = uni_moe_file(aligner)
    tensors["base_model.model.model.mm_audio_aligner.projector.bias"] = np.zeros(CFG.out_dim)
    with pytest.raises(ValueError, match=r"are both the aligner's 'projector.bias'"):
        qformer_names.from_uni_moe(tensors, CFG)
