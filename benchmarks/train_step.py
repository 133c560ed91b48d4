"""Whole-step training speed of a tiny MoE LM against HF `MixtralForCausalLM` (issue 3).

One full training step = forward, backward and the AdamW update (with global-norm clipping on
both sides), float32, on CPU. Ours: `unimoe.models.llm.DecoderLM` with every layer MoE
('softmax_topk' top-2, renormalized = Mixtral's routing), loss = next-token cross-entropy +
0.01 * balance loss, `optim.make_optimizer` (clip 1.0 + AdamW), one jitted step over
`nnx.split` state with donated buffers. Peer: `transformers.MixtralForCausalLM` of the same
shape (num_key_value_heads = num_heads, output_router_logits=True, router_aux_loss_coef=0.01,
its default attention / experts implementations), `torch.nn.utils.clip_grad_norm_` +
`torch.optim.AdamW`, `torch.set_num_threads(2)`.

Both run in this one process, interleaved two steps at a time (ours, ours, torch, torch, ...),
and only the second step of each pair is timed: the first JAX step after a torch step paid 3-5 s
of kernel page zeroing that no training run pays (benchmarks/HISTORY.md, 2026-11-25). Each
side's time is the median of the measured steps after the warm-up (which includes the jit
compile), so the ratio survives a noisy shared machine; absolute milliseconds do not.

    python benchmarks/train_step.py            # 8 layers, D=512, 8 heads, E=8 k=2, F=1024, T=512, B=8
    python benchmarks/train_step.py --quick    # 2 layers, D=64, T=32, B=2: a smoke run

The last line is `RESULT train_speedup=<x>` = our tokens/s / torch tokens/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from unimoe.models.llm import DecoderLM, LLMConfig
from unimoe.moe.config import MoEConfig
from unimoe.train import optim
from unimoe.train.step import next_token_loss

AUX_COEF = 0.01
LEARNING_RATE = 1e-4


@dataclasses.dataclass(frozen=True)
class Shape:
    num_layers: int
    dim: int
    num_heads: int
    num_experts: int
    top_k: int
    ffn_dim: int
    seq: int
    batch: int
    vocab: int
    warmup: int
    steps: int


FULL = Shape(
    num_layers=8,
    dim=512,
    num_heads=8,
    num_experts=8,
    top_k=2,
    ffn_dim=1024,
    seq=512,
    batch=8,
    vocab=8192,
    warmup=2,
    steps=5,
)
QUICK = Shape(
    num_layers=2,
    dim=64,
    num_heads=8,
    num_experts=8,
    top_k=2,
    ffn_dim=128,
    seq=32,
    batch=2,
    vocab=512,
    warmup=2,
    steps=3,
)


# --------------------------------------------------------------------------------------------
# ours (JAX / Flax NNX)


def make_ours(shape: Shape, tokens_bt: np.ndarray):
    cfg = LLMConfig(
        vocab_size=shape.vocab,
        dim=shape.dim,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_heads,
        ffn_dim=shape.ffn_dim,
        moe_layers=tuple(range(shape.num_layers)),
        moe=MoEConfig(
            num_experts=shape.num_experts,
            top_k=shape.top_k,
            router="softmax_topk",
            renormalize=True,
        ),
    )
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=LEARNING_RATE, total_steps=1000))
    opt_state = tx.init(params)

    def step(params, opt_state, rest, tokens_bt, attn_mask_bt):
        def loss_fn(params):
            model = nnx.merge(graphdef, params, rest, copy=True)
            logits_btv, aux = model(model.embed_tokens(tokens_bt), attn_mask_bt)
            ce, _ = next_token_loss(logits_btv, tokens_bt, attn_mask_bt)
            return ce + AUX_COEF * aux.balance_loss

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, rest, loss

    step_jit = jax.jit(step, donate_argnums=(0, 1, 2))
    tokens = jnp.asarray(tokens_bt, jnp.int32)
    mask = jnp.ones(tokens.shape, jnp.int32)
    state = [params, opt_state, rest]
    num_params = sum(x.size for x in jax.tree.leaves(params))

    def run_step() -> float:
        params, opt_state, rest, loss = step_jit(*state, tokens, mask)
        jax.block_until_ready((params, opt_state, loss))
        state[:] = [params, opt_state, rest]
        return float(loss)

    return run_step, num_params


# --------------------------------------------------------------------------------------------
# peer (PyTorch / Hugging Face Mixtral)


def mixtral_config(shape: Shape):
    """The HF `MixtralConfig` of `shape` (kv heads = heads, untied head, no sliding window)."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.dim,
        intermediate_size=shape.ffn_dim,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        num_local_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        max_position_embeddings=max(shape.seq, 128),
        output_router_logits=True,
        router_aux_loss_coef=AUX_COEF,
        sliding_window=None,
        use_cache=False,
        tie_word_embeddings=False,
    )


