"""PyTorch replicas of the released Uni-MoE model's module tree, with the official names.

`build_llava` gives a LlamaForCausalLM whose module names are those of the official
LlavaLlamaForCausalLM (`model.layers.L.mlp.experts.E.gate_proj`, `model.layers.L.mlp.gate`,
`model.mm_projector.0`, `model.mm_audio_aligner.decoder.audio_decoder...`, `model.query_tokens`,
8E: `model.layers.L.mlp.deepspeed_moe.{gate.wg,experts.deepspeed_experts.E}`), so that peft
attaches LoRA to the same modules and the side files carry the same keys as the official
train.py writes. The MoE blocks are written from the official forward, not from ours.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np
import peft
import torch
import transformers
from torch import nn
from transformers.models.llama import modeling_llama
from transformers.models.whisper import modeling_whisper

from tests.models import beats_checkpoints
from unimoe.convert import beats_reference

BEATS = beats_checkpoints.VARIANTS["iter3"]  # BEATs_iter3+ options at odd sizes, width 15
# The audio aligner's Q-Former. The official builds Blip2Config()'s (768 wide, 12 layers, 12
# heads), a shape no released file states; here as wide as BEATs, cross-attention every 2nd layer.
QFORMER = dict(
    hidden_size=BEATS["encoder_embed_dim"], num_hidden_layers=3, num_attention_heads=3,
    intermediate_size=22, encoder_hidden_size=BEATS["encoder_embed_dim"],
    cross_attention_frequency=2, layer_norm_eps=1e-12,
)
# The official 8E expert_list: slot e starts from the dense FFN in file EXPERT_LIST[e].
EXPERT_LIST = ("mlp_audiocap", "mlp_basev", "mlp_base", "mlp_base1", "mlp_base4", "mlp_base7",
               "mlp_base", "mlp_base7")


class MistralMoE(nn.Module):
    """4E (`model/moe/moe.py`): top-k of the gate logits, softmax over those k in fp32."""

    def __init__(self, cfg: transformers.LlamaConfig, num_experts: int, top_k: int):
        super().__init__()
        self.experts = nn.ModuleList(modeling_llama.LlamaMLP(cfg) for _ in range(num_experts))
        self.gate = nn.Linear(cfg.hidden_size, num_experts, bias=False)
        self.top_k = top_k

    def forward(self, x_btd: torch.Tensor) -> torch.Tensor:
        x_nd = x_btd.reshape(-1, x_btd.shape[-1])
        top_nk, idx_nk = torch.topk(self.gate(x_nd), self.top_k)
        w_nk = torch.softmax(top_nk, dim=1, dtype=torch.float).to(x_nd.dtype)
        y_nd = torch.zeros_like(x_nd)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(idx_nk == e)
            y_nd[rows] += w_nk[rows, slot, None] * expert(x_nd[rows])
        return y_nd.reshape(x_btd.shape)


class LoRAExpert(nn.Module):
    """8E `LlamaMLPLoRA`: frozen SwiGLU plus its own LoRA on each projection (down's LoRA reads
    the intermediate activation), scale lora_alpha / lora_r; inference, so no dropout."""

    def __init__(self, cfg: transformers.LlamaConfig, r: int, alpha: float):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        for name, (n_in, n_out) in {"gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}.items():
            setattr(self, name, nn.Linear(n_in, n_out, bias=False))
            setattr(self, f"{name}_lora_A", nn.Linear(n_in, r, bias=False))
            setattr(self, f"{name}_lora_B", nn.Linear(r, n_out, bias=False))
        self.scaling = alpha / r

    def _proj(self, name: str, x: torch.Tensor) -> torch.Tensor:
        lora = getattr(self, f"{name}_lora_B")(getattr(self, f"{name}_lora_A")(x))
        return getattr(self, name)(x) + lora * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.silu(self._proj("gate_proj", x)) * self._proj("up_proj", x)
        return self._proj("down_proj", h)


class _Gate(nn.Module):
    def __init__(self, d: int, e: int):
        super().__init__()
        self.wg = nn.Linear(d, e, bias=False)


class _Experts(nn.Module):
    def __init__(self, experts: list[nn.Module]):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(experts)


class _DeepSpeedMoELayer(nn.Module):
    def __init__(self, gate: nn.Module, experts: nn.Module):
        super().__init__()
        self.gate, self.experts = gate, experts


class DeepSpeedTop2(nn.Module):
    """8E (`moe_dp.py` over DeepSpeed's MoE): softmax of fp32 logits; first expert the argmax,
    second the argmax of the rest (the official adds Gumbel noise first: taken out for parity);
    the two gates renormalised to sum 1 (denominator clamped at eps); nothing dropped."""

    def __init__(self, cfg: transformers.LlamaConfig, num_experts: int, r: int, alpha: float):
        super().__init__()
        experts = _Experts([LoRAExpert(cfg, r, alpha) for _ in range(num_experts)])
        self.deepspeed_moe = _DeepSpeedMoELayer(_Gate(cfg.hidden_size, num_experts), experts)

    def forward(self, x_btd: torch.Tensor) -> torch.Tensor:
        x_nd = x_btd.reshape(-1, x_btd.shape[-1])
        gate = self.deepspeed_moe.gate.wg
        probs_ne = torch.softmax(nn.functional.linear(x_nd.float(), gate.weight.float()), dim=1)
        first_n = probs_ne.argmax(dim=1)
        second_n = probs_ne.scatter(1, first_n[:, None], -1.0).argmax(dim=1)
        g1_n = probs_ne.gather(1, first_n[:, None])[:, 0]
        g2_n = probs_ne.gather(1, second_n[:, None])[:, 0]
        denom_n = torch.clamp(g1_n + g2_n, min=torch.finfo(g1_n.dtype).eps)
        y_nd = torch.zeros_like(x_nd)
        for e, expert in enumerate(self.deepspeed_moe.experts.deepspeed_experts):
            for chosen_n, g_n in ((first_n, g1_n), (second_n, g2_n)):
                rows = torch.where(chosen_n == e)[0]
                y_nd[rows] += (g_n[rows] / denom_n[rows])[:, None].to(x_nd.dtype) * expert(x_nd[rows])
        return y_nd.reshape(x_btd.shape)


class _AudioDecoder(nn.Module):
    def __init__(self, whisper_cfg: transformers.WhisperConfig):
        super().__init__()
        self.audio_decoder = modeling_whisper.WhisperDecoder(whisper_cfg)


class WhisperAligner(nn.Module):
    """`audio_aligner/builder.py`: the Whisper decoder over the learned queries, then a linear."""

    def __init__(self, whisper_cfg: transformers.WhisperConfig, lm_dim: int):
        super().__init__()
        self.decoder = _AudioDecoder(whisper_cfg)
        self.projector = nn.Linear(whisper_cfg.d_model, lm_dim)

    def forward(self, encoded_bsd: torch.Tensor, queries_bqd: torch.Tensor) -> torch.Tensor:
        out = self.decoder.audio_decoder(inputs_embeds=queries_bqd, encoder_hidden_states=encoded_bsd)
        return self.projector(out.last_hidden_state)


class _QFormer(nn.Module):
    def __init__(self, qformer_cfg: transformers.Blip2QFormerConfig):
        super().__init__()
        self.qformer = transformers.Blip2QFormerModel(qformer_cfg)


class QFormerAligner(nn.Module):
    """The audio model's aligner (`audio_aligner/builder.py`, `Qformer.py`): its own learned
    queries through a BLIP-2 Q-Former attending to every encoder token, then a linear."""

    def __init__(self, qformer_cfg: transformers.Blip2QFormerConfig, lm_dim: int, queries: int):
        super().__init__()
        self.qformer = _QFormer(qformer_cfg)
        self.projector = nn.Linear(qformer_cfg.hidden_size, lm_dim)
        self.query_tokens = nn.Parameter(torch.zeros(1, queries, qformer_cfg.hidden_size))

    def forward(self, encoded_bsd: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(encoded_bsd.shape[0], -1, -1)
        out = self.qformer.qformer(
            query_embeds=queries, encoder_hidden_states=encoded_bsd,
            encoder_attention_mask=torch.ones(encoded_bsd.shape[:-1], dtype=torch.long),
        )
        return self.projector(out.last_hidden_state)


def mlp2x_gelu(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


def llama_config(cfg: dict[str, Any]) -> transformers.LlamaConfig:
    keys = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
    )
    return transformers.LlamaConfig(
        **{k: cfg[k] for k in keys}, tie_word_embeddings=False, attn_implementation="eager"
    )


def moe_layers(cfg: dict[str, Any], variant: str) -> list[int]:
    """Which layers hold an MoE: all for the speech 4E model, even ones for the audio model, 8E
    by `moe_type` ("dense" all, "sparse" every `moe_stride`-th)."""
    n = cfg["num_hidden_layers"]
    if variant == "audio_4e" or cfg.get("moe_type") == "sparse":
        stride = cfg.get("moe_stride", 2)
        return [i for i in range(n) if i % stride == 0]
    return list(range(n))


def build_llava(
    cfg: dict[str, Any], variant: str, whisper_cfg: transformers.WhisperConfig,
    aligner: nn.Module | None = None,
) -> transformers.LlamaForCausalLM:
    """An LLM with the official module names (random init); `aligner` overrides the Whisper one."""
    llama_cfg = llama_config(cfg)
    lm = transformers.LlamaForCausalLM(llama_cfg).eval()
    for i in moe_layers(cfg, variant):
        if variant == "8e":
            block = DeepSpeedTop2(llama_cfg, cfg["num_experts"], cfg["lora_r"], cfg["lora_alpha"])
        else:
            block = MistralMoE(llama_cfg, cfg["num_experts"], cfg["num_experts_per_tok"])
        lm.model.layers[i].mlp = block
    if variant == "8e":  # the dense layers of the 8E model are LoRA MLPs too
        for i in sorted(set(range(cfg["num_hidden_layers"])) - set(moe_layers(cfg, variant))):
            lm.model.layers[i].mlp = LoRAExpert(llama_cfg, cfg["lora_r"], cfg["lora_alpha"])
    lm.model.mm_projector = mlp2x_gelu(cfg["mm_hidden_size"], cfg["hidden_size"])
    lm.model.mm_audio_aligner = aligner or WhisperAligner(whisper_cfg, cfg["hidden_size"])
    if variant != "audio_4e":  # the audio model keeps its queries inside the aligner
        lm.model.query_tokens = nn.Parameter(
            torch.zeros(1, cfg["query_tokens_size"], cfg["mm_audio_hidden_size"])
        )
    return lm.eval()


def find_all_llm_linear_names(lm: nn.Module, variant: str) -> list[str]:
    """The official peft target list: every nn.Linear whose name holds none of the keywords,
    less lm_head. The speech model's 'mlp.gate' keyword drops the routers; the audio model's
    'mlp.gate.' matches no module name, so peft wraps its routers too (section 9.2)."""
    keywords = ["audio_tower", "mm_audio_aligner", "mm_projector", "vision_tower", "vision_resampler"]
    keywords += {
        "speech_4e": ["mlp.gate"],
        "audio_4e": ["mlp.gate."],
        "8e": ["mlp.deepspeed_moe.gate.", "mlp.deepspeed_moe.experts.deepspeed_experts."],
    }[variant]
    names = {
        name for name, module in lm.named_modules()
        if isinstance(module, nn.Linear) and not any(k in name for k in keywords)
    }
    names.discard("lm_head")
    return sorted(names)


# ---------------------------------------------------------------------------------------------
# The reference: the official load order, then the official splice and forward.

IMAGE_TOKEN, AUDIO_TOKEN, VIDEO_TOKEN = -200, -300, -400  # the official sentinel ids


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt: token ids with the official sentinels (one per media item, in order) and its
    media. image [3, H, W] and video [F, 3, H, W] are CLIP-normalised pixels; audio is one clip
    as chunks: Whisper log-mels [C, mels, frames] (speech, 8E) or a normalised fbank
    [C, frames, mels] (audio model)."""

    ids: tuple[int, ...]
    image: np.ndarray | None = None
    video: np.ndarray | None = None
    audio: np.ndarray | None = None


def _load(path: pathlib.Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _base_state(base: pathlib.Path) -> dict[str, torch.Tensor]:
    index = json.loads((base / "pytorch_model.bin.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(_load(base / shard))
    return state


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official loader's prefix handling for non_lora_trainables.bin."""
    state = {(k[11:] if k.startswith("base_model.") else k): v for k, v in state.items()}
    if any(k.startswith("model.model.") for k in state):
        state = {(k[6:] if k.startswith("model.") else k): v for k, v in state.items()}
    return state


class _Loader:
    """load_state_dict(strict=False) as the official loader, remembering what each load filled,
    so that the reference can insist every parameter came from some file."""

    def __init__(self, model: nn.Module):
        self.model, self.filled = model, set()

    def load(self, state: dict[str, torch.Tensor]) -> None:
        result = self.model.load_state_dict(state, strict=False)
        self.filled |= set(state) - set(result.unexpected_keys)

    def check(self) -> None:
        missing = sorted(set(self.model.state_dict()) - self.filled)
        if missing:
            raise AssertionError(f"reference: no file filled {missing[:5]}")


def _eight_e_experts(loader: _Loader, folders: Any) -> None:
    """load_all_pretrained_model_dp step [2] on one rank holding all 8 experts: slot e takes
    `{e}_mlp_experts.bin` overlaid by `mlp_dir/expert_list[e].bin`, renamed by layer and the
    projection name (the key's second-to-last part)."""
    for e, source in enumerate(EXPERT_LIST):
        state = _load(folders.finetuned / f"{e}_mlp_experts.bin")
        state.update(_load(folders.experts / f"{source}.bin"))
        loader.load({
            f"model.layers.{k.split('.')[2]}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}."
            f"{k.split('.')[-2]}.weight": v for k, v in state.items()
        })


def load_llm(folders: Any, variant: str) -> transformers.LlamaForCausalLM:
    """The LLM with its connectors, loaded in the official order: 4E (`load_all_pretrained_model`)
    base -> non_lora_trainables -> peft merge -> mm_audio_aligner -> mlp_gates, with the
    fine-tuned folder's config; 8E (`load_all_pretrained_model_dp`, config = 8config.json) base ->
    experts -> non_lora_trainables -> mlp_gates -> peft merge -> mm_audio_aligner."""
    config_name = "8config.json" if variant == "8e" else "config.json"
    cfg = json.loads(((folders.base if variant == "8e" else folders.finetuned) / config_name).read_text())
    aligner = None
    if variant == "audio_4e":
        aligner = QFormerAligner(
            transformers.Blip2QFormerConfig(**QFORMER), cfg["hidden_size"], cfg["query_tokens_size"]
        )
    whisper_cfg = transformers.WhisperConfig.from_pretrained(folders.whisper)
    lm = build_llava(cfg, variant, whisper_cfg, aligner)
    loader = _Loader(lm)
    loader.load(_base_state(folders.base))
    if variant == "8e":
        _eight_e_experts(loader, folders)
    loader.load(_strip(_load(folders.finetuned / "non_lora_trainables.bin")))
    if variant == "8e":
        loader.load(_load(folders.finetuned / "mlp_gates.bin"))
    merged = peft.PeftModel.from_pretrained(lm, folders.finetuned).merge_and_unload()
    loader.model = merged
    loader.load(_load(folders.finetuned / "mm_audio_aligner.bin"))
    if variant != "8e":
        loader.load(_load(folders.finetuned / "mlp_gates.bin"))
    loader.check()
    return merged.eval()


@dataclasses.dataclass
class Reference:
    variant: str
    lm: transformers.LlamaForCausalLM
    clip: transformers.CLIPVisionModel
    audio_tower: Any  # Whisper's encoder, or SpeechBrain's BEATs

    @classmethod
    def load(cls, folders: Any, variant: str) -> Reference:
        if variant == "audio_4e":
            tower = beats_reference.load(folders.beats)
        else:
            tower = transformers.WhisperModel.from_pretrained(folders.whisper).encoder.eval()
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the CLIP folder's text half is not loaded
        try:
            clip = transformers.CLIPVisionModel.from_pretrained(folders.clip).eval()
        finally:
            transformers.logging.set_verbosity(verbosity)
        return cls(variant, load_llm(folders, variant), clip, tower)

    def encode_images(self, pixels_bchw: np.ndarray) -> torch.Tensor:
        """CLIP's second-to-last hidden states without CLS, through the projector."""
        out = self.clip(torch.from_numpy(pixels_bchw).float(), output_hidden_states=True)
        return self.lm.model.mm_projector(out.hidden_states[-2][:, 1:])

    def encode_audio(self, chunks: np.ndarray) -> torch.Tensor:
        """One clip: each chunk's tokens from the aligner, concatenated in order."""
        aligner = self.lm.model.mm_audio_aligner
        blocks = []
        for chunk in chunks:
            if self.variant == "audio_4e":
                encoded, _ = beats_reference.features(self.audio_tower, chunk[None])
                blocks.append(aligner(torch.from_numpy(encoded))[0])
            else:
                encoded = self.audio_tower(torch.from_numpy(chunk[None]).float()).last_hidden_state
                blocks.append(aligner(encoded, self.lm.model.query_tokens)[0])
        return torch.cat(blocks, dim=0)

    def embed(self, sample: Sample) -> torch.Tensor:
        """The official splice: each sentinel replaced by its block (image 576-like, video the
        frame mean of the image blocks, audio its chunks' blocks), text embedded around them."""
        blocks = {}
        if sample.image is not None:
            blocks[IMAGE_TOKEN] = self.encode_images(sample.image[None])[0]
        if sample.video is not None:
            blocks[VIDEO_TOKEN] = self.encode_images(sample.video).mean(dim=0)
        if sample.audio is not None:
            blocks[AUDIO_TOKEN] = self.encode_audio(sample.audio)
        pieces, text = [], []
        for token in list(sample.ids) + [None]:
            if token is not None and token >= 0:
                text.append(token)
                continue
            if text:
                pieces.append(self.lm.model.embed_tokens(torch.tensor(text)))
                text = []
            if token is not None:
                pieces.append(blocks[token])
        return torch.cat(pieces, dim=0)

    @torch.no_grad()
    def logits(self, batch: list[Sample]) -> np.ndarray:
        """[B, T, V] float32 logits, the spliced rows right-padded with zeros (masked out)."""
        rows = [self.embed(sample) for sample in batch]
        t = max(len(r) for r in rows)
        x_btd = torch.zeros(len(rows), t, rows[0].shape[-1])
        mask_bt = torch.zeros(len(rows), t, dtype=torch.long)
        for b, row in enumerate(rows):
            x_btd[b, : len(row)], mask_bt[b, : len(row)] = row, 1
        return self.lm(inputs_embeds=x_btd, attention_mask=mask_bt).logits.float().numpy()


def reference_logits(folders: Any, variant: str, batch: list[Sample]) -> np.ndarray:
    return Reference.load(folders, variant).logits(batch)
