"""Weight name maps into the Q-Former connector (`unimoe.models.qformer.QFormerConnector`).

Two namings of the same tensors (query tokens, a `Blip2QFormerModel`, a linear projector), both
mapped onto the connector's parameter paths under `root` ('sound_conn', where `UniMoE` mounts it):

- Hugging Face BLIP-2 (`from_hf`): `Blip2Model` / `Blip2ForConditionalGeneration` names, i.e.
  `Blip2QFormerModel`'s own (`layernorm.*`, `encoder.layer.<i>.*`) under `prefix` ('qformer.'),
  `query_tokens` [1, Q, width] and `language_projection.{weight,bias}`.
- Uni-MoE-audio's `mm_audio_aligner.bin` (`from_uni_moe`): `train.py` saves the named parameters
  of `LlavaLlamaForCausalLM` that contain 'mm_audio_aligner', i.e.
  `model.mm_audio_aligner.{qformer.qformer.<Blip2QFormerModel name>, projector.{weight,bias},
  query_tokens}` (the aligner's `qformer` attribute is a wrapper whose `qformer` is the HF model).
  As Uni-MoE's loader (`get_w` in `llava_arch.py`) does, everything up to and including the first
  'mm_audio_aligner.' is dropped, so other prefixes of the same module load too.

Both are strict: a tensor no rule reads, one read twice, a missing one or one of the wrong shape
is a `ValueError` naming the tensor, its source and the connector parameter.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from unimoe.convert.core import param_shapes
from unimoe.convert.families import Rule
from unimoe.models.abstract import abstract_module
from unimoe.models.qformer import QFormerConnector

ROOT = "sound_conn"
UNI_MOE_KEYWORD = "mm_audio_aligner."


def _linear(path: str, name: str) -> list[Rule]:
    return [
        Rule(f"{path}/kernel", (f"{name}.weight",), "linear"),
        Rule(f"{path}/bias", (f"{name}.bias",), "copy"),
    ]


def _layer_norm(path: str, name: str) -> list[Rule]:
    return [
        Rule(f"{path}/scale", (f"{name}.weight",), "copy"),
        Rule(f"{path}/bias", (f"{name}.bias",), "copy"),
    ]


def _attention(path: str, name: str) -> list[Rule]:
    rules = []
    for proj in ("query", "key", "value"):
        rules += _linear(f"{path}/attention/{proj}", f"{name}.attention.{proj}")
    rules += _linear(f"{path}/output/dense", f"{name}.output.dense")
    return rules + _layer_norm(f"{path}/output/LayerNorm", f"{name}.output.LayerNorm")


def connector_rules(
    cfg: QFormerConnector.Config, *, qformer: str, query_tokens: str, projector: str, root: str
) -> list[Rule]:
    """Rules from tensors named `{qformer}<Blip2QFormerModel name>`, `query_tokens` and
    `{projector}.{weight,bias}` to the connector's params under `root`."""
    rules = [Rule(f"{root}/query_tokens", (query_tokens,), "copy")]
    rules += _linear(f"{root}/projector", projector)
    rules += _layer_norm(f"{root}/layernorm", f"{qformer}layernorm")
    for i in range(cfg.depth):
        path, name = f"{root}/encoder/layer/{i}", f"{qformer}encoder.layer.{i}"
        rules += _attention(f"{path}/attention", f"{name}.attention")
        if i % cfg.cross_attention_every == 0:  # the layers HF gives cross-attention
            rules += _attention(f"{path}/crossattention", f"{name}.crossattention")
        rules += _linear(f"{path}/intermediate_query/dense", f"{name}.intermediate_query.dense")
        rules += _linear(f"{path}/output_query/dense", f"{name}.output_query.dense")
        rules += _layer_norm(f"{path}/output_query/LayerNorm", f"{name}.output_query.LayerNorm")
    return rules


def hf_rules(
    cfg: QFormerConnector.Config, *, prefix: str = "qformer.", root: str = ROOT
) -> list[Rule]:
    return connector_rules(
        cfg,
        qformer=prefix,
        query_tokens="query_tokens",
        projector="language_projection",
        root=root,
    )


