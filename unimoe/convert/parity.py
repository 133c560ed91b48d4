"""Runs an HF folder through `transformers` (PyTorch, CPU, float32), or a BEATs checkpoint file
through SpeechBrain's BEATs (`beats_reference`), and through unimoe on the same random inputs, and
reports the max absolute difference of each output.

Outputs compared: logits for causal LMs (real positions of a right-padded batch); the last hidden
state, the selected hidden state (class token dropped) and the pooled output for CLIP; the encoder
output and the decoder's last hidden state (fed learned-query stand-ins and the HF encoder output)
for Whisper; for BEATs the features of a random fbank batch without padding and with a padded
row, and the token padding masks (0 when equal, 1 when not).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimoe.convert import beats, beats_reference, core
from unimoe.convert.families import Options

TOLERANCE = 1e-4


def _import_torch() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as err:  # transformers and torch are test-only dependencies
        raise ImportError("parity needs torch and transformers (pip install -e '.[test]')") from err
    return torch, transformers


def _max_diff(ours: Any, theirs: np.ndarray) -> float:
    ours = np.asarray(ours, np.float32)
    if ours.shape != theirs.shape:
        raise ValueError(f"output shapes differ: unimoe {ours.shape}, transformers {theirs.shape}")
    return float(np.max(np.abs(ours - theirs)))


# One compiled call per model: much faster on CPU than op-by-op dispatch.
@nnx.jit
def _lm_logits(lm, tokens_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    return lm(lm.embed_tokens(tokens_bt), mask_bt)[0]


@nnx.jit
def _clip_outputs(vit, images_bhwc: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    # HF's last_hidden_state is the last block's output, before post_layernorm.
    last = vit._hidden_state(images_bhwc, vit.cfg.depth)
    return last, vit(images_bhwc), vit.pooled(images_bhwc)


@nnx.jit
def _whisper_outputs(encoder, connector, mel_bam: jax.Array, hf_enc_bsd: jax.Array):
    return encoder(mel_bam), connector(hf_enc_bsd)


def _lm(conv: core.Converted, hf_dir: pathlib.Path, rng: np.random.Generator) -> dict[str, float]:
    torch, transformers = _import_torch()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    lm = core.abstract_modules(conv.configs)["llm"]
    core.load_into({"llm": lm}, conv.params)
    batch, seq = 2, 9
    tokens_bt = rng.integers(0, lm.cfg.vocab_size, (batch, seq)).astype(np.int32)
    mask_bt = np.arange(seq)[None, :] < np.array([[seq], [seq - 3]])
    with torch.no_grad():
        expected = model(
            input_ids=torch.from_numpy(tokens_bt).long(),
            attention_mask=torch.from_numpy(mask_bt).long(),
        ).logits.numpy()
    logits = _lm_logits(lm, jnp.asarray(tokens_bt), jnp.asarray(mask_bt))
    return {"logits": _max_diff(np.asarray(logits)[mask_bt], expected[mask_bt])}


def _clip(conv: core.Converted, hf_dir: pathlib.Path, rng: np.random.Generator) -> dict[str, float]:
    torch, transformers = _import_torch()
    model = transformers.CLIPVisionModel.from_pretrained(hf_dir, dtype=torch.float32).eval()
    vit = core.abstract_modules(conv.configs)["vision"]
    core.load_into({"vision": vit}, conv.params)
    size = vit.cfg.image_size
    images_bhwc = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        out = model(
            pixel_values=torch.from_numpy(images_bhwc.transpose(0, 3, 1, 2).copy()),
            output_hidden_states=True,
        )
    last, selected, pooled = _clip_outputs(vit, jnp.asarray(images_bhwc))
    return {
        "last_hidden_state": _max_diff(last, out.last_hidden_state.numpy()),
        "selected_hidden_state": _max_diff(
            selected, out.hidden_states[vit.cfg.select_layer][:, 1:].numpy()
        ),
        "pooled": _max_diff(pooled, out.pooler_output.numpy()),
    }


def _whisper(
    conv: core.Converted, hf_dir: pathlib.Path, rng: np.random.Generator
) -> dict[str, float]:
    torch, transformers = _import_torch()
    model = transformers.WhisperModel.from_pretrained(hf_dir, dtype=torch.float32).eval()
    modules = core.abstract_modules(conv.configs)
    core.load_into(modules, conv.params)
    encoder, connector = modules["audio"], modules["audio_conn"]
    cfg = connector.cfg
    # The connector's own parts stand in as: queries random, output projection the identity.
    queries_qd = rng.normal(size=(cfg.num_queries, cfg.width)).astype(np.float32)
    connector.query_tokens.set_value(jnp.asarray(queries_qd))
    connector.out_proj.kernel.set_value(jnp.eye(cfg.width, dtype=jnp.float32))
    connector.out_proj.bias.set_value(jnp.zeros((cfg.width,), jnp.float32))
    mel_bam = rng.normal(size=(2, encoder.cfg.max_frames, encoder.cfg.num_mel_bins))
    mel_bam = mel_bam.astype(np.float32)
    with torch.no_grad():
        enc = model.encoder(torch.from_numpy(mel_bam.transpose(0, 2, 1).copy())).last_hidden_state
        inputs = torch.from_numpy(np.broadcast_to(queries_qd, (2, *queries_qd.shape)).copy())
        dec = model.decoder(inputs_embeds=inputs, encoder_hidden_states=enc).last_hidden_state
    ours_enc, ours_dec = _whisper_outputs(
        encoder, connector, jnp.asarray(mel_bam), jnp.asarray(enc.numpy())
    )
    return {
        "encoder": _max_diff(ours_enc, enc.numpy()),
        "decoder": _max_diff(ours_dec, dec.numpy()),
    }


@nnx.jit
def _beats_outputs(model, fbank_bfm: jax.Array, padding_bf: jax.Array | None):
    return model(fbank_bfm, padding_bf)


def beats_parity(path: str | pathlib.Path, *, seed: int = 0) -> dict[str, float]:
    """{output name: max |unimoe - SpeechBrain|} for a BEATs checkpoint file, both reading it."""
    conv, _ = beats.read_beats(path)
    model = core.abstract_modules(conv.configs)[beats.MODULE]
    core.load_into({beats.MODULE: model}, conv.params)
    reference = beats_reference.load(path)
    cfg = model.cfg
    # Ten patches of frames and a partial one (as a real clip's tail); row 1 padded after 60 %.
    num_frames = 10 * cfg.input_patch_size + 3
    rng = np.random.default_rng(seed)
    fbank_bfm = rng.normal(size=(2, num_frames, cfg.num_mel_bins)).astype(np.float32)
    lengths_b = np.array([num_frames, num_frames * 3 // 5])
    padding_bf = np.arange(num_frames)[None, :] >= lengths_b[:, None]
    plain, _ = _beats_outputs(model, jnp.asarray(fbank_bfm), None)
    padded, padding_bs = _beats_outputs(model, jnp.asarray(fbank_bfm), jnp.asarray(padding_bf))
    expected_plain, _ = beats_reference.features(reference, fbank_bfm)
    expected_padded, expected_padding = beats_reference.features(reference, fbank_bfm, lengths_b)
    return {
        "features": _max_diff(plain, expected_plain),
        "features_padded": _max_diff(padded, expected_padded),
        "padding_mask": _max_diff(padding_bs, expected_padding.astype(np.float32)),
    }


_RUNNERS = {
    "llama": _lm,
    "mixtral": _lm,
    "qwen2_moe": _lm,
    "clip_vision": _clip,
    "whisper": _whisper,
}


def parity(
    hf_dir: str | pathlib.Path, options: Options = Options(), *, seed: int = 0
) -> dict[str, float]:
    """{output name: max |unimoe - transformers|} for the folder's family; a file is taken for a
    BEATs checkpoint (`beats_parity`)."""
    hf_dir = pathlib.Path(hf_dir)
    if hf_dir.is_file():
        return beats_parity(hf_dir, seed=seed)
    conv = core.read_hf(hf_dir, options)
    return _RUNNERS[conv.family](conv, hf_dir, np.random.default_rng(seed))
