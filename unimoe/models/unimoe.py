"""The multimodal model: encoders -> connectors -> placeholder splicing -> decoder LM (Uni-MoE).

Audio has one or two towers: Whisper + its decoder connector (`audio`, `audio_conn`) for speech,
and, when `config.model.sound` is set, BEATs + a BLIP-2 Q-Former (`sound`, `sound_conn`) for the
audio the data routes to it (`config.data.sound_tasks` / `sound_sources`, Uni-MoE-audio). Both
fill the `<audio>` placeholders; a row's audio takes one tower (`has_sound`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from unimoe import config as config_lib
from unimoe.models import audio, beats, connectors, llm, qformer, vision
from unimoe.moe import config as moe_config
from unimoe.moe.aux_stats import MoEAux
from unimoe.nn import lora


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """`config.model`, typed: what the models of every stage share. One stage's `UniMoEConfig`
    adds the stage's MoE and LoRA switches and the tokenizer's vocabulary and media ids
    (`UniMoEConfig.for_stage`).

    llm: the LM with `vocab_size` 0 (the tokenizer's), no MoE layers and LoRA rank 0;
    moe_layers: the layers a MoE stage makes MoE (`model.moe_layers`, resolved).
    """

    llm: llm.LLMConfig
    moe_layers: tuple[int, ...]
    vision: vision.ViTEncoder.Config
    audio: audio.AudioEncoder.Config
    audio_conn: connectors.QueryConnector.Config
    sound: beats.BEATs.Config | None = None
    sound_conn: qformer.QFormerConnector.Config | None = None

    @classmethod
    def from_dict(cls, model: Mapping[str, Any]) -> ModelSpec:
        """Raises ValueError naming `config.model.<section>` (an unknown field, a bad value)."""
        known = {
            'llm', 'moe_layers', 'moe', 'lora', 'vision', 'audio', 'audio_conn', 'sound',
            'sound_conn',
        }  # fmt: skip
        unknown = sorted(set(model) - known)
        if unknown:
            raise ValueError(f"config.model has unknown fields {unknown}; known: {sorted(known)}")
        moe = _section('moe', moe_config.MoEConfig, **model.get('moe', {}))
        lora_cfg = _section('lora', lora.LoRAConfig, **model.get('lora', {}))
        llm_cfg = _section(
            'llm', llm.LLMConfig, **model['llm'], vocab_size=0, moe=moe, lora=lora_cfg
        )
        audio_cfg = _section('audio', audio.AudioEncoder.Config, **model['audio'])
        return cls(
            llm=llm_cfg,
            moe_layers=_section(
                'moe_layers', llm.resolve_moe_layers, model['moe_layers'], llm_cfg.num_layers
            ),
            vision=_section('vision', vision.ViTEncoder.Config, **model['vision']),
            audio=audio_cfg,
            audio_conn=_section(
                'audio_conn',
                connectors.QueryConnector.Config,
                **model['audio_conn'],
                enc_dim=audio_cfg.width,
                out_dim=llm_cfg.dim,
            ),
            **_sound_sections(model, llm_cfg.dim),
        )

    def stage_llm(self, *, vocab_size: int, moe: bool, lora_rank: int) -> llm.LLMConfig:
        """The LM of one stage: the tokenizer's vocabulary, MoE in `moe_layers` when `moe`, LoRA
        of `lora_rank` (0: none)."""
        return dataclasses.replace(
            self.llm,
            vocab_size=vocab_size,
            moe_layers=self.moe_layers if moe else (),
            lora=dataclasses.replace(self.llm.lora, rank=lora_rank),
        )

    @property
    def num_media_tokens(self) -> dict[str, int]:
        """LM positions one image, video or audio clip (sound: chunk) fills
        (`UniMoE.num_media_tokens`)."""
        patches = (self.vision.image_size // self.vision.patch_size) ** 2
        tokens = {'image': patches, 'video': patches, 'audio': self.audio_conn.num_queries}
        if self.sound_conn is not None:
            tokens['sound'] = self.sound_conn.num_queries  # per chunk, as audio's
        return tokens


def _sound_sections(model: Mapping[str, Any], lm_dim: int) -> dict[str, Any]:
    """`config.model.sound` / `sound_conn` typed, or nothing: both or neither are set."""
    if not model.get('sound') and not model.get('sound_conn'):
        return {}
    for name in ('sound', 'sound_conn'):
        if not model.get(name):
            raise ValueError(
                f"config.model.{name} is empty but the other sound section is set: the sound "
                "tower is BEATs (sound) and its Q-Former (sound_conn) together"
            )
    sound = _section('sound', beats.BEATs.Config, **model['sound'])
    conn = _section(
        'sound_conn',
        qformer.QFormerConnector.Config,
        **model['sound_conn'],
        enc_dim=sound.encoder_embed_dim,
        out_dim=lm_dim,
    )
    return {'sound': sound, 'sound_conn': conn}


def _section(name: str, build: Any, *args: Any, **kwargs: Any) -> Any:
    """`build(*args, **kwargs)`, its errors naming `config.model.<name>`."""
    with config_lib.errors_at(f'config.model.{name}', build.__name__):
        return build(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class UniMoEConfig:
    """Whole-model config: one stage's model (`for_stage`)."""

    llm: llm.LLMConfig
    vision: vision.ViTEncoder.Config
    audio: audio.AudioEncoder.Config
    image_proj: connectors.MLPProjector.Config
    audio_conn: connectors.QueryConnector.Config
    image_token_id: int
    video_token_id: int
    audio_token_id: int
    num_image_labels: int
    num_audio_labels: int
    sound: beats.BEATs.Config | None = None
    sound_conn: qformer.QFormerConnector.Config | None = None

    @classmethod
    def for_stage(
        cls,
        spec: ModelSpec,
        *,
        vocab_size: int,
        token_ids: Mapping[str, int],
        num_labels: tuple[int, int],
        moe: bool,
        lora_rank: int,
    ) -> UniMoEConfig:
        """The model of one stage of an experiment whose `config.model` is `spec`.

        `moe` turns the layers `spec.moe_layers` names into MoE layers; `lora_rank` > 0 adds LoRA
        (with `spec`'s alpha and dropout) to attention and experts.
        """
        llm_config = spec.stage_llm(vocab_size=vocab_size, moe=moe, lora_rank=lora_rank)
        return cls(
            llm=llm_config,
            vision=spec.vision,
            audio=spec.audio,
            image_proj=connectors.MLPProjector.Config(
                in_dim=spec.vision.width, out_dim=llm_config.dim
            ),
            audio_conn=spec.audio_conn,
            **token_ids,
            num_image_labels=num_labels[0],
            num_audio_labels=num_labels[1],
            sound=spec.sound,
            sound_conn=spec.sound_conn,
        )


class UniMoE(nnx.Module):
    """Image/video via ViT + MLP projector, speech/audio via the audio encoder + query connector.

    Placeholder ids in `tokens` were expanded by the tokenizer to exactly as many copies as the
    connector emits tokens, so splicing is a static-shape gather (the k-th placeholder of a row takes
    the k-th media token of that row).
    """

    def __init__(self, cfg: UniMoEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.llm = llm.DecoderLM(cfg.llm, rngs=rngs)
        self.vision = vision.ViTEncoder(cfg.vision, rngs=rngs)
        self.audio = audio.AudioEncoder(cfg.audio, rngs=rngs)
        self.image_proj = connectors.MLPProjector(cfg.image_proj, rngs=rngs)
        self.audio_conn = connectors.QueryConnector(cfg.audio_conn, rngs=rngs)
        # Stage-0 probe heads: they give the stand-in encoders a supervised pretraining task.
        self.image_head = nnx.Linear(cfg.vision.width, cfg.num_image_labels, rngs=rngs)
        self.audio_head = nnx.Linear(cfg.audio.width, cfg.num_audio_labels, rngs=rngs)
        if cfg.sound is None:
            self.sound = self.sound_conn = self.sound_head = None
        else:
            self.sound = beats.BEATs(cfg.sound, rngs=rngs)
            self.sound_conn = qformer.QFormerConnector(cfg.sound_conn, rngs=rngs)
            # The sound tower's stage-0 probe: the same labels as the audio one.
            self.sound_head = nnx.Linear(
                cfg.sound.encoder_embed_dim, cfg.num_audio_labels, rngs=rngs
            )

    @property
    def num_media_tokens(self) -> dict[str, int]:
        tokens = {
            'image': self.vision.num_patches,
            'video': self.vision.num_patches,
            'audio': self.cfg.audio_conn.num_queries,
        }
        if self.sound_conn is not None:
            tokens['sound'] = self.cfg.sound_conn.num_queries
        return tokens

    def encode_image(self, image_bhwc: jax.Array) -> jax.Array:
        return self.image_proj(self.vision(image_bhwc))

    def encode_video(self, video_bfhwc: jax.Array) -> jax.Array:
        # Uni-MoE: every frame through the image path, then the mean over frames (no temporal tokens).
        b, f = video_bfhwc.shape[:2]
        frames = self.encode_image(video_bfhwc.reshape(b * f, *video_bfhwc.shape[2:]))
        return frames.reshape(b, f, *frames.shape[1:]).mean(axis=1)

    def encode_audio(self, mel: jax.Array) -> jax.Array:
        """One clip per row [B, A, M] -> [B, Q, D], or C chunks per row [B, C, A, M] -> [B, C*Q, D].

        Chunks (30-s windows of long files, `data.json_pipeline`) are encoded one by one and their
        query tokens concatenated in order (Uni-MoE §2.3); the tokenizer expands a file's
        `<audio>` to Q tokens per chunk, so the k-th placeholder reads the k-th token. Rows with
        fewer chunks have fewer placeholders, and their padding chunks are never read.
        """
        if mel.ndim == 3:
            return self.audio_conn(self.audio(mel))
        b, c = mel.shape[:2]
        tokens = self.audio_conn(self.audio(mel.reshape(b * c, *mel.shape[2:])))
        return tokens.reshape(b, c * tokens.shape[1], tokens.shape[2])

    def encode_sound(self, fbank_bcfm: jax.Array, frame_mask_bcf: jax.Array) -> jax.Array:
        """C chunks per row [B, C, F, M] (BEATs features, True = padded frame) -> [B, C*Q, D].

        As Uni-MoE-audio: BEATs masks the padded frames of a chunk, the Q-Former then reads every
        BEATs output (its encoder mask is all ones), each chunk's queries in order."""
        b, c = fbank_bcfm.shape[:2]
        features_bcsd, _ = self._sound_features(fbank_bcfm, frame_mask_bcf)
        tokens = self.sound_conn(features_bcsd.reshape(b * c, *features_bcsd.shape[2:]))
        return tokens.reshape(b, c * tokens.shape[1], tokens.shape[2])

    def _sound_features(
        self, fbank_bcfm: jax.Array, frame_mask_bcf: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """BEATs on each chunk: features [B, C, S, D] and their padding mask [B, C, S]."""
        b, c = fbank_bcfm.shape[:2]
        features_xsd, padding_xs = self.sound(
            fbank_bcfm.reshape(b * c, *fbank_bcfm.shape[2:]), frame_mask_bcf.reshape(b * c, -1)
        )
        return (
            features_xsd.reshape(b, c, *features_xsd.shape[1:]),
            padding_xs.reshape(b, c, -1),
        )

    def encode_media(self, batch: Mapping[str, jax.Array]) -> dict[int, jax.Array]:
        """{placeholder id: media tokens [B, N, D]} for each modality present in the batch.

        A modality that no example of the batch has (`has_<name>` all False) is not encoded at all:
        single-modality stages would otherwise pay for every encoder on zero-filled inputs.
        """
        encoders = (
            ('image', 'has_image', self.cfg.image_token_id, self.encode_image),
            ('video', 'has_video', self.cfg.video_token_id, self.encode_video),
            ('audio_mel', 'has_audio', self.cfg.audio_token_id, self.encode_audio),
        )
        media = {}
        for key, has_key, token_id, encode in encoders:
            if key not in batch:
                continue
            if has_key not in batch:
                media[token_id] = encode(batch[key])
                continue
            shape = jax.eval_shape(encode, batch[key])
            media[token_id] = jax.lax.cond(
                batch[has_key].any(),
                encode,
                lambda x, shape=shape: jnp.zeros(shape.shape, shape.dtype),
                batch[key],
            )
        if self.sound is not None and 'sound_fbank' in batch:
            audio_id = self.cfg.audio_token_id
            media[audio_id] = self._with_sound(media.get(audio_id), batch)
        return media

    def _with_sound(
        self, speech_bnd: jax.Array | None, batch: Mapping[str, jax.Array]
    ) -> jax.Array:
        """The `<audio>` tokens of each row from its tower: the sound tower's where `has_sound`,
        Whisper's elsewhere (the shorter padded to the longer; padding is never read)."""
        fbank_bcfm = batch['sound_fbank']
        b, c = fbank_bcfm.shape[:2]
        shape = (b, c * self.cfg.sound_conn.num_queries, self.cfg.sound_conn.out_dim)
        # nnx.cond, not lax.cond: the Q-Former's dropout advances its RNG state in one branch.
        sound_bnd = nnx.cond(
            batch['has_sound'].any(),
            lambda model, *args: model.encode_sound(*args),
            lambda model, *args: jnp.zeros(shape, fbank_bcfm.dtype),
            self,
            fbank_bcfm,
            batch['sound_frame_mask'],
        )
        if speech_bnd is None:
            return sound_bnd
        length = max(speech_bnd.shape[1], sound_bnd.shape[1])

        def padded(x_bnd: jax.Array) -> jax.Array:
            return jnp.pad(x_bnd, ((0, 0), (0, length - x_bnd.shape[1]), (0, 0)))

        has_sound_b11 = batch['has_sound'][:, None, None]
        speech_bnd = speech_bnd.astype(sound_bnd.dtype)
        return jnp.where(has_sound_b11, padded(sound_bnd), padded(speech_bnd))

    def embed(self, tokens_bt: jax.Array, media: Mapping[int, jax.Array]) -> jax.Array:
        """Text embeddings with every placeholder position replaced by its media token."""
        x_btd = self.llm.embed_tokens(tokens_bt)
        for token_id, media_bnd in media.items():
            x_btd = splice(x_btd, tokens_bt == token_id, media_bnd.astype(x_btd.dtype))
        return x_btd

    def __call__(
        self, batch: Mapping[str, jax.Array], *, token_weight_bt: jax.Array | None = None
    ) -> tuple[jax.Array, MoEAux]:
        tokens_bt = batch['tokens']
        x_btd = self.embed(tokens_bt, self.encode_media(batch))
        return self.llm(x_btd, batch['attn_mask'], token_weight_bt=token_weight_bt)

    def classify_image(self, image_bhwc: jax.Array) -> jax.Array:
        return self.image_head(self.vision.pooled(image_bhwc))

    def classify_audio(self, mel_bam: jax.Array) -> jax.Array:
        return self.audio_head(self.audio.pooled(mel_bam))

    def classify_sound(
        self, fbank_bcfm: jax.Array, frame_mask_bcf: jax.Array, chunk_mask_bc: jax.Array
    ) -> jax.Array:
        """Labels from the sound tower: BEATs features averaged over the real tokens of the real
        chunks (the stage-0 pretraining of a stand-in BEATs)."""
        features_bcsd, padding_bcs = self._sound_features(fbank_bcfm, frame_mask_bcf)
        real_bcs = ~padding_bcs & chunk_mask_bc[:, :, None]
        weights_bcs = real_bcs / jnp.maximum(real_bcs.sum(axis=(1, 2), keepdims=True), 1)
        return self.sound_head(jnp.einsum('bcs,bcsd->bd', weights_bcs, features_bcsd))


def splice(x_btd: jax.Array, is_slot_bt: jax.Array, media_bnd: jax.Array) -> jax.Array:
    """Writes media token k of row b into the k-th slot position of row b (static shapes)."""
    slot_index_bt = jnp.clip(jnp.cumsum(is_slot_bt, axis=1) - 1, 0, media_bnd.shape[1] - 1)
    gathered_btd = jnp.take_along_axis(media_bnd, slot_index_bt[..., None], axis=1)
    return jnp.where(is_slot_bt[..., None], gathered_btd, x_btd)
