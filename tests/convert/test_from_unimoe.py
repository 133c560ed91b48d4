"""`from-unimoe`: tiny released Uni-MoE folders (`released_models.py`, written as the official
train.py writes them, adapters by peft itself) into converted checkpoints a model loads whole.

The logits parity against the PyTorch reference is `test_released_parity.py`'s; here: every
parameter filled and every tensor placed, the MoE layout read from the weights, the official
load order, the LoRA merges against peft / the 8E LoRA expert, damaged inputs, the CLI.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from tests.convert import hf_models
from tests.convert import released_models as rm
from tests.convert import released_reference as ref
from unimoe import factory
from unimoe.checkpoint import Checkpointer, path_str
from unimoe.convert import core, hf_io, released
from unimoe.convert.cli import main
from unimoe.data.tokenizer import PretrainedTokenizer
from unimoe.models.unimoe import ModelSpec

# The tiny audio model's Q-Former has 3 heads (the release: BLIP-2's 12).
HEADS = {"audio_4e": ref.QFORMER["num_attention_heads"]}
LAYOUT = {"speech_4e": "all", "audio_4e": "every_2", "8e": "all"}


def _convert(folders: rm.ReleasedFolders, out) -> tuple[core.Converted, list[str]]:
    return released.from_unimoe(
        folders.variant, folders.base, folders.finetuned, out, clip=folders.clip,
        whisper=folders.whisper, experts=folders.experts, beats=folders.beats,
        qformer_heads=HEADS.get(folders.variant, released.BLIP2_QFORMER_HEADS),
    )  # fmt: skip


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """variant -> (folders, OUT, converted checkpoint, notes), each written once."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            root = tmp_path_factory.mktemp(variant)
            folders = rm.write_released(root / "released", variant)
            cache[variant] = (folders, root / "out", *_convert(folders, root / "out"))
        return cache[variant]

    return get


def _torch_file(path) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in torch.load(path, weights_only=True).items()}


def _model(out, *, abstract: bool):
    spec = ModelSpec.from_dict(released.model_section(out))
    tokenizer = PretrainedTokenizer(out / released.TOKENIZER_FILE)
    return factory.build_model(spec, tokenizer, moe=True, lora_rank=0, seed=0, abstract=abstract)


def _params(model) -> dict[str, tuple[int, ...]]:
    return {path_str(p): v.shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("variant", rm.VARIANTS)
def test_the_checkpoint_holds_every_parameter_of_its_model(variant, converted):
    """config.model from OUT, built with moe=True and lora_rank=0 (shapes only): every parameter
    but `not_in_checkpoint` is in OUT with its shape (the vocabulary: the tokenizer's appended
    placeholders aside), nothing else is, and there is no LoRA left."""
    _, out, conv, _ = converted(variant)
    model_dict = released.model_section(out)
    assert model_dict["moe_layers"] == LAYOUT[variant]
    assert set(model_dict) == set(released.PAPER_MODEL[variant])
    model = _model(out, abstract=True)
    shapes = _params(model)
    skipped = released.not_in_checkpoint(variant)
    assert {p for p in shapes if not p.startswith(skipped)} == set(conv.params)
    for path, value in conv.params.items():
        if path in factory.VOCAB_AXES:
            axis = factory.VOCAB_AXES[path]
            assert shapes[path][axis] == value.shape[axis] + 3  # image, video, audio placeholders
        else:
            assert shapes[path] == value.shape, path
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(nnx.state(model)))
    with Checkpointer(out) as ckpt:
        assert sorted(ckpt.final_params()[1]) == sorted(conv.params)
    assert json.loads((out / core.META_FILE).read_text())["variant"] == variant


def test_the_model_loads_the_checkpoint_as_a_stage_would(converted):
    """The contract, run: `load_params` from `core.pretrained_params({'unimoe': OUT})` sets
    every parameter but `not_in_checkpoint` (8E, the quickest to build)."""
    _, out, conv, _ = converted("8e")
    model = _model(out, abstract=False)
    source = core.pretrained_params({"unimoe": str(out)})
    origin = factory.load_params(model, [("unimoe", source)])
    skipped = released.not_in_checkpoint("8e")
    assert set(origin) == {p for p in _params(model) if not p.startswith(skipped)}
    router = nnx.state(model, nnx.Param)["llm"]["layers"][1]["ffn"]["router"]["kernel"]
    np.testing.assert_array_equal(router.get_value(), conv.params["llm/layers/1/ffn/router/kernel"])


