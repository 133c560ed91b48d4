import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.tiny_model import model_config
from unimoe import checkpoint, factory
from unimoe.models.unimoe import UniMoE


def _flat(model: nnx.Module) -> dict[str, np.ndarray]:
    return {
        checkpoint.path_str(p): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def test_trainable_filter_selects_named_parts_only():
    model = UniMoE(model_config(moe=True, lora_rank=2), rngs=nnx.Rngs(0))
    _, trainable, _ = nnx.split(model, factory.trainable_filter('lora+router+connectors'), ...)
    paths = [checkpoint.path_str(p) for p, _ in nnx.to_flat_state(trainable)]
    assert paths and all(
        'lora' in p or '/router/' in p or p.startswith(('image_proj', 'audio_conn')) for p in paths
    )
    assert any('/router/' in p for p in paths) and any('lora' in p for p in paths)
    assert not any('w_gate_edf' in p or p.startswith(('vision', 'llm/embed')) for p in paths)
    _, ffn, _ = nnx.split(
        UniMoE(model_config(), rngs=nnx.Rngs(0)), factory.trainable_filter('ffn'), ...
    )
    ffn_paths = {checkpoint.path_str(p) for p, _ in nnx.to_flat_state(ffn)}
    assert ffn_paths == {
        f'llm/layers/{i}/ffn/{w}/kernel' for i in range(2) for w in ('gate', 'up', 'down')
    }


def test_trainable_filter_rejects_unknown_part():
    with pytest.raises(ValueError, match='unknown parts'):
        factory.trainable_filter('connectors+experts')


def test_every_parameter_is_in_exactly_one_part():
    """PARTS is a partition of the parameter tree (MoE, LoRA, both audio towers and their
    connectors), and `trains='llm'` selects exactly the LM's two parts."""
    paths = _flat(UniMoE(model_config(moe=True, lora_rank=2, sound=True), rngs=nnx.Rngs(0)))
    patterns = {name: re.compile(regex) for name, regex in factory.PARTS.items()}
    for path in paths:
        owners = [name for name, pattern in patterns.items() if pattern.search(path)]
        assert owners == [factory.part_of(path)], path
    assert {factory.part_of(p) for p in paths} == set(factory.PARTS)
    llm = {p for p in paths if factory.part_of(p) in factory.TRAINABLE_PARTS['llm']}
    assert llm == {p for p in paths if p.startswith('llm/')}
    with pytest.raises(ValueError, match="'proj/kernel' is in no part"):
        factory.part_of('proj/kernel')


def test_flat_params_strips_variable_value_level():
    raw = {'llm': {'layers': {'0': {'ffn': {'gate': {'kernel': {'value': np.ones((2, 3))}}}}}}}
    assert list(checkpoint.flat_params(raw)) == ['llm/layers/0/ffn/gate/kernel']


def test_upcycling_puts_each_dense_ffn_into_its_expert_slot():
    dense = [UniMoE(model_config(), rngs=nnx.Rngs(seed)) for seed in (1, 2, 3)]
    moe = UniMoE(model_config(moe=True, lora_rank=2), rngs=nnx.Rngs(0))
    sources = [(f's2_{i}', _flat(m)) for i, m in enumerate(dense)]
    origin = factory.load_params(moe, [sources[0]], sources)
    flat = _flat(moe)
    for layer in range(2):
        for e, (_, src) in enumerate(sources):
            prefix = f'llm/layers/{layer}/ffn/'
            np.testing.assert_array_equal(
                flat[prefix + 'experts/w_gate_edf'][e], src[prefix + 'gate/kernel']
            )
            np.testing.assert_array_equal(
                flat[prefix + 'experts/w_up_edf'][e], src[prefix + 'up/kernel']
            )
            np.testing.assert_array_equal(
                flat[prefix + 'experts/w_down_efd'][e], src[prefix + 'down/kernel']
            )
    np.testing.assert_array_equal(flat['llm/embed/embedding'], sources[0][1]['llm/embed/embedding'])
    assert origin['llm/layers/0/ffn/experts/w_up_edf'] == 's2_0+s2_1+s2_2'
    assert not any('router' in p or 'lora' in p for p in origin)


def test_moe_upcycled_from_one_dense_model_computes_the_same_function():
    # All experts equal and LoRA B = 0 at init: any routing mixes identical outputs (weights sum
    # to 1), so the upcycled stage-3 model starts exactly where its stage-2 source ended.
    dense = UniMoE(model_config(), rngs=nnx.Rngs(4))
    moe = UniMoE(model_config(moe=True, lora_rank=2), rngs=nnx.Rngs(5))
    src = ('s2', _flat(dense))
    factory.load_params(moe, [src], [src] * 3)
    rng = np.random.default_rng(0)
    batch = {
        'tokens': jnp.asarray(rng.integers(6, 41, size=(2, 9))),
        'attn_mask': jnp.ones((2, 9), bool),
    }
    np.testing.assert_allclose(moe(batch)[0], dense(batch)[0], atol=2e-5)


def test_load_params_rejects_shape_mismatch():
    model = UniMoE(model_config(), rngs=nnx.Rngs(0))
    bad = {'llm/embed/embedding': np.zeros((3, 3), np.float32)}
    with pytest.raises(ValueError, match='llm/embed/embedding'):
        factory.load_params(model, [('s0', bad)])


def test_load_params_extends_a_shorter_vocabulary_and_keeps_the_appended_rows():
    # The model's vocabulary (41) = a pretrained LM's 38 + 3 appended placeholder tokens.
    model = UniMoE(model_config(), rngs=nnx.Rngs(0))
    init_embed = np.array(model.llm.embed.embedding[...])
    init_head = np.array(model.llm.lm_head.kernel[...])
    rng = np.random.default_rng(0)
    source = {
        'llm/embed/embedding': rng.normal(size=(38, 24)).astype(np.float32),
        'llm/lm_head/kernel': rng.normal(size=(24, 38)).astype(np.float32),
    }
    origin = factory.load_params(model, [('vicuna', source)])
    assert origin == {key: 'vicuna' for key in source}
    embed = np.asarray(model.llm.embed.embedding[...])
    head = np.asarray(model.llm.lm_head.kernel[...])
    np.testing.assert_array_equal(embed[:38], source['llm/embed/embedding'])
    np.testing.assert_array_equal(embed[38:], init_embed[38:])
    np.testing.assert_array_equal(head[:, :38], source['llm/lm_head/kernel'])
    np.testing.assert_array_equal(head[:, 38:], init_head[:, 38:])
    # Only the vocabulary axis may be shorter, and never longer.
    for bad in (np.zeros((38, 23), np.float32), np.zeros((45, 24), np.float32)):
        with pytest.raises(ValueError, match='llm/embed/embedding'):
            factory.load_params(model, [('vicuna', {'llm/embed/embedding': bad})])