def uni_moe_rules(cfg: QFormerConnector.Config, *, root: str = ROOT) -> list[Rule]:
    """Rules on the names `strip_uni_moe` leaves (the `AudioAligner`'s own state-dict names)."""
    return connector_rules(
        cfg,
        qformer="qformer.qformer.",
        query_tokens="query_tokens",
        projector="projector",
        root=root,
    )


def _want_shape(rule: Rule, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[::-1] if rule.kind == "linear" else shape


def apply_rules(
    rules: list[Rule],
    tensors: Mapping[str, np.ndarray],
    cfg: QFormerConnector.Config,
    *,
    root: str,
    source: str,
) -> dict[str, np.ndarray]:
    """{connector param path: array} (stored dtype; linears transposed to [in, out]); every
    tensor of `tensors` must be read exactly once and every param of the connector written."""
    module = abstract_module(lambda rngs: QFormerConnector(cfg, rngs=rngs))
    shapes = param_shapes({root: module})
    params: dict[str, np.ndarray] = {}
    read: set[str] = set()
    for rule in rules:
        (name,) = rule.hf_names
        if name not in tensors:
            raise ValueError(
                f"{source}: tensor {name!r} is missing (it holds connector param {rule.path})"
            )
        if name in read:
            raise ValueError(f"{source}: tensor {name!r} is read twice (map error at {rule.path})")
        got, want = tuple(tensors[name].shape), _want_shape(rule, shapes[rule.path])
        if got != want:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {got}, but the connector config implies "
                f"{want} (param {rule.path}); check QFormerConnector.Config's num_queries, "
                "width, mlp_dim, enc_dim and out_dim"
            )
        value = np.asarray(tensors[name])
        params[rule.path] = np.ascontiguousarray(value.T if rule.kind == "linear" else value)
        read.add(name)
    extra = sorted(set(tensors) - read)
    if extra:
        raise ValueError(
            f"{source}: tensor {extra[0]!r} (and {len(extra) - 1} more) has no place in the "
            f"Q-Former connector (depth {cfg.depth}, cross-attention every "
            f"{cfg.cross_attention_every} layers; BLIP-2's text FFN `intermediate` / `output` is "
            "unused by queries): drop it or fix the config"
        )
    unset = sorted(set(shapes) - set(params))
    if unset:
        raise AssertionError(f"Q-Former name map leaves connector params unset: {unset[:5]}")
    return params


def from_hf(
    tensors: Mapping[str, np.ndarray],
    cfg: QFormerConnector.Config,
    *,
    prefix: str = "qformer.",
    root: str = ROOT,
    source: str = "BLIP-2 state dict",
) -> dict[str, np.ndarray]:
    """Connector params from BLIP-2 names (see the module docstring); `prefix` is where the
    `Blip2QFormerModel` names start ('' for a bare Q-Former state dict beside `query_tokens` and
    `language_projection.*`)."""
    rules = hf_rules(cfg, prefix=prefix, root=root)
    return apply_rules(rules, tensors, cfg, root=root, source=source)


def strip_uni_moe(tensors: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """The names after the first 'mm_audio_aligner.', as Uni-MoE's `get_w` loads them."""
    stripped: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for name, value in tensors.items():
        _, found, rest = name.partition(UNI_MOE_KEYWORD)
        if not found:
            raise ValueError(
                f"{source}: tensor {name!r} is not under {UNI_MOE_KEYWORD!r}; an "
                "mm_audio_aligner.bin holds only the audio aligner (model.mm_audio_aligner.*)"
            )
        if rest in stripped:
            raise ValueError(
                f"{source}: tensors {origin[rest]!r} and {name!r} are both the aligner's {rest!r}"
            )
        stripped[rest], origin[rest] = value, name
    return stripped


def from_uni_moe(
    tensors: Mapping[str, np.ndarray],
    cfg: QFormerConnector.Config,
    *,
    root: str = ROOT,
    source: str = "mm_audio_aligner.bin",
) -> dict[str, np.ndarray]:
    """Connector params from Uni-MoE-audio's `mm_audio_aligner.bin` names (a linear
    `audio_projector_type`, the released one)."""
    stripped = strip_uni_moe(tensors, source)
    # Errors name the tensors as the aligner calls them, after the stripped prefix.
    source = f"{source} (names after {UNI_MOE_KEYWORD!r})"
    return apply_rules(uni_moe_rules(cfg, root=root), stripped, cfg, root=root, source=source)
