"""Where the whole-step gap to PyTorch is: each block of `train_step.py`'s model against HF's.

Forward+backward (gradients of sum(out**2) for every parameter and the input), float32, CPU, of
one block of the `train_step.py` model on its batch (B x T tokens), ours (jitted) against the
Hugging Face Mixtral module of the same shape at 2 torch threads:
- attention: `llm.Attention` (projections, RoPE, blocked causal softmax) vs `MixtralAttention`
  (sdpa, causal);
- moe: `MoELayer` (softmax -> top-2 -> renormalized, dropless) vs `MixtralSparseMoeBlock`
  (grouped_mm experts);
- head: LM head (`lora.Linear`) + next-token cross-entropy (`train.step.next_token_loss`) vs
  `nn.Linear` + `F.cross_entropy`.
All blocks run in this one process, each in its own phase of rounds alternating ours and torch's
(as `moe_layer.py` measures its pairs), each side's timed call after `--settle` untimed ones (the
first call after the other side's pays for fresh memory, as in `train_step.py`). A ratio is the
median over rounds of that round's ratio, the times are medians, and `rounds` is the
lowest-highest single-round ratio. A whole step is about num_layers * (attention + moe) + head,
plus norms and the optimizer.

    python benchmarks/train_blocks.py            # train_step.py's FULL shape
    python benchmarks/train_blocks.py --quick    # its QUICK shape: a smoke run

The last line is `RESULT attention=<x> moe=<y> head=<z>`: our time / torch's time per block
(below 1 = ours faster).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from moe_layer import measure_rounds  # benchmarks/ is the script's folder, so on sys.path
from train_step import FULL, QUICK, Shape, mixtral_config

from unimoe.models.llm import Attention, LLMConfig
from unimoe.nn.lora import Linear
from unimoe.moe.config import MoEConfig
from unimoe.moe.layer import MoELayer
from unimoe.train.step import next_token_loss


def ours(shape: Shape) -> dict[str, Callable[[], object]]:
    """name -> thunk running one jitted fwd+bwd of our block."""
    moe_cfg = MoEConfig(
        num_experts=shape.num_experts, top_k=shape.top_k, router="softmax_topk", renormalize=True
    )
    cfg = LLMConfig(
        vocab_size=shape.vocab,
        dim=shape.dim,
        num_layers=1,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_heads,
        ffn_dim=shape.ffn_dim,
    )
    keys = jax.random.split(jax.random.key(0), 2)
    x_btd = jax.random.normal(keys[0], (shape.batch, shape.seq, shape.dim))
    tokens_bt = jax.random.randint(keys[1], (shape.batch, shape.seq), 0, shape.vocab)
    mask_bt = jnp.ones((shape.batch, shape.seq), jnp.int32)
    head = Linear(shape.dim, shape.vocab, rngs=nnx.Rngs(2))

    def head_loss(m, x):
        return next_token_loss(m(x).astype(jnp.float32), tokens_bt, mask_bt)[0]

    blocks = {
        "attention": (Attention(cfg, rngs=nnx.Rngs(0)), lambda m, x: jnp.sum(m(x, mask_bt) ** 2)),
        "moe": (
            MoELayer(shape.dim, moe_cfg, ffn_dim=shape.ffn_dim, rngs=nnx.Rngs(1)),
            lambda m, x: jnp.sum(m(x, mask_bt)[0] ** 2),
        ),
        "head": (head, head_loss),
    }
    thunks = {}
    for name, (module, loss) in blocks.items():
        grads = nnx.jit(nnx.grad(loss, argnums=(0, 1)))
        thunks[name] = lambda g=grads, m=module: jax.block_until_ready(g(m, x_btd))
    return thunks


def torch_blocks(shape: Shape) -> dict[str, Callable[[], object]]:
    """name -> thunk running one fwd+bwd of the Hugging Face module."""
    import torch
    from transformers.models.mixtral import modeling_mixtral as hf

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = mixtral_config(shape)
    # What MixtralForCausalLM picks on this CPU (its standalone blocks default to neither).
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "grouped_mm"
    attention, moe = hf.MixtralAttention(cfg, 0), hf.MixtralSparseMoeBlock(cfg)
    head = torch.nn.Linear(shape.dim, shape.vocab, bias=False)
    x = torch.randn(shape.batch, shape.seq, shape.dim, requires_grad=True)
    positions = torch.arange(shape.seq)[None].expand(shape.batch, -1)
    cos_sin = hf.MixtralRotaryEmbedding(cfg)(x, positions)
    labels = torch.randint(0, shape.vocab, (shape.batch * shape.seq,))

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    def run(loss_fn):
        def thunk():
            x.grad = None
            loss_fn().backward()

        return thunk

    return {
        "attention": run(lambda: (attention(x, cos_sin, None)[0] ** 2).sum()),
        "moe": run(lambda: (first(moe(x)) ** 2).sum()),
        "head": run(lambda: torch.nn.functional.cross_entropy(head(x).flatten(0, 1), labels)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="train_step.py's QUICK shape")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument(
        "--settle", type=int, default=1, help="untimed calls before each timed one, per side"
    )
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    print(f"jax {jax.__version__} on {jax.default_backend()}; shape {shape}; fwd+bwd, float32")
    sides = {"ours": ours(shape), "torch": torch_blocks(shape)}
    print(f"{'block':<12}{'ours ms':>10}{'torch ms':>10}{'ratio':>8}{'rounds':>12}")
    ratios = {}
    for name in sides["ours"]:
        times = measure_rounds(
            {side: sides[side][name] for side in sides}, args.rounds, settle=args.settle
        )
        round_ratios = [a / b for a, b in zip(times["ours"], times["torch"])]
        ratios[name] = statistics.median(round_ratios)
        print(
            f"{name:<12}{1e3 * statistics.median(times['ours']):>10.1f}"
            f"{1e3 * statistics.median(times['torch']):>10.1f}{ratios[name]:>8.2f}"
            f"{f'{min(round_ratios):.2f}-{max(round_ratios):.2f}':>12}"
        )
    print("RESULT " + " ".join(f"{name}={r:.3f}" for name, r in ratios.items()))


if __name__ == "__main__":
    main()
