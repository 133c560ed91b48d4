"""Decode speed of KV-cached generation (issue 8) against Hugging Face `generate` (PyTorch, CPU).

The model is the LLM of configs/unimoe_tiny.py (every layer MoE, 4 experts, top-2, softmax over
the top-k logits), text only, as a `MixtralForCausalLM` with random weights (N(0, 0.1), larger than
HF's init so greedy choices are not near-ties). The HF folder is written with `save_pretrained`
and read into unimoe by `unimoe.convert.core.read_hf` (the Mixtral family map), so both sides hold
the same weights; the script checks that their greedy outputs agree token for token before timing.

Both sides generate `--new` tokens greedily after a `--prompt`-token prompt, no early stop (HF:
eos disabled and min_new_tokens = max_new_tokens; unimoe: no stop ids), at batch 1 and 8. Tokens/s
= batch * new tokens / wall time of the whole call, prefill included on both sides. Variants run
interleaved round by round after one warm-up call each (compilation excluded); times are medians.
PyTorch runs on 1 thread by default: at these shapes that is HF's fastest on the 2-core machine
(with 2, OpenMP's spinning barriers made each forward 2-100x slower whenever other jobs shared
the cores).

    python benchmarks/generate.py            # prompt 32, 64 new tokens, 5 rounds
    python benchmarks/generate.py --quick    # smoke run in seconds

The last line is `RESULT speedup_b1=<x> speedup_b8=<y>` (unimoe tok/s / HF tok/s).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import tempfile
from collections.abc import Callable

import jax
import numpy as np
import torch
import transformers
from flax import nnx
from moe_layer import measure  # benchmarks/ is the script's folder, so on sys.path

from unimoe import config as config_lib
from unimoe.convert import core
from unimoe.eval import generate
from unimoe.models.llm import DecoderLM, LLMConfig

VOCAB = 600  # the built-in tokenizer's vocabulary (unimoe.data.tokenizer.Tokenizer.train default)
BATCHES = (1, 8)
TINY_CONFIG = pathlib.Path(__file__).parent.parent / 'configs' / 'unimoe_tiny.py'


def tiny_llm_config() -> LLMConfig:
    model = config_lib.load_config(str(TINY_CONFIG)).model
    return LLMConfig(
        **model.llm, vocab_size=VOCAB, moe_layers=model.moe_layers, moe=dict(model.moe)
    )


def hf_mixtral(cfg: LLMConfig, seed: int) -> transformers.MixtralForCausalLM:
    if len(cfg.moe_layers) != cfg.num_layers or cfg.moe.router != 'topk_softmax':
        raise ValueError(f'the tiny config is no longer Mixtral-shaped: {cfg}')
    hf_cfg = transformers.MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        num_local_experts=cfg.moe.num_experts,
        num_experts_per_tok=cfg.moe.top_k,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=1024,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'norm' not in name:
                param.normal_(0.0, 0.1)
    return model


def unimoe_lm(hf_model: transformers.MixtralForCausalLM, expected: LLMConfig) -> DecoderLM:
    """The same weights in unimoe, through the HF folder and the Mixtral conversion map."""
    with tempfile.TemporaryDirectory() as folder:
        hf_model.save_pretrained(folder)
        conv = core.read_hf(folder)
    cfg = conv.configs['llm']
    if dataclasses.replace(cfg, head_dim=0) != expected:
        raise ValueError(f'converted config {cfg} is not the tiny LLM {expected}')
    lm = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    core.load_into({'llm': lm}, conv.params)
    return lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='short prompt and output (smoke run)')
    parser.add_argument('--rounds', type=int, default=5, help='interleaved rounds (median)')
    parser.add_argument('--prompt', type=int, default=32, help='prompt tokens')
    parser.add_argument('--new', type=int, default=64, help='generated tokens')
    parser.add_argument(
        '--torch-threads', type=int, default=1, help="PyTorch threads (1: HF's fastest here)"
    )
    args = parser.parse_args()
    prompt_len, new = (8, 8) if args.quick else (args.prompt, args.new)
    rounds = 2 if args.quick else max(args.rounds, 1)
    torch.set_num_threads(args.torch_threads)
    print(
        f'jax {jax.__version__} on {jax.default_backend()}, torch {torch.__version__}, '
        f'transformers {transformers.__version__}; prompt {prompt_len}, {new} new tokens'
    )

    cfg = tiny_llm_config()
    hf_model = hf_mixtral(cfg, seed=0)
    graphdef, state = nnx.split(unimoe_lm(hf_model, cfg))
    print(f'model: {cfg}')
    prompts = np.random.default_rng(0).integers(3, VOCAB, size=(max(BATCHES), prompt_len))

    def ours(batch: int) -> Callable[[], np.ndarray]:
        inputs = {'tokens': prompts[:batch], 'prompt_len': np.full(batch, prompt_len)}
        return lambda: generate.generate(graphdef, state, inputs, max_new_tokens=new, pad_id=0)

    def theirs(batch: int) -> Callable[[], np.ndarray]:
        input_ids = torch.from_numpy(prompts[:batch])

        def run() -> np.ndarray:
            with torch.no_grad():
                out = hf_model.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    do_sample=False,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    eos_token_id=None,
                    pad_token_id=0,
                )
            return out[:, prompt_len:].numpy()

        return run

    thunks = {}
    for batch in BATCHES:
        thunks[f'unimoe/b{batch}'], thunks[f'hf/b{batch}'] = ours(batch), theirs(batch)
        # Warm-up (compilation) doubles as the parity check.
        mine, hf = thunks[f'unimoe/b{batch}'](), thunks[f'hf/b{batch}']()
        if mine.shape != hf.shape or (mine != hf).any():
            raise SystemExit(f'greedy outputs differ at batch {batch}:\nunimoe {mine}\nhf     {hf}')
        print(f'batch {batch}: greedy outputs identical ({mine.size} tokens)')

    med = measure(thunks, rounds)

    print(f"{'variant':<12}{'ms':>10}{'tok/s':>10}")
    speedups = {}
    for batch in BATCHES:
        for side in ('unimoe', 'hf'):
            name = f'{side}/b{batch}'
            print(f'{name:<12}{1e3 * med[name]:>10.1f}{batch * new / med[name]:>10.0f}')
        speedups[batch] = med[f'hf/b{batch}'] / med[f'unimoe/b{batch}']
    print(f'RESULT speedup_b1={speedups[1]:.2f} speedup_b8={speedups[8]:.2f}')


if __name__ == '__main__':
    main()
