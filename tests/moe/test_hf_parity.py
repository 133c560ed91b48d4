"""MoELayer against Hugging Face's PyTorch MoE blocks at the same weights (float32, <= 1e-5).

Weights are random (no download); HF's fused expert tensors are split into our banks:
`gate_up_proj[e]` [2F, D] = [gate; up] rows, `down_proj[e]` [D, F], Linear weights [out, in].
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_deepseek  # noqa: E402
from transformers.models.deepseek_v3.configuration_deepseek_v3 import (  # noqa: E402
    DeepseekV3Config,
)
from transformers.models.mixtral import modeling_mixtral as hf_mixtral  # noqa: E402
from transformers.models.mixtral.configuration_mixtral import MixtralConfig  # noqa: E402
from transformers.models.qwen2_moe import modeling_qwen2_moe as hf_qwen2_moe  # noqa: E402
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig  # noqa: E402

from unimoe.moe.config import MoEConfig  # noqa: E402
from unimoe.moe.layer import MoELayer  # noqa: E402

DIM, FFN, SHARED_FFN, NUM_EXPERTS, TOP_K = 8, 6, 10, 4, 2
X_BTD = np.random.default_rng(0).normal(size=(2, 5, DIM)).astype(np.float32)


def randomize(block: "torch.nn.Module", seed: int, std: float = 0.3) -> None:
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for tensor in [*block.parameters(), *block.buffers()]:
            tensor.copy_(torch.from_numpy(std * rng.normal(size=tuple(tensor.shape))))


def t2j(tensor: "torch.Tensor", transpose: bool = False) -> jnp.ndarray:
    array = tensor.detach().numpy()
    return jnp.asarray(array.T if transpose else array, jnp.float32)


def copy_experts(hf_experts, layer: MoELayer) -> None:
    gate_up_efd = hf_experts.gate_up_proj.detach().numpy()  # [E, 2F, D]
    ffn = gate_up_efd.shape[1] // 2
    layer.experts.w_gate_edf.set_value(jnp.asarray(gate_up_efd[:, :ffn].transpose(0, 2, 1)))
    layer.experts.w_up_edf.set_value(jnp.asarray(gate_up_efd[:, ffn:].transpose(0, 2, 1)))
    layer.experts.w_down_efd.set_value(t2j(hf_experts.down_proj).transpose(0, 2, 1))


def copy_shared(hf_mlp, layer: MoELayer) -> None:
    for ours, theirs in (
        (layer.shared_experts.gate, hf_mlp.gate_proj),
        (layer.shared_experts.up, hf_mlp.up_proj),
        (layer.shared_experts.down, hf_mlp.down_proj),
    ):
        ours.kernel.set_value(t2j(theirs.weight, transpose=True))


def run_both(block, layer: MoELayer) -> tuple[np.ndarray, np.ndarray]:
    block.eval()
    with torch.no_grad():
        expected = block(torch.from_numpy(X_BTD.copy())).numpy()
    y_btd, _ = nnx.view(layer, deterministic=True)(jnp.asarray(X_BTD))
    return np.asarray(y_btd), expected


def make_layer(cfg: MoEConfig) -> MoELayer:
    """Abstract init: every weight must then be copied from HF, or the forward pass fails."""
    cfg = dataclasses.replace(cfg, kernel_impl="ragged_dot")  # cheapest to compile on CPU
    return nnx.eval_shape(lambda: MoELayer(DIM, cfg, ffn_dim=FFN, rngs=nnx.Rngs(0)))


# HF Mixtral = softmax over all, top-k, renormalize: our 'softmax_topk' with renormalize, which is
# mathematically 'topk_softmax' too (the softmax of the top-k logits); both must match.
@pytest.mark.parametrize("router", ["softmax_topk", "topk_softmax"])
def test_mixtral_sparse_moe_block(router):
    config = MixtralConfig(
        hidden_size=DIM,
        intermediate_size=FFN,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        router_jitter_noise=0.0,
    )
    block = hf_mixtral.MixtralSparseMoeBlock(config)
    randomize(block, 1)
    layer = make_layer(MoEConfig(num_experts=NUM_EXPERTS, top_k=TOP_K, router=router))
    layer.router.kernel.set_value(t2j(block.gate.weight, transpose=True))
    copy_experts(block.experts, layer)
    ours, theirs = run_both(block, layer)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen2_moe_sparse_moe_block(norm_topk_prob):
    config = Qwen2MoeConfig(
        hidden_size=DIM,
        moe_intermediate_size=FFN,
        shared_expert_intermediate_size=SHARED_FFN,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=norm_topk_prob,
    )
    block = hf_qwen2_moe.Qwen2MoeSparseMoeBlock(config)
    randomize(block, 2)
    cfg = MoEConfig(
        num_experts=NUM_EXPERTS,
        top_k=TOP_K,
        router="softmax_topk",
        renormalize=norm_topk_prob,
        num_shared_experts=1,
        shared_ffn_dim=SHARED_FFN,
        shared_gate=True,
    )
    layer = make_layer(cfg)
    layer.router.kernel.set_value(t2j(block.gate.weight, transpose=True))
    copy_experts(block.experts, layer)
    copy_shared(block.shared_expert, layer)
    layer.shared_gate.kernel.set_value(t2j(block.shared_expert_gate.weight, transpose=True))
    ours, theirs = run_both(block, layer)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_deepseek_v3_moe(norm_topk_prob):
    # 8 experts in 4 groups, 2 groups kept, top-3, 2 shared experts, scaled routed weights.
    config = DeepseekV3Config(
        hidden_size=DIM,
        moe_intermediate_size=FFN,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        n_shared_experts=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=norm_topk_prob,
    )
    block = hf_deepseek.DeepseekV3MoE(config)
    randomize(block, 3)  # e_score_correction_bias is a buffer: random too, so it must matter
    cfg = MoEConfig(
        num_experts=8,
        top_k=3,
        router="sigmoid_bias",
        renormalize=norm_topk_prob,
        num_groups=4,
        top_groups=2,
        routed_scaling=2.5,
        num_shared_experts=2,
        shared_ffn_dim=FFN,
    )
    layer = make_layer(cfg)
    layer.router.kernel.set_value(t2j(block.gate.weight, transpose=True))
    layer.router_bias.set_value(t2j(block.gate.e_score_correction_bias))
    copy_experts(block.experts, layer)
    copy_shared(block.shared_experts, layer)
    ours, theirs = run_both(block, layer)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
