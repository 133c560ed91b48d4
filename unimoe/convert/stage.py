"""A finished training stage -> Hugging Face folders (`python -m unimoe.convert to-hf STAGE_DIR`).

OUT/llm     the LM with its LoRA merged: `LlamaForCausalLM` (dense) or `MixtralForCausalLM` (MoE
            in every layer, top-k softmax router), with the stage's tokenizer;
OUT/vision  the ViT as a `CLIPVisionModel`;
OUT/audio   the audio encoder, and the speech connector's decoder, as a `WhisperModel`;
OUT/unimoe_extra.safetensors  the parameters no HF model holds (image projector, the speech
            connector's queries and projections, probe heads), under their unimoe paths;
OUT/README.md  what each file is.

Each folder is what `from-hf` reads: its tensors come from the family map (`families.py`) run
backwards through `core.to_hf_tensors`, so `from-hf` on it gives the stage's parameters back. A
module is written only when the stage defined all of it (DONE.json's `defined_params`); the others
are its random init. The model config comes from WORKDIR/config.json, which `python -m
unimoe.main` writes beside the stages.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from collections.abc import Mapping

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from unimoe.checkpoint import DONE_FILE, Checkpointer, path_str
from unimoe.convert import core, hf_io
from unimoe.convert.families import FAMILIES, Options
from unimoe.data import builtin
from unimoe.data.tokenizer import TextTokenizer
from unimoe.experiment import ExperimentConfig, from_config_dict
from unimoe.models import layer_stack
from unimoe.models import audio as audio_lib, connectors, llm, vision as vision_lib
from unimoe.nn.lora import merge_lora

CONFIG_FILE = "config.json"  # the experiment config `run.run_experiment` writes in WORKDIR
EXTRA_FILE = "unimoe_extra.safetensors"
README_FILE = "README.md"
# Parameters outside every HF model, by path prefix, as the README describes them.
EXTRAS = {
    "image_proj/": "image connector: the MLP (fc1, GELU, fc2) from the CLIP hidden state "
    "`hidden_states[select_layer]` (class token dropped) to the LM width",
    "audio_conn/query_tokens": "speech connector: learned queries; added to the decoder's "
    "position table they are the Whisper decoder's `inputs_embeds`",
    "audio_conn/enc_proj/": "speech connector: Whisper encoder output -> decoder width",
    "audio_conn/out_proj/": "speech connector: Whisper decoder output -> LM width",
    "image_head/": "stage-0 probe head on the ViT (image labels)",
    "audio_head/": "stage-0 probe head on the audio encoder (audio labels)",
    "sound/": "sound tower: BEATs (`unimoe.models.beats`, the official state_dict's names)",
    "sound_conn/": "sound connector: BLIP-2 Q-Former (Hugging Face `Blip2QFormerModel` names), "
    "its learned queries and the projection to the LM width",
    "sound_head/": "stage-0 probe head on BEATs (audio labels)",
}


# A stage's checkpoints: WORKDIR/STAGE/checkpoints (`factory.stage_checkpointer`).
CHECKPOINTS = "checkpoints"


def is_finished_stage(path: pathlib.Path) -> bool:
    return (path / CHECKPOINTS / DONE_FILE).is_file()


def read_experiment(stage_dir: pathlib.Path) -> ExperimentConfig:
    """The experiment that trained WORKDIR/STAGE, from WORKDIR/config.json."""
    config_path = stage_dir.parent / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} is missing: {stage_dir} is a finished stage, but to export it the "
            "experiment config that `python -m unimoe.main` writes in its workdir must be there"
        )
    experiment = from_config_dict(json.loads(config_path.read_text()))
    if stage_dir.name not in experiment.stages:
        raise ValueError(
            f"{stage_dir}: {config_path} defines no stage {stage_dir.name!r} "
            f"({sorted(experiment.stages)}); give WORKDIR/STAGE"
        )
    return experiment


def hf_lm_family(cfg: llm.LLMConfig) -> str:
    """'llama' or 'mixtral'; raises naming each setting neither HF family computes."""
    moe = cfg.moe
    problems = ["config.model.llm.qkv_bias=True"] if cfg.qkv_bias else []
    if cfg.moe_layers:
        if len(cfg.moe_layers) != cfg.num_layers:
            problems.append(f"MoE in layers {list(cfg.moe_layers)} of {cfg.num_layers}")
        if moe.router != "topk_softmax":
            problems.append(f"config.model.moe.router={moe.router!r}")
        for name in ("num_null_experts", "num_shared_experts", "top_groups"):
            if getattr(moe, name):
                problems.append(f"config.model.moe.{name}={getattr(moe, name)}")
        if moe.routed_scaling != 1.0:
            problems.append(f"config.model.moe.routed_scaling={moe.routed_scaling}")
    if problems:
        raise ValueError(
            f"the LM has no Hugging Face counterpart (Llama: dense; Mixtral: every layer MoE with "
            f"the top-k softmax router, no null / shared experts): {'; '.join(problems)}"
        )
    return "mixtral" if cfg.moe_layers else "llama"


def _rope_parameters(cfg: llm.LLMConfig) -> dict:
    rope = cfg.rope_scaling
    params = {"rope_type": rope.rope_type, "rope_theta": cfg.rope_theta}
    if rope.rope_type != "default":
        params["factor"] = rope.factor
    if rope.rope_type == "llama3":
        params.update(
            low_freq_factor=rope.low_freq_factor,
            high_freq_factor=rope.high_freq_factor,
            original_max_position_embeddings=rope.original_max_positions,
        )
    return params


def _lm_hf_config(
    cfg: llm.LLMConfig, family: str, tokenizer: TextTokenizer | None, max_positions: int
) -> dict:
    config = {
        "architectures": ["MixtralForCausalLM" if family == "mixtral" else "LlamaForCausalLM"],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.moe.ffn_dim or cfg.ffn_dim if cfg.moe_layers else cfg.ffn_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": _rope_parameters(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        # RoPE has no length limit; this is the longest sequence the stage trained on.
        "max_position_embeddings": max_positions,
        "dtype": "float32",
    }
    if family == "mixtral":
        config.update(num_local_experts=cfg.moe.num_experts, num_experts_per_tok=cfg.moe.top_k)
    if tokenizer is not None:
        config.update(
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
        )
    return config


def merged_lm_params(cfg: llm.LLMConfig, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The LM's parameters ('llm/...', unrolled names) with every LoRA adapter folded into its
    base weight."""
    # Built unrolled whatever the stage's layout: `params` speak `llm/layers/<i>/...`.
    lm = core.abstract_modules({"llm": dataclasses.replace(cfg, scan_layers=False)})["llm"]
    core.load_into({"llm": lm}, params)
    merge_lora(lm)
    base = nnx.state(lm, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    return {f"llm/{path_str(p)}": np.asarray(v.get_value()) for p, v in nnx.to_flat_state(base)}


def _converted(
    family: str,
    hf_config: dict,
    params: Mapping[str, np.ndarray],
    extra: Mapping[str, np.ndarray] | None = None,
    options: Options = Options(),
) -> core.Converted:
    """`params` as the HF family's tensors; every tensor float32."""
    configs = FAMILIES[family].configs(hf_config, options)
    rules = FAMILIES[family].rules(hf_config, configs, set())
    shapes = core.param_shapes(core.abstract_modules(configs))
    wrong = [r.path for r in rules if tuple(params[r.path].shape) != shapes[r.path]]
    if wrong:  # the config.json written here must describe the module it came from
        raise AssertionError(f"{family} config.json does not fit params {wrong[:5]}")
    extra = dict(extra or {})
    names = [*extra, *(name for rule in rules for name in rule.hf_names)]
    used = {rule.path: params[rule.path] for rule in rules}
    return core.Converted(
        family, hf_config, configs, used, extra, dict.fromkeys(names, "float32")
    )


def _clip(cfg: vision_lib.ViTEncoder.Config, params: Mapping[str, np.ndarray]) -> core.Converted:
    hf_config = {
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "num_channels": 3,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": cfg.layer_norm_eps,
        "dtype": "float32",
    }
    options = Options(select_layer=cfg.select_layer)
    return _converted("clip_vision", hf_config, params, options=options)


def _whisper(
    enc: audio_lib.AudioEncoder.Config,
    conn: connectors.QueryConnector.Config,
    params: Mapping[str, np.ndarray],
) -> core.Converted:
    if conn.width != enc.width:
        raise ValueError(
            f"config.model.audio_conn.width={conn.width} differs from config.model.audio.width="
            f"{enc.width}: a Whisper model has one width, so the audio tower has no HF counterpart"
        )
    hf_config = {
        "architectures": ["WhisperModel"],
        "model_type": "whisper",
        "d_model": enc.width,
        "num_mel_bins": enc.num_mel_bins,
        "max_source_positions": enc.max_frames // 2,
        "encoder_layers": enc.depth,
        "encoder_attention_heads": enc.num_heads,
        "encoder_ffn_dim": enc.mlp_dim,
        "decoder_layers": conn.depth,
        "decoder_attention_heads": conn.num_heads,
        "decoder_ffn_dim": conn.mlp_dim,
        # The decoder reads learned queries (in the extras), never tokens: one zero token row,
        # so transformers loads the folder without initialising anything at random.
        "max_target_positions": conn.num_queries,
        "vocab_size": 1,
        **dict.fromkeys(
            ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"), 0
        ),
        "activation_function": "gelu",
        "dtype": "float32",
    }
    extra = {
        "encoder.embed_positions.weight": audio_lib.sinusoids(enc.max_frames // 2, enc.width),
        "decoder.embed_tokens.weight": np.zeros((1, enc.width), np.float32),
        "decoder.embed_positions.weight": np.zeros((conn.num_queries, enc.width), np.float32),
    }
    return _converted("whisper", hf_config, params, extra, Options(num_queries=conn.num_queries))


def _tokenizer_file(experiment: ExperimentConfig) -> pathlib.Path:
    """`config.tokenizer`, or the built-in tokenizer stored beside the data."""
    if experiment.tokenizer:
        return pathlib.Path(experiment.tokenizer)
    return pathlib.Path(experiment.data.data_dir) / builtin.TOKENIZER_FILE


def _write_tokenizer(
    source: pathlib.Path, lm_dir: pathlib.Path, max_length: int, *, built_in: bool
) -> str:
    """Copies the tokenizer file under the name transformers looks for; returns a README line."""
    is_json = source.suffix == ".json"
    shutil.copyfile(source, lm_dir / ("tokenizer.json" if is_json else "tokenizer.model"))
    # Both kinds the stages train with use LLaMA's special tokens (`data.tokenizer`).
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast" if is_json else "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "model_max_length": max_length,
    }
    (lm_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    line = f"tokenizer from {source}"
    if built_in:
        return line + " (the built-in BPE; `<image>`, `<video>`, `<audio>` are ids 3, 4, 5)"
    return line + " (the media placeholders are the three ids past its vocabulary)"


def _lm_folder(
    cfg: llm.LLMConfig, params: Mapping[str, np.ndarray], tokenizer: TextTokenizer | None,
    max_length: int,
) -> tuple[core.Converted, str]:
    family = hf_lm_family(cfg)
    hf_config = _lm_hf_config(cfg, family, tokenizer, max_length)
    merged = f" with its LoRA (rank {cfg.lora.rank}) merged" if cfg.lora.enabled else ""
    kind = hf_config["architectures"][0]
    return _converted(family, hf_config, merged_lm_params(cfg, params)), f"{kind}{merged}"


def _folders(
    experiment: ExperimentConfig,
    stage_name: str,
    params: Mapping[str, np.ndarray],
    defined: set[str],
    tokenizer: TextTokenizer | None,
) -> tuple[dict[str, tuple[core.Converted, str]], list[str]]:
    """({folder: (its tensors, what it is)} for each module the stage defined, README lines for
    the others). Raises before anything is written when a module has no HF counterpart."""
    stage, spec = experiment.stage(stage_name), experiment.model
    lm_cfg = spec.stage_llm(
        vocab_size=params["llm/embed/embedding"].shape[0], moe=stage.moe, lora_rank=stage.lora_rank
    )
    builders = {
        "llm": (
            ("llm/",),
            lambda: _lm_folder(lm_cfg, params, tokenizer, experiment.data.seq_len),
        ),
        "vision": (("vision/",), lambda: (_clip(spec.vision, params), "CLIPVisionModel")),
        "audio": (
            ("audio/", "audio_conn/"),
            lambda: (
                _whisper(spec.audio, spec.audio_conn, params),
                "WhisperModel: the audio encoder, and as its decoder the speech connector "
                "(fed the learned queries of the extras file as `inputs_embeds`)",
            ),
        ),
    }
    folders, skipped = {}, []
    for name, (prefixes, build) in builders.items():
        own = [p for p in params if p.startswith(prefixes) and not p.startswith(tuple(EXTRAS))]
        # An adapter the stage never trained has B = 0: merging it changes nothing.
        undefined = [p for p in own if p not in defined and "/lora" not in p]
        if undefined:
            skipped.append(
                f"- `{name}/`: not written: the stage neither trained nor inherited "
                f"{undefined[0]} (and {len(undefined) - 1} more of {len(own)}): random init"
            )
        else:
            folders[name] = build()
    return folders, skipped


def _write_extras(
    params: Mapping[str, np.ndarray], defined: set[str], out_dir: pathlib.Path
) -> list[str]:
    """Writes the defined parameters no HF model holds; returns their README lines."""
    extras = {p: params[p] for p in sorted(defined) if p.startswith(tuple(EXTRAS))}
    if not extras:
        return []
    save_file({p: np.ascontiguousarray(v) for p, v in extras.items()}, out_dir / EXTRA_FILE)
    return [
        f"- `{EXTRA_FILE}`: no HF counterpart, under unimoe's parameter paths; kernels are "
        "[in, out] (y = x @ kernel + bias):",
        *(
            f"  - `{prefix}`: {text}"
            for prefix, text in EXTRAS.items()
            if any(p.startswith(prefix) for p in extras)
        ),
    ]


def export_stage(
    stage_dir: str | pathlib.Path, out_dir: str | pathlib.Path, *, max_shard_bytes: int = 0
) -> list[str]:
    """Writes the finished stage WORKDIR/STAGE as HF folders under `out_dir` (module docstring);
    returns the README's lines."""
    stage_dir, out_dir = pathlib.Path(stage_dir).absolute(), pathlib.Path(out_dir)
    experiment = read_experiment(stage_dir)
    with Checkpointer(stage_dir / CHECKPOINTS) as ckpt:
        params, defined = ckpt.final_params()
    # A scanned LM's stacked layers, one by one (`models.layer_stack`): HF names them so.
    defined = list(layer_stack.unrolled_params({path: params[path] for path in defined}))
    params = layer_stack.unrolled_params(params)
    tokenizer_file = _tokenizer_file(experiment)
    tokenizer = None
    if tokenizer_file.is_file():
        tokenizer = builtin.experiment_tokenizer(
            experiment.tokenizer, experiment.data.data_dir, on_missing="error"
        )
    folders, lines = _folders(experiment, stage_dir.name, params, set(defined), tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (conv, what) in folders.items():
        tensors = core.to_hf_tensors(conv)
        hf_io.write_folder(out_dir / name, conv.hf_config, tensors, max_shard_bytes=max_shard_bytes)
        if name == "llm" and tokenizer is None:
            what += f"; no tokenizer: {tokenizer_file} is missing"
        elif name == "llm":
            what += "; " + _write_tokenizer(
                tokenizer_file,
                out_dir / name,
                experiment.data.seq_len,
                built_in=not experiment.tokenizer,
            )
        lines.append(f"- `{name}/`: {what}")
    lines += _write_extras(params, set(defined), out_dir)
    lines = [
        f"# Stage {stage_dir.name} of {stage_dir.parent}",
        "",
        *lines,
        "",
        "`python -m unimoe.convert from-hf OUT/<folder> DIR` reads each folder back.",
    ]
    (out_dir / README_FILE).write_text("\n".join(lines) + "\n")
    return lines