def make_torch(shape: Shape, tokens_bt: np.ndarray):
    import torch
    from transformers import MixtralForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = MixtralForCausalLM(mixtral_config(shape)).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    tokens = torch.from_numpy(tokens_bt.astype(np.int64))
    mask = torch.ones_like(tokens)
    num_params = sum(p.numel() for p in model.parameters())
    impl = (
        f"attn={getattr(model.config, '_attn_implementation', '?')}, "
        f"experts={getattr(model.config, '_experts_implementation', '?')}"
    )

    def run_step() -> float:
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=tokens, attention_mask=mask, labels=tokens, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(out.loss.detach())

    return run_step, num_params, impl


# --------------------------------------------------------------------------------------------


def timed(fn) -> tuple[float, float]:
    start = time.perf_counter()
    loss = fn()
    return time.perf_counter() - start, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke run)")
    parser.add_argument("--steps", type=int, default=0, help="measured steps per side (0: shape's)")
    parser.add_argument(
        "--warmup", type=int, default=-1, help="warm-up steps per side (-1: shape's)"
    )
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    if args.steps > 0:
        shape = dataclasses.replace(shape, steps=args.steps)
    if args.warmup >= 0:
        shape = dataclasses.replace(shape, warmup=args.warmup)
    tokens_per_step = shape.batch * shape.seq

    import torch
    import transformers

    print(
        f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device), "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(f"shape {shape}; {tokens_per_step} tokens/step, float32")
    print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} (make bench sets hugetlb=1)")
    tokens_bt = np.random.default_rng(0).integers(0, shape.vocab, (shape.batch, shape.seq))

    ours, ours_params = make_ours(shape, tokens_bt)
    theirs, torch_params, impl = make_torch(shape, tokens_bt)
    print(f"params: ours {ours_params:,}  torch {torch_params:,}  (torch {impl})")

    ours_s, torch_s = [], []
    for i in range(shape.warmup + shape.steps):
        ours()  # untimed: the first step after the other side's step pays for its memory
        t_ours, loss_ours = timed(ours)
        theirs()
        t_torch, loss_torch = timed(theirs)
        phase = "warm-up" if i < shape.warmup else "measured"
        print(
            f"step {i} ({phase}): ours {t_ours * 1e3:9.1f} ms loss {loss_ours:.4f} | "
            f"torch {t_torch * 1e3:9.1f} ms loss {loss_torch:.4f}",
            flush=True,
        )
        if i >= shape.warmup:
            ours_s.append(t_ours)
            torch_s.append(t_torch)

    ours_med, torch_med = statistics.median(ours_s), statistics.median(torch_s)
    ours_tps, torch_tps = tokens_per_step / ours_med, tokens_per_step / torch_med
    print(f"{'side':<8}{'median step ms':>16}{'min ms':>10}{'max ms':>10}{'tokens/s':>12}")
    for name, times, tps in (("ours", ours_s, ours_tps), ("torch", torch_s, torch_tps)):
        print(
            f"{name:<8}{statistics.median(times) * 1e3:>16.1f}{min(times) * 1e3:>10.1f}"
            f"{max(times) * 1e3:>10.1f}{tps:>12.1f}"
        )
    print(f"RESULT train_speedup={ours_tps / torch_tps:.3f}")


if __name__ == "__main__":
    main()