def test_the_paper_model_dicts_build_specs():
    for variant, model_dict in released.PAPER_MODEL.items():
        spec = ModelSpec.from_dict(model_dict)
        assert len(spec.moe_layers) == (16 if variant == "audio_4e" else 32)
        assert spec.llm.moe.num_experts == (8 if variant == "8e" else 4)


@pytest.mark.parametrize("variant", ["speech_4e", "audio_4e"])
def test_routers_projector_and_aligner_come_from_the_finetuned_side_files(variant, converted):
    """mlp_gates.bin wins over the base's routers and over the router LoRA peft merged (audio);
    the projector is non_lora_trainables.bin's, the aligner's projection mm_audio_aligner.bin's."""
    folders, _, conv, notes = converted(variant)
    gates = _torch_file(folders.finetuned / "mlp_gates.bin")
    base = hf_io.read_tensors(folders.base)
    router = "model.layers.2.mlp.gate.weight"
    assert not np.array_equal(gates[router], base[router])
    np.testing.assert_array_equal(conv.params["llm/layers/2/ffn/router/kernel"], gates[router].T)
    adapter = _torch_file(folders.finetuned / "adapter_model.bin")
    router_lora = [k for k in adapter if ".mlp.gate.lora_" in k]
    assert bool(router_lora) == (variant == "audio_4e")
    assert any("router LoRA is discarded" in note for note in notes) == (variant == "audio_4e")
    projector = _torch_file(folders.finetuned / "non_lora_trainables.bin")
    fc1 = projector["base_model.model.model.mm_projector.0.weight"]
    assert not np.array_equal(fc1, base["model.mm_projector.0.weight"])
    np.testing.assert_array_equal(conv.params["image_proj/fc1/kernel"], fc1.T)
    aligner = _torch_file(folders.finetuned / "mm_audio_aligner.bin")
    conn = "sound_conn/projector" if variant == "audio_4e" else "audio_conn/out_proj"
    np.testing.assert_array_equal(
        conv.params[f"{conn}/kernel"], aligner["model.mm_audio_aligner.projector.weight"].T
    )


