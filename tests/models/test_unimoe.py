import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.tiny_model import model_config
from unimoe.models.unimoe import UniMoE, splice


def test_splice_writes_kth_media_token_into_kth_slot():
    x_btd = jnp.zeros((2, 5, 1))
    is_slot_bt = jnp.array([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]], bool)
    media_bnd = jnp.array([[[10.0], [11.0]], [[20.0], [21.0]]])
    out = splice(x_btd, is_slot_bt, media_bnd)[..., 0]
    np.testing.assert_array_equal(out, [[0, 10, 11, 0, 0], [20, 0, 0, 0, 21]])


def _batch(rng: np.random.Generator, cfg, tokens_bt: np.ndarray) -> dict:
    b = tokens_bt.shape[0]
    return {
        'tokens': jnp.asarray(tokens_bt),
        'attn_mask': jnp.ones(tokens_bt.shape, bool),
        'image': jnp.asarray(rng.normal(size=(b, 12, 12, 3)), jnp.float32),
        'video': jnp.asarray(rng.normal(size=(b, 2, 12, 12, 3)), jnp.float32),
        'audio_mel': jnp.asarray(rng.normal(size=(b, 14, 8)), jnp.float32),
    }


def test_media_reach_only_positions_after_their_placeholders():
    cfg = model_config()
    model = UniMoE(cfg, rngs=nnx.Rngs(0))
    n_img = model.num_media_tokens['image']
    assert n_img == 9 and model.num_media_tokens['audio'] == 3
    # BOS, two text tokens, the image block, text; causal, so the image changes only later logits.
    tokens = np.array([[1, 7, 8] + [cfg.image_token_id] * n_img + [9, 10]])
    rng = np.random.default_rng(0)
    batch = _batch(rng, cfg, tokens)
    logits, aux = model(batch)
    assert logits.shape == (1, tokens.shape[1], cfg.llm.vocab_size)
    assert aux.expert_load.shape[0] == 0
    other = dict(batch, image=batch['image'] + 1.0)
    logits_other, _ = model(other)
    np.testing.assert_allclose(logits[:, :3], logits_other[:, :3], atol=1e-6)
    assert np.abs(np.asarray(logits[:, 3:] - logits_other[:, 3:])).max() > 1e-3
    # Video and audio are absent from the token stream, so changing them changes nothing.
    unused = dict(batch, video=batch['video'] * 3, audio_mel=batch['audio_mel'] - 2)
    np.testing.assert_allclose(model(unused)[0], logits, atol=1e-6)


def test_video_is_the_frame_mean_of_image_tokens():
    model = UniMoE(model_config(), rngs=nnx.Rngs(1))
    frames = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 12, 12, 3)), jnp.float32)
    per_frame = jnp.stack([model.encode_image(frames[:, f]) for f in range(3)], axis=1)
    np.testing.assert_allclose(model.encode_video(frames), per_frame.mean(axis=1), atol=1e-5)


def test_classify_heads_shapes():
    model = UniMoE(model_config(), rngs=nnx.Rngs(0))
    assert model.classify_image(jnp.zeros((2, 12, 12, 3))).shape == (2, 5)
    assert model.classify_audio(jnp.zeros((2, 14, 8))).shape == (2, 7)


def test_a_modality_no_example_has_is_not_encoded():
    model = UniMoE(model_config(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    batch = _batch(rng, model.cfg, np.array([[1, 7, 8, 9]]))
    batch.update(
        has_image=jnp.array([False]), has_video=jnp.array([True]), has_audio=jnp.array([False])
    )
    media = jax.jit(lambda b: model.encode_media(b))(batch)
    np.testing.assert_array_equal(media[model.cfg.image_token_id], 0.0)
    np.testing.assert_array_equal(media[model.cfg.audio_token_id], 0.0)
    np.testing.assert_allclose(
        media[model.cfg.video_token_id], model.encode_video(batch['video']), atol=1e-5
    )
    batch['has_image'] = jnp.array([True])
    np.testing.assert_allclose(
        model.encode_media(batch)[model.cfg.image_token_id],
        model.encode_image(batch['image']),
        atol=1e-5,
    )


def test_audio_chunks_are_encoded_one_by_one_and_concatenated():
    model = UniMoE(model_config(), rngs=nnx.Rngs(0))
    mel_bcam = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 14, 8)), jnp.float32)
    tokens = model.encode_audio(mel_bcam)
    queries = model.num_media_tokens['audio']
    assert tokens.shape == (2, 3 * queries, model.cfg.audio_conn.out_dim)
    for c in range(3):
        np.testing.assert_allclose(
            tokens[:, c * queries : (c + 1) * queries],
            model.encode_audio(mel_bcam[:, c]),
            atol=1e-5,
        )


def test_each_row_takes_its_audio_tokens_from_its_tower():
    """With a sound tower, a `has_sound` row's `<audio>` tokens are BEATs + Q-Former's of its
    chunks (in order), the other rows' Whisper's; a batch without sound rows encodes no sound."""
    model = UniMoE(model_config(sound=True), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    b, c, f = 3, 2, 13  # 13 frames: 3 patches of 4 frames, the last frame dropped
    batch = _batch(rng, model.cfg, np.zeros((b, 4), np.int32))
    frame_mask = np.zeros((b, c, f), bool)
    frame_mask[0, 1, 9:] = True  # row 0's second chunk is padded at its end
    batch.update(
        sound_fbank=jnp.asarray(rng.normal(size=(b, c, f, 8)), jnp.float32),
        sound_frame_mask=jnp.asarray(frame_mask),
        sound_chunk_mask=jnp.ones((b, c), bool),
        has_sound=jnp.array([True, False, True]),
    )
    tokens = model.encode_media(batch)[model.cfg.audio_token_id]
    queries = model.cfg.sound_conn.num_queries
    assert tokens.shape == (b, c * queries, model.cfg.llm.dim)
    sound = model.encode_sound(batch['sound_fbank'], batch['sound_frame_mask'])
    np.testing.assert_allclose(tokens[0], sound[0], atol=1e-6)
    np.testing.assert_allclose(tokens[2], sound[2], atol=1e-6)
    for k in range(c):  # chunk k's queries read chunk k alone
        alone = model.sound_conn(model.sound(batch['sound_fbank'][0, k:k + 1],
                                             batch['sound_frame_mask'][0, k:k + 1])[0])
        np.testing.assert_allclose(sound[0, k * queries:(k + 1) * queries], alone[0], atol=1e-5)
    speech = model.encode_audio(batch['audio_mel'])
    np.testing.assert_allclose(tokens[1, : speech.shape[1]], speech[1], atol=1e-6)
    assert np.abs(np.asarray(tokens[1] - tokens[0])).max() > 1e-3
    batch['has_sound'] = jnp.zeros((b,), bool)
    speech_only = model.encode_media(batch)[model.cfg.audio_token_id]
    np.testing.assert_allclose(speech_only[:, : speech.shape[1]], speech, atol=1e-6)
    assert not np.asarray(speech_only[:, speech.shape[1]:]).any()  # padding, never read
