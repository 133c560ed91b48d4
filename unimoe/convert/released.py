r"""Released Uni-MoE checkpoints -> a converted checkpoint (`python -m unimoe.convert from-unimoe`).

  python -m unimoe.convert from-unimoe --variant=speech_4e --base=Uni-MoE-speech-base \
      --finetuned=Uni-MoE-speech-e2 --clip=clip-vit-large-patch14-336 --whisper=whisper-small OUT

Variants (github.com/HITsz-TMG/Uni-MoE): 'speech_4e' (`Uni_MoE_speech`, MoE on every layer, the
Whisper-decoder speech aligner), 'audio_4e' (`Uni_MoE_audio`, MoE on the even layers, BEATs +
Q-Former, `--beats=FILE`), '8e' (`Uni_MoE_8e`, DeepSpeed MoE on every layer, `--experts=DIR` with
`mlp_{audiocap,basev,base,base1,base4,base7}.bin`, the base's `8config.json` as its config).

The official loaders are reproduced in their order (`Uni_MoE_speech/model/all_builder.py`
`load_all_pretrained_model`; 8E: `load_all_pretrained_model_dp`), as strict loads: every tensor
lands in the model or is dropped for a reason the returned notes give, and every parameter is
filled; the first tensor missing, extra or of the wrong shape is named with its file.
- 4E: base shards -> the base's own mm_projector.bin / mm_audio_aligner.bin (fallbacks; the
  fine-tuned files override them) -> non_lora_trainables.bin -> the peft adapter merged ->
  mm_audio_aligner.bin -> mlp_gates.bin. The routers' peft LoRA (audio / interleaved models,
  whose 'mlp.gate.' keyword misses the router) is merged and then overwritten by mlp_gates.bin,
  so it is discarded, as in the official evaluation; the notes say so.
- 8E: base shards (its 4-expert MoE dropped) -> expert e of every MoE layer from
  `--experts/<expert_list[e]>.bin` -> non_lora_trainables.bin -> mlp_gates.bin (DeepSpeed's
  `deepspeed_moe.gate.wg`) -> the peft adapter merged -> mm_audio_aligner.bin; each expert's
  LoRA (`{e}_mlp_experts.bin`, `LlamaMLPLoRA`: scale lora_alpha / lora_r of config.json, the
  down-projection adapter reading silu(gate) * up) is added to the final expert weights.
- The towers come from the public folders, as the official loader reloads them: CLIP and Whisper
  through `core.read_hf`, BEATs through `beats.read_beats`.

All LoRA is merged in float32 (W + (B @ A) * scale, peft's `merge_and_unload`; exact to
rounding), so the model has LoRA rank 0. Parameters keep the stored dtype (fp32 in the releases;
merged weights are cast back to it). The output is `core.save`'s layout (family
'unimoe_released'), `tokenizer.model` copied from the base, and `unimoe_convert.json` also records
'variant' and 'model': the `config.model` dict (`model_section`) that, given to
`ModelSpec.from_dict` and built with `factory.build_model(spec, tokenizer, moe=True,
lora_rank=0)`, gives a model every parameter of which is in OUT except the ones
`not_in_checkpoint` names (the tokenizer's appended vocabulary rows, unimoe's stage-0 probe heads,
and for 'audio_4e' the unused Whisper connector's learned parts).

Memory: inputs are memory-mapped (`hf_io.read_torch_file`), so the peak is about one copy of the
converted parameters (the experts stacked, the linears transposed) plus the page cache: ~80 GB
at 7B x 4 experts in fp32, ~150 GB for 8E; merged weights are made one at a time.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from unimoe.convert import beats as beats_lib, core, hf_io, qformer_names
from unimoe.convert.families import FAMILIES, Options, Rule
from unimoe.convert.released_model import (
    BLIP2_QFORMER_HEADS, FAMILY, PAPER_MODEL, VARIANTS, model_dict, model_section, moe_config,
    not_in_checkpoint, not_in_checkpoint_of,
)  # fmt: skip
from unimoe.convert.released_sources import (
    Adapter, ReleasedError, State, canonical_8e, gate_layers, load_experts_8e, merge_adapter,
    merged, read_adapter, read_side_file,
)  # fmt: skip
from unimoe.models import connectors
from unimoe.models.abstract import abstract_module
from unimoe.models.qformer import QFormerConnector
from unimoe.nn.lora import LoRAConfig

__all__ = [
    "BLIP2_QFORMER_HEADS", "GENERATION_CONFIG", "PAPER_MODEL", "TOKENIZER_FILE", "VARIANTS",
    "from_unimoe", "model_section", "not_in_checkpoint", "not_in_checkpoint_of", "read_unimoe",
]

TOKENIZER_FILE = "tokenizer.model"
GENERATION_CONFIG = "generation_config.json"
STORE_DTYPES = ("float32", "float16", "bfloat16")
NON_LORA, ALIGNER, GATES, FM = (
    "non_lora_trainables.bin", "mm_audio_aligner.bin", "mlp_gates.bin", "fm_adapter.bin"
)  # fmt: skip
PROJECTOR = "model.mm_projector"
AUDIO_ALIGNER = "model.mm_audio_aligner."
WHISPER_DECODER = f"{AUDIO_ALIGNER}decoder.audio_decoder."
QUERY_TOKENS = "model.query_tokens"


def _config(variant: str, base: pathlib.Path, finetuned: pathlib.Path) -> tuple[dict, pathlib.Path]:
    """config.json as the official loader reads it: the fine-tuned folder's (4E), the base's
    8config.json (8E, whose README has it copied over config.json)."""
    if variant == "8e":
        path = base / "8config.json"
        path = path if path.is_file() else base / "config.json"
    else:
        path = finetuned / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a released Uni-MoE folder holds it")
    cfg = json.loads(path.read_text())
    if cfg.get("model_type") != "llava" or "num_experts" not in cfg:
        raise ReleasedError(
            f"{path}: model_type {cfg.get('model_type')!r} without num_experts is not a Uni-MoE "
            "config (model_type 'llava', num_experts, num_experts_per_tok)"
        )
    wants = (
        ("mm_projector_type", "mlp2x_gelu"),
        ("audio_projector_type", "linear"),
        ("mm_vision_select_feature", "patch"),
    )
    for key, want in wants:
        if cfg.get(key, want) != want:
            raise ReleasedError(f"{path}: {key}={cfg[key]!r} is not supported (Uni-MoE: {want!r})")
    return cfg, path


def _moe_layers(variant: str, base_tensors: Mapping, gates: Mapping, where: str) -> tuple:
    """The MoE layers, read from the weights: the base's routers (4E) or mlp_gates.bin's (8E)."""
    if variant == "8e":
        layers = gate_layers(gates)
    else:
        layers = sorted(
            int(name.split(".")[2])
            for name in base_tensors
            if name.startswith("model.layers.") and name.endswith(".mlp.gate.weight")
        )
    if not layers:
        raise ReleasedError(
            f"{where}: no MoE router (model.layers.L.mlp.gate.weight, 8E: mlp_gates.bin's "
            "mlp.deepspeed_moe.gate.wg.weight): not a Uni-MoE base / fine-tuned pair"
        )
    return tuple(layers)


def _lm(variant: str, cfg: dict, layers: tuple[int, ...]) -> Any:
    llm_cfg = FAMILIES["llama"].configs({**cfg, "model_type": "llama"}, Options())["llm"]
    moe = moe_config(variant, cfg["num_experts"], cfg.get("num_experts_per_tok", 2))
    return dataclasses.replace(llm_cfg, moe_layers=layers, moe=moe)


def _qformer_config(
    aligner: dict, enc_dim: int, out_dim: int, heads: int, source: str
) -> QFormerConnector.Config:
    """Uni-MoE-audio's Q-Former is `Blip2QFormerModel(Blip2Config().qformer_config)`, hard-coded,
    so no file states its shape: the heads are `heads` (BLIP-2's 12 in the release), the rest is
    read from the tensors."""
    prefix = f"{AUDIO_ALIGNER}qformer.qformer.encoder.layer."
    try:
        queries = aligner[f"{AUDIO_ALIGNER}query_tokens"]
        mlp = aligner[f"{prefix}0.intermediate_query.dense.weight"]
    except KeyError as err:
        raise ReleasedError(f"{source}: tensor {err.args[0]!r} is missing") from None
    layers = sorted({int(n[len(prefix):].split(".")[0]) for n in aligner if n.startswith(prefix)})
    cross = [i for i in layers if f"{prefix}{i}.crossattention.attention.query.weight" in aligner]
    return QFormerConnector.Config(
        enc_dim=enc_dim,
        out_dim=out_dim,
        num_queries=queries.shape[1],
        width=queries.shape[2],
        depth=len(layers),
        num_heads=heads,
        mlp_dim=mlp.shape[0],
        cross_attention_every=cross[1] if len(cross) > 1 else len(layers),
    )


@dataclasses.dataclass
class _Towers:
    configs: dict[str, Any]
    params: dict[str, np.ndarray]
    notes: list[str]


def _towers(
    variant: str, cfg: dict, paths: dict, aligner: dict, finetuned: pathlib.Path
) -> _Towers:
    """CLIP, Whisper (and BEATs) from their public files. The speech variants take only the
    Whisper encoder here: the decoder is mm_audio_aligner.bin's (trained)."""
    clip = core.read_hf(paths["clip"], Options(select_layer=cfg.get("mm_vision_select_layer", -2)))
    queries = aligner.get(QUERY_TOKENS)
    if variant != "audio_4e" and queries is None:
        raise ReleasedError(f"{finetuned / ALIGNER}: tensor {QUERY_TOKENS!r} is missing")
    # The audio model's Whisper connector is unused (all audio goes to BEATs): config's size.
    num_queries = queries.shape[1] if queries is not None else cfg.get("query_tokens_size", 50)
    whisper = core.read_hf(paths["whisper"], Options(num_queries=num_queries))
    for flag, conv, family in (("clip", clip, "clip_vision"), ("whisper", whisper, "whisper")):
        if conv.family != family:
            raise ReleasedError(f"--{flag}={paths[flag]} holds a {conv.family} model, not {family}")
    configs = {**clip.configs, **whisper.configs}
    keep = ("vision/", "audio/") if variant != "audio_4e" else ("vision/", "audio/", "audio_conn/")
    params = {p: v for p, v in {**clip.params, **whisper.params}.items() if p.startswith(keep)}
    notes = []
    if variant == "audio_4e":
        sound, notes = beats_lib.read_beats(paths["beats"])
        configs.update(sound.configs)
        params.update(sound.params)
    return _Towers(configs, params, notes)


def _rules(variant: str, configs: dict, conn: Any) -> list[Rule]:
    """unimoe param <- official tensor names, for the LM, the projector and the audio aligner."""
    rules = FAMILIES["llama"].rules({}, {"llm": configs["llm"]}, set())
    for i, fc in ((0, "fc1"), (2, "fc2")):
        rules += [
            Rule(f"image_proj/{fc}/kernel", (f"{PROJECTOR}.{i}.weight",), "linear"),
            Rule(f"image_proj/{fc}/bias", (f"{PROJECTOR}.{i}.bias",), "copy"),
        ]
    if variant == "audio_4e":
        return rules + [
            dataclasses.replace(r, hf_names=tuple(AUDIO_ALIGNER + n for n in r.hf_names))
            for r in qformer_names.uni_moe_rules(conn, root="sound_conn")
        ]
    whisper = FAMILIES["whisper"].rules({}, {"audio": configs["audio"], "audio_conn": conn}, set())
    for rule in whisper:
        if rule.path.startswith("audio_conn/"):
            names = tuple(WHISPER_DECODER + n.removeprefix("decoder.") for n in rule.hf_names)
            rules.append(dataclasses.replace(rule, hf_names=names))
    return rules + [
        Rule("audio_conn/query_tokens", (QUERY_TOKENS,), "copy"),
        Rule("audio_conn/out_proj/kernel", (f"{AUDIO_ALIGNER}projector.weight",), "linear"),
        Rule("audio_conn/out_proj/bias", (f"{AUDIO_ALIGNER}projector.bias",), "copy"),
    ]


def _shapes(configs: dict, conn: Any) -> dict[str, tuple[int, ...]]:
    """The shapes of the params the state fills: the LM, the projector and the aligner."""
    llm_cfg = configs["llm"]
    proj = connectors.MLPProjector.Config(in_dim=configs["vision"].width, out_dim=llm_cfg.dim)
    if isinstance(conn, QFormerConnector.Config):
        root, aligner = "sound_conn", QFormerConnector
    else:
        root, aligner = "audio_conn", connectors.QueryConnector
    modules = {
        "image_proj": abstract_module(lambda rngs: connectors.MLPProjector(proj, rngs=rngs)),
        root: abstract_module(lambda rngs: aligner(conn, rngs=rngs)),
    }
    lm_shapes = core.param_shapes(core.abstract_modules({"llm": llm_cfg}))
    return {**lm_shapes, **core.param_shapes(modules)}


def _discard(variant: str) -> Callable[[str], str | None]:
    """Why the official loader drops a tensor of the base or a side file (None: it loads it)."""

    def reason(name: str) -> str | None:
        if name.endswith("rotary_emb.inv_freq"):
            return "RoPE's frequency buffer (unimoe computes it)"
        if name.startswith(("model.vision_tower.", "model.audio_tower.")):
            return "an encoder tower: the official loader reloads it from the public files"
        if name == f"{WHISPER_DECODER}embed_tokens.weight":
            return "the Whisper decoder's token table: the aligner reads learned queries"
        if variant == "8e" and (".mlp.experts." in name or name.endswith(".mlp.gate.weight")):
            return (
                "the base's 4-expert MoE: the 8E model takes its experts from --experts and its "
                "routers from mlp_gates.bin"
            )
        if "lora_" in name:  # mlp_gates.bin of peft-wrapped routers
            return (
                "the routers' peft LoRA, which the official loader does not load (strict=False "
                "skips it): the router LoRA is discarded"
            )
        return None

    return reason


def _rename(name: str) -> str:
    # peft >= 0.6 saves a wrapped linear's weight as '<module>.base_layer.weight'.
    return canonical_8e(name.replace(".base_layer.", "."))


def _load_side(state: State, folder: pathlib.Path, name: str, variant: str, **kw) -> list[str]:
    tensors = read_side_file(folder, name, **kw)
    return state.load(tensors, str(folder / name), rename=_rename, discard=_discard(variant))


def _load(
    variant: str,
    state: State,
    base: pathlib.Path,
    finetuned: pathlib.Path,
    experts: pathlib.Path | None,
    cfg: dict,
    adapter: Adapter,
) -> None:
    """The official load order (module docstring) into `state`."""
    discard = _discard(variant)
    for path, tensors in _base_shards(base).items():
        state.load(tensors, str(path), rename=_rename, discard=discard)
    for name in ("mm_projector.bin", ALIGNER):  # the base's own, overridden by the fine-tuned
        _load_side(state, base, name, variant, required=False)
    pending = {}
    if variant == "8e":
        pending = load_experts_8e(state, experts, finetuned, cfg["num_experts"])
    _load_side(state, finetuned, NON_LORA, variant, required=False)
    if variant == "8e":
        _load_side(state, finetuned, GATES, variant, required=True)
        _check_fm(state, finetuned, cfg)
        merge_adapter(state, adapter)
        _load_side(state, finetuned, ALIGNER, variant, required=True)
        _merge_expert_lora(state, pending, cfg)
        return
    lora_merged = merge_adapter(state, adapter)
    _load_side(state, finetuned, ALIGNER, variant, required=True)
    gates = set(_load_side(state, finetuned, GATES, variant, required=True))
    routers = [name for name in lora_merged if name in gates]
    if routers:
        state.notes.append(
            f"{adapter.path}: the LoRA of {len(routers)} routers ({routers[0]!r}, ...) was merged "
            f"and then overwritten by {GATES}, as the official loader does: it is discarded"
        )


def _base_shards(base: pathlib.Path) -> dict[pathlib.Path, dict[str, np.ndarray]]:
    by_file: dict[pathlib.Path, dict[str, np.ndarray]] = {}
    files = hf_io.tensor_files(base)
    for name, value in hf_io.read_tensors(base).items():
        by_file.setdefault(files[name], {})[name] = value
    return by_file


def _check_fm(state: State, finetuned: pathlib.Path, cfg: dict) -> None:
    path = finetuned / FM
    if not path.is_file() or not hf_io.read_torch_file(path):
        return
    if cfg.get("use_fm_block"):
        raise ReleasedError(
            f"{path}: the modality gate-input blocks (use_fm_block) are not supported"
        )
    state.notes.append(f"{path}: not used: config.json has use_fm_block false (no fm modules)")


def _merge_expert_lora(state: State, pending: dict, cfg: dict) -> None:
    """`LlamaMLPLoRA`'s adapters, scale lora_alpha / lora_r, added to the final expert weights."""
    try:
        rank, alpha = int(cfg["lora_r"]), float(cfg["lora_alpha"])
    except KeyError as err:
        raise ReleasedError(f"config.json (8E): field {err.args[0]!r} is missing") from None
    for name, (a_ri, b_or, source) in pending.items():
        weight = state.tensors[name]
        if a_ri.shape != (rank, weight.shape[1]) or b_or.shape != (weight.shape[0], rank):
            raise ReleasedError(
                f"{source}: the LoRA of {name!r} is {tuple(b_or.shape)} @ {tuple(a_ri.shape)}, "
                f"but config.json's lora_r={rank} and the weight {tuple(weight.shape)} need "
                f"({weight.shape[0]}, {rank}) @ ({rank}, {weight.shape[1]})"
            )
        state.tensors[name] = merged(weight, a_ri, b_or, alpha / rank)


def _where(name: str, variant: str, base: pathlib.Path, finetuned: pathlib.Path) -> str:
    if name.startswith(AUDIO_ALIGNER) or name == QUERY_TOKENS:
        return str(finetuned / ALIGNER)
    if name.startswith(PROJECTOR):
        return f"{finetuned / NON_LORA} and the base {base}"
    if name.endswith(".mlp.gate.weight"):
        return str(finetuned / GATES)
    if variant == "8e" and ".mlp.experts." in name:
        return "the --experts files"
    return f"the base {base}"


def _want(rule: Rule, shape: tuple[int, ...], got: tuple[int, ...]) -> tuple[bool, str]:
    if rule.kind == "rows":
        ok = len(got) == 2 and got[0] >= rule.rows and got[1] == shape[1]
        return ok, f"(>= {rule.rows}, {shape[1]})"
    want = (1, *shape) if rule.path == "audio_conn/query_tokens" else core.hf_shape(rule, shape)
    return got == want, str(want)


def _params(state: State, rules: list[Rule], shapes: dict, where: Any) -> dict[str, np.ndarray]:
    """The unimoe params from the loaded state, each tensor taken once (and freed)."""
    params = {}
    for rule in rules:
        shape = shapes[rule.path]
        for name in rule.hf_names:
            if name not in state.tensors:
                raise ReleasedError(
                    f"tensor {name!r} is missing: {where(name)} should hold it (unimoe param "
                    f"{rule.path}; config.json describes a model that has it)"
                )
            got = tuple(state.tensors[name].shape)
            ok, want = _want(rule, shape, got)
            if not ok:
                raise ReleasedError(
                    f"{state.origin[name]}: tensor {name!r} has shape {got}, but config.json "
                    f"implies {want} (unimoe param {rule.path})"
                )
        arrays = [state.tensors.pop(name) for name in rule.hf_names]
        params[rule.path] = core.to_ours(rule, arrays).reshape(shape)
    unset = sorted(set(shapes) - set(params))
    if unset:
        raise AssertionError(f"the released-Uni-MoE map leaves params unset: {unset[:5]}")
    return params


def _check_args(variant: str, experts: Any, beats: Any) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {VARIANTS}")
    if (variant == "8e") != (experts is not None):
        raise ValueError(
            "--experts (the Uni-MoE-8e-Experts folder) is needed by variant '8e' and only by it"
        )
    if (variant == "audio_4e") != (beats is not None):
        raise ValueError(
            "--beats (the BEATs .pt file) is needed by variant 'audio_4e' and only by it"
        )


def read_unimoe(
    variant: str,
    base: str | pathlib.Path,
    finetuned: str | pathlib.Path,
    *,
    clip: str | pathlib.Path,
    whisper: str | pathlib.Path,
    experts: str | pathlib.Path | None = None,
    beats: str | pathlib.Path | None = None,
    qformer_heads: int = BLIP2_QFORMER_HEADS,
) -> tuple[core.Converted, dict, list[str]]:
    """(the converted checkpoint in memory, its `config.model` dict, notes for the user)."""
    _check_args(variant, experts, beats)
    base, finetuned = pathlib.Path(base), pathlib.Path(finetuned)
    cfg, cfg_path = _config(variant, base, finetuned)
    if not (base / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(
            f"{base / TOKENIZER_FILE} is missing: the released base folders hold it"
        )
    aligner = read_side_file(finetuned, ALIGNER, required=True)
    gates = read_side_file(finetuned, GATES, required=True) if variant == "8e" else {}
    base_names = hf_io.tensor_files(base)
    layers = _moe_layers(variant, base_names, gates, str(finetuned / GATES if gates else base))
    paths = {"clip": clip, "whisper": whisper, "beats": beats}
    towers = _towers(variant, cfg, paths, aligner, finetuned)
    configs = {**towers.configs, "llm": _lm(variant, cfg, layers)}
    lm_dim = configs["llm"].dim
    configs["audio_conn"] = dataclasses.replace(configs["audio_conn"], out_dim=lm_dim)
    if variant == "audio_4e":
        enc = configs["sound"].encoder_embed_dim
        conn = _qformer_config(aligner, enc, lm_dim, qformer_heads, str(finetuned / ALIGNER))
    else:
        conn = configs["audio_conn"]
    rules = _rules(variant, configs, conn)
    state = State(frozenset(name for rule in rules for name in rule.hf_names))
    adapter = read_adapter(finetuned)
    _load(variant, state, base, finetuned, pathlib.Path(experts) if experts else None, cfg, adapter)
    dtypes = {name: str(value.dtype) for name, value in state.tensors.items()}
    where = lambda name: _where(name, variant, base, finetuned)  # noqa: E731
    params = {**_params(state, rules, _shapes(configs, conn), where), **towers.params}
    lora = LoRAConfig(alpha=adapter.alpha, dropout=adapter.dropout, dense_ffn=variant == "audio_4e")
    model = model_dict(configs["llm"], lora, configs, conn if variant == "audio_4e" else None)
    notes = [f"config: {cfg_path}", *state.notes, *towers.notes]
    return core.Converted(FAMILY, cfg, configs, params, {}, dtypes), model, notes


def from_unimoe(
    variant: str,
    base: str | pathlib.Path,
    finetuned: str | pathlib.Path,
    out: str | pathlib.Path,
    *,
    clip: str | pathlib.Path,
    whisper: str | pathlib.Path,
    experts: str | pathlib.Path | None = None,
    beats: str | pathlib.Path | None = None,
    qformer_heads: int = BLIP2_QFORMER_HEADS,
    store_dtype: str | None = None,
) -> tuple[core.Converted, list[str]]:
    """Converts a released Uni-MoE model into the directory `out` (new or empty); returns the
    checkpoint in memory and the notes (what was dropped and why). `qformer_heads`: the audio
    model's Q-Former heads, which no file records (the release: BLIP-2's 12). `store_dtype` (one
    of `STORE_DTYPES`; None: as read) casts every floating weight before it is written: float16
    is what the official evaluation loads, so `--protocol=official` answers the same from it,
    at half the disk and memory of float32 (8E: about 75 GB instead of 150)."""
    conv, model, notes = read_unimoe(
        variant, base, finetuned, clip=clip, whisper=whisper, experts=experts, beats=beats,
        qformer_heads=qformer_heads,
    )
    if store_dtype is not None:
        conv = dataclasses.replace(conv, params={
            k: v.astype(jnp.dtype(store_dtype)) if jnp.issubdtype(v.dtype, jnp.floating) else v
            for k, v in conv.params.items()
        })  # fmt: skip
    out = core.save(conv, out, source=str(pathlib.Path(finetuned).absolute()))
    meta_path = out / core.META_FILE
    meta = json.loads(meta_path.read_text())
    meta.update(variant=variant, model=model)
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(pathlib.Path(base) / TOKENIZER_FILE, out / TOKENIZER_FILE)
    if (pathlib.Path(base) / GENERATION_CONFIG).is_file():  # sampling defaults the official
        # eval.py inherits through Hugging Face `generate` (`unimoe.eval.protocol`)
        shutil.copyfile(pathlib.Path(base) / GENERATION_CONFIG, out / GENERATION_CONFIG)
    return conv, notes
