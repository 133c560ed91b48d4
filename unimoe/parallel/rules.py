"""Which parameter has which logical axis names, and the shardings of whole state trees.

`PARAM_AXES`: parameter path regex -> one logical name per array dimension ('vocab', 'embed',
'mlp', 'heads', 'expert', 'conv', None = never sharded). Matched by path rather than stored as
flax sharding metadata on each `nnx.Param`: the expert banks live in `unimoe/moe`, whose modules
stay free of sharding code, and optimizer states (AdamW's moments mirror the parameter paths) get
the same names by the same lookup. Every parameter must match (`logical_axes` raises), so a new
module cannot silently go unsharded.

The rules that map logical names to mesh axes (`DEFAULT_RULES`, updated by
`config.sharding_rules`), the PartitionSpec they give one array, and the activation constraints
are `unimoe.nn.sharding`'s.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from unimoe.nn.sharding import DEFAULT_RULES, Logical, Rules, partition_spec

_ATTN_IN = r'(q|k|v|q_proj|k_proj|v_proj|query|key|value)'  # query/key/value: the Q-Former's
_ATTN_OUT = r'(o|out_proj)'
_FFN_IN = r'(gate|up|fc1)'
_FFN_OUT = r'(down|fc2)'
# (path regex, logical names): the first match wins. Paths are '/'-joined, e.g.
# 'llm/layers/0/ffn/experts/w_gate_edf'.
PARAM_AXES: tuple[tuple[str, Logical], ...] = (
    (r'(^|/)embed/embedding$', ('vocab', 'embed')),
    (r'(^|/)lm_head/kernel$', ('embed', 'vocab')),
    # Expert banks [E, in, out] and their batched LoRA adapters [E, in, r] / [E, r, out].
    (r'/experts/w_(gate|up)_edf$', ('expert', 'embed', 'mlp')),
    (r'/experts/w_down_efd$', ('expert', 'mlp', 'embed')),
    (r'/experts/lora_(gate|up)_a_edr$', ('expert', 'embed', None)),
    (r'/experts/lora_(gate|up)_b_erf$', ('expert', None, 'mlp')),
    (r'/experts/lora_down_a_efr$', ('expert', 'mlp', None)),
    (r'/experts/lora_down_b_erd$', ('expert', None, 'embed')),
    # Routers and gates: few columns, kept whole so routing needs no collective.
    (r'/(router|shared_gate)/kernel$', ('embed', None)),
    (r'/(router|shared_gate)/bias$', (None,)),
    # Attention and FFN projections (LM, shared experts, ViT, Whisper, connectors) and LoRA.
    (rf'/{_ATTN_IN}/kernel$', ('embed', 'heads')),
    (rf'/{_ATTN_IN}/bias$', ('heads',)),
    (rf'/{_ATTN_IN}/lora_a$', ('embed', None)),
    (rf'/{_ATTN_IN}/lora_b$', (None, 'heads')),
    (rf'/{_ATTN_OUT}/kernel$', ('heads', 'embed')),
    (r'/(attention|crossattention)/output/dense/kernel$', ('heads', 'embed')),  # Q-Former
    (r'/intermediate_query/dense/kernel$', ('embed', 'mlp')),
    (r'/output_query/dense/kernel$', ('mlp', 'embed')),
    (rf'/{_ATTN_OUT}/lora_a$', ('heads', None)),
    (rf'/{_ATTN_OUT}/lora_b$', (None, 'embed')),
    (rf'/{_FFN_IN}/kernel$', ('embed', 'mlp')),
    (rf'/{_FFN_IN}/bias$', ('mlp',)),
    (rf'/{_FFN_IN}/lora_a$', ('embed', None)),
    (rf'/{_FFN_IN}/lora_b$', (None, 'mlp')),
    (rf'/{_FFN_OUT}/kernel$', ('mlp', 'embed')),
    (rf'/{_FFN_OUT}/lora_a$', ('mlp', None)),
    (rf'/{_FFN_OUT}/lora_b$', (None, 'embed')),
    # Encoder stems, position tables, learned queries, probe heads.
    (r'/patch_embedding/kernel$', (None, None, None, 'embed')),
    (r'/conv\d/kernel$', ('conv', None, 'embed')),
    (r'/(position_embedding|embed_positions)/embedding$', (None, 'embed')),
    (r'(^|/)sound_conn/query_tokens$', (None, None, 'embed')),  # [1, Q, width], as BLIP-2 keeps it
    (r'/query_tokens$', (None, 'embed')),
    (r'/(post_extract_proj|projector)/kernel$', (None, 'embed')),
    # BEATs' relative positions and their gates, its convolutional positions: small, whole.
    (r'/relative_attention_bias/embedding$', (None, None)),
    (r'/grep_linear/kernel$', (None, None)),
    (r'/grep_a$', (None, None, None, None)),
    (r'/pos_conv/weight_[gv]$', (None, None, None)),
    (r'(^|/)(image|audio|sound)_head/kernel$', ('embed', None)),
    # Norm scales and the remaining biases / vectors: small, replicated.
    (r'(^|/)[^/]+$', None),
)
_COMPILED = tuple((re.compile(pattern), names) for pattern, names in PARAM_AXES)


# Scanned decoder layers (`models.layer_stack`): a leading layer axis, never sharded (each
# device runs every layer), before the axes of the unrolled parameter.
_STACKED = re.compile(r'(^|/)blocks/layers/')


def logical_axes(path: str, ndim: int) -> Logical:
    """The logical names of parameter `path` (one per dimension); raises if none fits."""
    if _STACKED.search(path):
        return (None, *logical_axes(_STACKED.sub(r'\1layers/', path), ndim - 1))
    for pattern, names in _COMPILED:
        if pattern.search(path):
            if names is None:
                if ndim > 1:
                    break  # the catch-all is for vectors only
                return (None,) * ndim
            if len(names) != ndim:
                raise ValueError(
                    f"parameter {path!r} has {ndim} dimensions, but its sharding rule "
                    f"{pattern.pattern!r} names {len(names)}: {names}"
                )
            return names
    raise ValueError(
        f"parameter {path!r} ({ndim}-d) matches no entry of unimoe.parallel.rules.PARAM_AXES: "
        "add one naming its logical axes"
    )


def parse_rules(config_rules: Mapping[str, Any] | None) -> dict[str, tuple[str, ...]]:
    """`DEFAULT_RULES` updated by `config.sharding_rules` ({logical: mesh axis | [axes] | None})."""
    rules = dict(DEFAULT_RULES)
    for name, axes in dict(config_rules or {}).items():
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        rules[name] = tuple(axes)
    return rules


def key_path_str(key_path: Sequence[Any]) -> str:
    """'/'-joined dict keys of a pytree key path: the parameter path inside optimizer states and
    `nnx.State`s ('mu', '.value', list indices of optax chains are not dict keys)."""
    keys = [k.key for k in key_path if isinstance(k, jax.tree_util.DictKey)]
    return '/'.join(str(k) for k in keys)


def tree_specs(tree: Any, mesh_shape: Mapping[str, int], rules: Rules) -> Any:
    """A PartitionSpec per array leaf of `tree` (params, optimizer state, model state), by path.

    Leaves whose path is no parameter's (step counts, RNG keys, router biases) are replicated.
    """

    def spec(key_path: Sequence[Any], leaf: Any) -> PartitionSpec:
        path, ndim = key_path_str(key_path), len(leaf.shape)
        if ndim == 0 or not path:
            return PartitionSpec()
        try:
            names = logical_axes(path, ndim)
        except ValueError:
            if _is_param_path(key_path):
                raise
            names = (None,) * ndim
        return partition_spec(names, leaf.shape, mesh_shape, rules)

    return jax.tree_util.tree_map_with_path(spec, tree)


def tree_shardings(tree: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
    """`tree_specs` as NamedShardings on `mesh`."""
    specs = tree_specs(tree, dict(mesh.shape), rules)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def shard_bytes(tree: Any, mesh_shape: Mapping[str, int], rules: Rules) -> int:
    """Bytes of `tree`'s arrays that one device holds under the rules on a mesh of `mesh_shape`
    (a planned pod mesh needs no devices)."""
    specs = tree_specs(tree, mesh_shape, rules)
    total = 0
    for leaf, spec in zip(
        jax.tree.leaves(tree),
        jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)),
        strict=True,
    ):
        elements = 1
        for i, size in enumerate(leaf.shape):
            axes = spec[i] if i < len(spec) else None
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            split = 1
            for axis in axes:
                split *= mesh_shape[axis]
            elements *= size // split
        total += elements * jax.numpy.dtype(leaf.dtype).itemsize
    return total


def _is_param_path(key_path: Sequence[Any]) -> bool:
    # Non-parameter state (RNG streams, router biases) has these names on its path.
    return not any(
        isinstance(k, jax.tree_util.DictKey) and k.key in ('rngs', 'router_bias', 'count', 'key')
        for k in key_path
    )
