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
from flax import nnx
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


# ---------------------------------------------------------------------------------------------
# Parity: converted by `from-unimoe`, built by the factory, against the reference.

MEDIA = {ref.IMAGE_TOKEN: "image", ref.VIDEO_TOKEN: "video", ref.AUDIO_TOKEN: "audio"}


def _samples(variant: str, rng: np.random.Generator) -> list[ref.Sample]:
    """Two prompts of different lengths and media orders: an image, an 8-frame video and a
    3-chunk clip; then a clip before an image (its video slot empty)."""
    hw = released_models.hf_models.CLIP_VISION["image_size"]

    def clip() -> np.ndarray:  # 3 chunks: Whisper log-mels [C, mels, frames], BEATs fbank [C, F, mels]
        shape = (3, 32, ref.BEATS["num_mel_bins"]) if variant == "audio_4e" else (3, 10, 30)
        return rng.normal(size=shape).astype(np.float32)

    def pixels(*lead: int) -> np.ndarray:
        return rng.normal(size=(*lead, 3, hw, hw)).astype(np.float32)

    return [
        ref.Sample((1, 29, 87, ref.IMAGE_TOKEN, 40, ref.VIDEO_TOKEN, 51, 63, ref.AUDIO_TOKEN, 77, 2),
                   image=pixels(), video=pixels(8), audio=clip()),
        ref.Sample((1, 101, ref.AUDIO_TOKEN, 13, ref.IMAGE_TOKEN, 150), image=pixels(), audio=clip()),
    ]


def _our_batch(samples: list[ref.Sample], tokenizer, counts: dict[str, int]) -> dict:
    """The same prompts in our batch form: each sentinel expanded to its block of placeholder
    ids, right-padded with the pad id; media channels-last; absent media zero-filled."""
    ids = {"image": tokenizer.image_id, "video": tokenizer.video_id, "audio": tokenizer.audio_id}
    rows = []
    for s in samples:
        row = []
        for token in s.ids:
            kind = MEDIA.get(token)
            if kind is None:
                row.append(token)
            else:
                chunks = len(s.audio) if kind == "audio" else 1
                row += [ids[kind]] * counts[kind] * chunks
        rows.append(row)
    t = max(len(r) for r in rows)
    tokens = np.full((len(rows), t), tokenizer.pad_id, np.int32)
    for b, row in enumerate(rows):
        tokens[b, : len(row)] = row
    image = np.stack([s.image for s in samples]).transpose(0, 2, 3, 1)
    video = np.stack([s.video if s.video is not None else np.zeros_like(samples[0].video)
                      for s in samples]).transpose(0, 1, 3, 4, 2)
    audio = np.stack([s.audio for s in samples])
    batch = dict(tokens=tokens, attn_mask=tokens != -1, image=image, video=video)
    batch["attn_mask"] = np.stack([np.arange(t) < len(r) for r in rows])
    if counts.get("sound"):
        batch.update(sound_fbank=audio, sound_frame_mask=np.zeros(audio.shape[:3], bool),
                     has_sound=np.ones(len(samples), bool))
    else:
        batch["audio_mel"] = audio.transpose(0, 1, 3, 2)  # [B, C, frames, mels]
    return batch


def _our_model(folders: released_models.ReleasedFolders, out):
    from unimoe import factory
    from unimoe.convert import core, released
    from unimoe.data.tokenizer import PretrainedTokenizer
    from unimoe.models.unimoe import ModelSpec

    # No released file states the audio model's Q-Former heads (the official: BLIP-2's 12).
    heads = {"qformer_heads": ref.QFORMER["num_attention_heads"]} if folders.beats else {}
    released.from_unimoe(
        folders.variant, folders.base, folders.finetuned, out, clip=folders.clip,
        whisper=folders.whisper, experts=folders.experts, beats=folders.beats, **heads,
    )
    section = released.model_section(out)
    if folders.variant == "8e":  # the reference's deterministic second choice
        section["moe"]["second_choice"] = "argmax"
    tokenizer = PretrainedTokenizer(out / "tokenizer.model")
    model = factory.build_model(ModelSpec.from_dict(section), tokenizer, moe=True, lora_rank=0, seed=0)
    factory.load_params(model, [("released", core.pretrained_params({"unimoe": str(out)}))])
    return model, tokenizer


def test_converted_logits_match_the_reference(released, tmp_path):
    samples = _samples(released.variant, np.random.default_rng(7))
    expected = ref.reference_logits(released, released.variant, samples)
    model, tokenizer = _our_model(released, tmp_path / "converted")
    model.eval()
    counts = dict(model.num_media_tokens)
    if released.variant == "audio_4e":
        counts["audio"] = counts["sound"]
    batch = _our_batch(samples, tokenizer, counts)
    # jit: compiling the whole forward once is quicker than dispatching it op by op.
    logits = nnx.jit(lambda m, b: m(b)[0])(model, {k: np.asarray(v) for k, v in batch.items()})
    logits = np.asarray(logits)[..., : released_models.VOCAB]  # the released rows
    mask = batch["attn_mask"]
    assert logits.shape[:2] == expected.shape[:2] == mask.shape
    err = np.abs(logits - expected)[mask].max()
    print(f"{released.variant}: max |ours - reference| = {err:.2e} (logit std {expected.std():.2f})")
    assert err < 1e-4, f"{released.variant}: max |ours - reference| = {err:.2e}"
