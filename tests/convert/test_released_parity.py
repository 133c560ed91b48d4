"""Released Uni-MoE folders (tiny, random, in the official layout) against their PyTorch reference.

The reference's pieces are checked against transformers' own modules first (the 4E block and the
deterministic 8E block against Mixtral's, the 8E LoRA expert against a LLaMA MLP holding the
merged weights), and its load order against the files (the router LoRA peft attached to the
audio model is discarded); then each variant is converted by `from-unimoe` and our model's
logits are compared with the reference's on a batch with an image, an 8-frame video and a
multi-chunk audio clip.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama
from transformers.models.mixtral import modeling_mixtral

from tests.convert import released_models, released_reference as ref

D, F = 13, 11  # odd sizes for the block checks


def _llama_cfg() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=D, intermediate_size=F, num_attention_heads=1, head_dim=2)


def _mixtral_with(gate_ed: torch.Tensor, mlps: list) -> modeling_mixtral.MixtralSparseMoeBlock:
    """transformers' Mixtral block holding the router `gate_ed` and SwiGLU experts `mlps`."""
    cfg = transformers.MixtralConfig(
        hidden_size=D, intermediate_size=F, num_local_experts=len(mlps), num_experts_per_tok=2,
        num_attention_heads=1, head_dim=2,
    )
    block = modeling_mixtral.MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        block.gate.weight.copy_(gate_ed)
        for e, (w_gate, w_up, w_down) in enumerate(mlps):
            block.experts.gate_up_proj[e].copy_(torch.cat([w_gate, w_up], dim=0))
            block.experts.down_proj[e].copy_(w_down)
    return block


def _randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.4)


def test_4e_block_equals_mixtral_block():
    """Softmax over the top-2 logits (Mistral) = top-2 of the softmax renormalised (Mixtral)."""
    block = ref.MistralMoE(_llama_cfg(), num_experts=5, top_k=2).eval()
    _randomize(block, 0)
    mlps = [(m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight) for m in block.experts]
    mixtral = _mixtral_with(block.gate.weight, mlps)
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        np.testing.assert_allclose(block(x).numpy(), mixtral(x).numpy(), atol=1e-6)


def _merged(expert: ref.LoRAExpert, proj: str) -> torch.Tensor:
    a, b = getattr(expert, f"{proj}_lora_A").weight, getattr(expert, f"{proj}_lora_B").weight
    return getattr(expert, proj).weight + expert.scaling * b @ a


def test_8e_lora_expert_equals_llama_mlp_with_merged_weights():
    expert = ref.LoRAExpert(_llama_cfg(), r=3, alpha=7).eval()
    _randomize(expert, 2)
    mlp = modeling_llama.LlamaMLP(_llama_cfg()).eval()
    with torch.no_grad():
        for proj in ("gate_proj", "up_proj", "down_proj"):
            getattr(mlp, proj).weight.copy_(_merged(expert, proj))
        x = torch.randn(7, D, generator=torch.Generator().manual_seed(3))
        np.testing.assert_allclose(expert(x).numpy(), mlp(x).numpy(), atol=1e-5)


def test_8e_block_without_gumbel_equals_mixtral_block():
    """DeepSpeed's top-2 with the second choice an argmax is Mixtral's routing."""
    block = ref.DeepSpeedTop2(_llama_cfg(), num_experts=8, r=3, alpha=7).eval()
    _randomize(block, 4)
    bank = block.deepspeed_moe.experts.deepspeed_experts
    mlps = [tuple(_merged(e, p) for p in ("gate_proj", "up_proj", "down_proj")) for e in bank]
    with torch.no_grad():
        mixtral = _mixtral_with(block.deepspeed_moe.gate.wg.weight, mlps)
        x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(5))
        np.testing.assert_allclose(block(x).numpy(), mixtral(x).numpy(), atol=1e-5)


@pytest.fixture(scope="module", params=released_models.VARIANTS)
def released(request, tmp_path_factory):
    variant = request.param
    return released_models.write_released(tmp_path_factory.mktemp(variant), variant)


def test_reference_takes_routers_from_mlp_gates_and_discards_their_lora(released):
    """The official order loads mlp_gates.bin after the peft merge: the router LoRA the audio
    model's adapter holds (peft matched `mlp.gate`) never reaches the reference."""
    variant = released.variant
    adapter = torch.load(released.finetuned / "adapter_model.bin", weights_only=True)
    router_lora = [k for k in adapter if ".mlp.gate.lora_" in k]
    assert bool(router_lora) == (variant == "audio_4e")
    lm = ref.load_llm(released, variant)
    gates = torch.load(released.finetuned / "mlp_gates.bin", weights_only=True)
    lm_state = lm.state_dict()
    router_keys = [k for k in gates if "lora" not in k]
    assert len(router_keys) == len(ref.moe_layers(lm.config.to_dict(), variant))
    for key in router_keys:
        torch.testing.assert_close(lm_state[key], gates[key].float(), rtol=0, atol=0)


def test_reference_merges_the_attention_lora(released):
    lm = ref.load_llm(released, released.variant)
    adapter = torch.load(released.finetuned / "adapter_model.bin", weights_only=True)
    base = ref._base_state(released.base)
    name = "model.layers.1.self_attn.q_proj"
    a, b = adapter[f"base_model.model.{name}.lora_A.weight"], adapter[f"base_model.model.{name}.lora_B.weight"]
    scale = released_models.LORA["lora_alpha"] / released_models.LORA["r"]
    expected = base[f"{name}.weight"] + scale * b @ a
    torch.testing.assert_close(lm.state_dict()[f"{name}.weight"], expected, rtol=1e-6, atol=1e-6)
