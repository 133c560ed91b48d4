"""The paper config matches the published checkpoints' layouts, and converted folders assemble
into a UniMoE model by parameter path."""

import dataclasses

import pytest
from flax import nnx

from tests.convert import hf_models
from tests.tiny_model import TOKEN_IDS
from unimoe import checkpoint, config as config_lib
from unimoe.convert import core, families
from unimoe.models.abstract import abstract_module
from unimoe.models.unimoe import ModelSpec, UniMoE, UniMoEConfig
VICUNA_7B_V15 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
}
CLIP_VIT_L14_336 = {
    "architectures": ["CLIPModel"],
    "model_type": "clip",
    "projection_dim": 768,
    "vision_config": {
        "hidden_act": "quick_gelu",
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-05,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
    },
}
WHISPER_SMALL = {
    "architectures": ["WhisperForConditionalGeneration"],
    "model_type": "whisper",
    "activation_function": "gelu",
    "d_model": 768,
    "decoder_attention_heads": 12,
    "decoder_ffn_dim": 3072,
    "decoder_layers": 12,
    "encoder_attention_heads": 12,
    "encoder_ffn_dim": 3072,
    "encoder_layers": 12,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "num_mel_bins": 80,
    "vocab_size": 51865,
}


def _paper_model_config(vocab_size: int, *, moe: bool) -> UniMoEConfig:
    config = config_lib.load_config("configs/unimoe_paper_4e.py")
    return UniMoEConfig.for_stage(
        ModelSpec.from_dict(config.model),
        vocab_size=vocab_size,
        token_ids=TOKEN_IDS,
        num_labels=(2, 2),
        moe=moe,
        lora_rank=0,
    )


def test_paper_modules_are_the_converted_checkpoints_modules():
    paper = _paper_model_config(vocab_size=32000, moe=False)
    options = families.Options(select_layer=-2, num_queries=50)
    (vicuna,) = families.FAMILIES["llama"].configs(VICUNA_7B_V15, options).values()
    (clip,) = families.FAMILIES["clip_vision"].configs(CLIP_VIT_L14_336, options).values()
    whisper = families.FAMILIES["whisper"].configs(WHISPER_SMALL, options)
    # The dense LM as converted (the paper's MoE layers are upcycled from it in stage 3; the
    # layers' layout and recomputation are the run's choice: `factory.load_params` stacks them).
    dense_paper_llm = dataclasses.replace(
        paper.llm, moe_layers=(), moe=vicuna.moe, lora=vicuna.lora, dtype="float32",
        scan_layers=False, remat="none",
    )  # fmt: skip
    assert dense_paper_llm == vicuna
    assert paper.vision == clip
    assert paper.audio == whisper["audio"]
    # The connector adds its own output projection to the LM width; the decoder part is Whisper's.
    assert paper.audio_conn == dataclasses.replace(whisper["audio_conn"], out_dim=4096)
    stage3_llm = _paper_model_config(vocab_size=32000, moe=True).llm
    assert stage3_llm.moe_layers == tuple(range(32)) and stage3_llm.moe.num_experts == 4


def test_paper_config_names_the_converted_directories():
    config = config_lib.load_config(
        "configs/unimoe_paper_4e.py:vicuna=ckpt/vicuna,clip=ckpt/clip,whisper=ckpt/whisper"
    )
    assert dict(config.pretrained) == {
        "llm": "ckpt/vicuna",
        "vision": "ckpt/clip",
        "audio": "ckpt/whisper",
    }


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("paper")
    dirs = {}
    for label, name, options in (
        ("llm", "llama", families.Options()),
        ("vision", "clip_vision", families.Options()),
        ("audio", "whisper", families.Options(num_queries=7)),
    ):
        core.from_hf(hf_models.save(name, root / f"{name}_hf"), root / name, options)
        dirs[label] = str(root / name)
    return dirs


def test_converted_folders_assemble_into_a_unimoe_model(converted):
    """Tiny stand-ins of Vicuna + CLIP + Whisper load into a UniMoE of their sizes: every converted
    parameter finds its place, and nothing else comes from them."""
    model_dict = {
        "llm": dict(dim=96, num_layers=2, num_heads=6, num_kv_heads=2, ffn_dim=80),
        "vision": dict(image_size=20, patch_size=4, width=48, depth=3, num_heads=6, mlp_dim=72),
        "audio": dict(num_mel_bins=10, max_frames=30, width=48, depth=2, num_heads=6, mlp_dim=72),
        "audio_conn": dict(num_queries=7, width=48, depth=2, num_heads=6, mlp_dim=72),
        "moe_layers": "all",
        "moe": dict(num_experts=4, top_k=2),
        "lora": dict(alpha=16.0, dropout=0.05),
    }
    cfg = UniMoEConfig.for_stage(
        ModelSpec.from_dict(model_dict),
        vocab_size=hf_models.LM["vocab_size"],
        token_ids=TOKEN_IDS,
        num_labels=(2, 2),
        moe=False,
        lora_rank=0,
    )
    # Abstract: load_params's path and shape checks, without paying for a random init.
    model = abstract_module(lambda rngs: UniMoE(cfg, rngs=rngs))
    model_shapes = {
        checkpoint.path_str(path): tuple(variable.get_value().shape)
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    source = core.pretrained_params(converted)
    assert {path: model_shapes.get(path) for path in source} == {
        path: value.shape for path, value in source.items()
    }
    assert {path.split("/")[0] for path in source} == {"llm", "vision", "audio", "audio_conn"}
    # Everything else is the model's own: connector projections, query embeddings, probe heads.
    rest = {path.split("/")[0] for path in model_shapes if path not in source}
    assert rest == {"image_proj", "audio_conn", "image_head", "audio_head"}


def test_pretrained_params_rejects_overlapping_directories(converted):
    with pytest.raises(ValueError, match="param llm/embed/embedding is in both"):
        core.pretrained_params({"llm": converted["llm"], "again": converted["llm"]})