@pytest.mark.parametrize("variant", ["speech_4e", "audio_4e"])
def test_merged_weights_equal_peft_merge_and_unload(variant, converted):
    folders, _, conv, _ = converted(variant)
    cfg = json.loads((folders.finetuned / "config.json").read_text())
    whisper_cfg = transformers.WhisperConfig.from_pretrained(folders.whisper)
    aligner = None
    if variant == "audio_4e":
        qformer = transformers.Blip2QFormerConfig(**ref.QFORMER)
        aligner = ref.QFormerAligner(qformer, cfg["hidden_size"], rm.QUERIES)
    lm = ref.build_llava(cfg, variant, whisper_cfg, aligner)
    base = {k: torch.from_numpy(np.array(v)) for k, v in hf_io.read_tensors(folders.base).items()}
    lm.load_state_dict(base, strict=False)
    merged = peft.PeftModel.from_pretrained(lm, folders.finetuned).merge_and_unload().state_dict()
    pairs = {
        "llm/layers/1/attn/q/kernel": "model.layers.1.self_attn.q_proj.weight",
        "llm/layers/1/attn/o/kernel": "model.layers.1.self_attn.o_proj.weight",
    }
    if variant == "audio_4e":  # layer 1 is dense: peft's LoRA on its FFN
        pairs["llm/layers/1/ffn/down/kernel"] = "model.layers.1.mlp.down_proj.weight"
    for path, name in pairs.items():
        theirs = merged[name].numpy().T
        assert not np.allclose(theirs, base[name].numpy().T)  # the LoRA moved it
        np.testing.assert_allclose(conv.params[path], theirs, rtol=0, atol=1e-6)
    theirs = merged["model.layers.0.mlp.experts.2.up_proj.weight"].numpy().T
    ours = conv.params["llm/layers/0/ffn/experts/w_up_edf"][2]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_8e_experts_compute_the_lora_expert_of_their_source_file(converted):
    """Slot e = expert_list[e]'s FFN + `{e}_mlp_experts.bin`'s LoRA, as `LlamaMLPLoRA` computes
    it (unmerged, scale lora_alpha / lora_r, down's LoRA on silu(gate) * up)."""
    folders, _, conv, _ = converted("8e")
    cfg = json.loads((folders.base / "8config.json").read_text())
    x_nd = np.random.default_rng(0).normal(size=(5, cfg["hidden_size"])).astype(np.float32)
    prefix = "model.layers.1.mlp.deepspeed_moe.experts.deepspeed_experts.0."
    weights = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
    for e in (0, 6):  # 6 reuses mlp_base, with its own LoRA
        expert = ref.LoRAExpert(ref.llama_config(cfg), cfg["lora_r"], cfg["lora_alpha"])
        ffn = _torch_file(folders.experts / f"{rm.EXPERT_LIST[e]}.bin")
        lora = _torch_file(folders.finetuned / f"{e}_mlp_experts.bin")
        state = {k[len(prefix):]: v for k, v in lora.items() if k.startswith(prefix)}
        state.update({w: ffn[f"model.layers.1.mlp.{w}"] for w in weights})
        expert.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        want = expert(torch.from_numpy(x_nd)).detach().numpy()
        bank = {
            k: conv.params[f"llm/layers/1/ffn/experts/{name}"][e]
            for k, name in (("gate", "w_gate_edf"), ("up", "w_up_edf"), ("down", "w_down_efd"))
        }
        gate, up = x_nd @ bank["gate"], x_nd @ bank["up"]
        got = (gate / (1 + np.exp(-gate)) * up) @ bank["down"]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_the_cli_converts_and_prints_what_it_dropped(converted, tmp_path, capsys):
    folders = converted("8e")[0]
    argv = [
        "from-unimoe", "--variant=8e", f"--base={folders.base}", f"--finetuned={folders.finetuned}",
        f"--experts={folders.experts}", f"--clip={folders.clip}", f"--whisper={folders.whisper}",
        str(tmp_path / "out"),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "the base's 4-expert MoE" in printed
    assert printed.strip().splitlines()[-1].endswith(f"LoRA merged -> {tmp_path / 'out'}")
    assert (tmp_path / "out" / released.TOKENIZER_FILE).read_bytes() == (
        folders.base / released.TOKENIZER_FILE
    ).read_bytes()


def _damage(case: str, f: rm.ReleasedFolders) -> tuple[list[str], str]:
    """Breaks a copy of the speech folders; returns (extra argv, the expected error's start)."""
    if case == "missing_shard":
        shard = f.base / "pytorch_model-00002-of-00003.bin"
        shard.unlink()
        return [], f"error: {f.base}/pytorch_model.bin.index.json: tensor "
    if case == "truncated_pickle":
        path = f.finetuned / "mlp_gates.bin"
        path.write_bytes(path.read_bytes()[:300])
        return [], f"error: {path}: torch.load(weights_only=True) cannot read it: it may be "
    if case == "adapter_of_another_rank":
        path = f.finetuned / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "r": 4}))
        return [], f"error: {f.finetuned}/adapter_model.bin: tensor 'base_model.model.model."
    if case == "not_unimoe":
        return ["--finetuned", str(f.whisper)], (
            f"error: {f.whisper}/config.json: model_type 'whisper' without num_experts is not a "
            "Uni-MoE config"
        )
    assert case == "experts_for_4e"
    return ["--experts", str(f.base)], "error: --experts (the Uni-MoE-8e-Experts folder) is"


@pytest.mark.parametrize(
    "case",
    ["missing_shard", "truncated_pickle", "adapter_of_another_rank", "not_unimoe",
     "experts_for_4e"],
)
def test_damaged_inputs_end_with_one_line_naming_the_file(case, converted, tmp_path, capsys):
    original = converted("speech_4e")[0]
    shutil.copytree(original.base.parent, tmp_path / "released")
    copied = (original.base, original.finetuned, original.clip, original.whisper)
    f = rm.ReleasedFolders(
        "speech_4e", *(tmp_path / "released" / p.relative_to(original.base.parent) for p in copied)
    )
    extra, expected = _damage(case, f)
    argv = [
        "from-unimoe", "--variant=speech_4e", "--base", str(f.base), "--finetuned",
        str(f.finetuned), "--clip", str(f.clip), "--whisper", str(f.whisper), *extra,
        str(tmp_path / "out"),
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_from_hf_reads_a_bin_only_folder(tmp_path):
    """`from-hf` takes pytorch_model.bin folders too, with the same result as safetensors."""
    st = hf_models.save("llama", tmp_path / "st", seed=3)
    (tmp_path / "bin").mkdir()
    shutil.copy(st / "config.json", tmp_path / "bin")
    model = transformers.LlamaForCausalLM.from_pretrained(st)
    torch.save(model.state_dict(), tmp_path / "bin" / hf_io.TORCH_SINGLE_FILE)
    from_bin, from_st = core.read_hf(tmp_path / "bin"), core.read_hf(tmp_path / "st")
    assert from_bin.params.keys() == from_st.params.keys()
    for path, value in from_st.params.items():
        np.testing.assert_array_equal(from_bin.params[path], value)
