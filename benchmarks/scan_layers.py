"""Decoder layers scanned (`LLMConfig.scan_layers`) against unrolled: the train step and the
paper-scale compile (issue 28).

1. The tiny train step: `train_step.py`'s MoE LM (every layer MoE, float32, AdamW with clipping,
   one jitted donated step), the same weights in both layouts, no rematerialisation (the layout
   alone). Interleaved two steps at a time, the second of each pair timed (as `train_step.py`);
   `step_ratio` = the scanned median / the unrolled median (below 1: scanned faster).
2. The paper-scale compile: `configs/paper_scale.py:experts=8,target=8xh100`'s stage-3 sharded
   step lowered and compiled (`train.lower.compile_stage`, the planned 8 devices simulated on the
   CPU), scanned with the config's `remat='full'` against unrolled without remat (what it was
   before); `compile_speedup` = unrolled (lower + compile) / scanned (lower + compile).

    python benchmarks/scan_layers.py              # train_step.py's FULL shape; the 7B compile
    python benchmarks/scan_layers.py --quick      # QUICK shape; the compile at size=test

The last line is `RESULT compile_speedup=<x> step_ratio=<y>`.
"""

from __future__ import annotations

import argparse
import os
import statistics

# The planned mesh's 8 devices, simulated (before JAX starts).
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from train_step import FULL, QUICK, Shape, timed  # noqa: E402  (benchmarks/ is on sys.path)

from unimoe import config as config_lib, experiment  # noqa: E402
from unimoe.checkpoint import path_str  # noqa: E402
from unimoe.models import layer_stack  # noqa: E402
from unimoe.models.llm import DecoderLM, LLMConfig  # noqa: E402
from unimoe.moe.config import MoEConfig  # noqa: E402
from unimoe.train import lower, optim  # noqa: E402
from unimoe.train.step import next_token_loss  # noqa: E402

AUX_COEF, LEARNING_RATE = 0.01, 1e-4


def _lm(shape: Shape, scan: bool) -> DecoderLM:
    cfg = LLMConfig(
        vocab_size=shape.vocab, dim=shape.dim, num_layers=shape.num_layers,
        num_heads=shape.num_heads, num_kv_heads=shape.num_heads, ffn_dim=shape.ffn_dim,
        moe_layers='all', scan_layers=scan,
        moe=MoEConfig(num_experts=shape.num_experts, top_k=shape.top_k, router='softmax_topk'),
    )  # fmt: skip
    return DecoderLM(cfg, rngs=nnx.Rngs(0))


def _same_weights(source: DecoderLM, target: DecoderLM) -> None:
    flat = {path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(source, nnx.Param))}
    stacked = layer_stack.scanned_params(flat, target.cfg.block_period, target.cfg.num_layers)
    for path, variable in nnx.to_flat_state(nnx.state(target, nnx.Param)):
        variable.set_value(jnp.array(stacked[path_str(path)]))  # a copy: each side donates its own


def _stepper(model: DecoderLM, tokens_bt: np.ndarray):
    """A thunk running one jitted, donated train step of `model`; returns the loss."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=LEARNING_RATE, total_steps=1000))
    state = [params, tx.init(params), rest]
    tokens = jnp.asarray(tokens_bt, jnp.int32)
    mask = jnp.ones(tokens.shape, jnp.int32)

    def step(params, opt_state, rest):
        def loss_fn(params):
            model = nnx.merge(graphdef, params, rest, copy=True)
            logits_btv, aux = model(model.embed_tokens(tokens), mask)
            return next_token_loss(logits_btv, tokens, mask)[0] + AUX_COEF * aux.balance_loss

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, rest, loss

    step_jit = jax.jit(step, donate_argnums=(0, 1, 2))

    def run() -> float:
        params, opt_state, rest, loss = step_jit(*state)
        state[:] = [params, opt_state, rest]
        jax.block_until_ready(state)
        return float(loss)

    return run


def step_ratio(shape: Shape) -> float:
    tokens_bt = np.random.default_rng(0).integers(0, shape.vocab, (shape.batch, shape.seq))
    unrolled, scanned = _lm(shape, scan=False), _lm(shape, scan=True)
    _same_weights(unrolled, scanned)
    sides = {'unrolled': _stepper(unrolled, tokens_bt), 'scanned': _stepper(scanned, tokens_bt)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(shape.warmup + shape.steps):
        line = []
        for name, run in sides.items():
            run()  # untimed: the first step after the other side's pays for its memory
            seconds, loss = timed(run)
            line.append(f'{name} {seconds * 1e3:8.1f} ms loss {loss:.4f}')
            if i >= shape.warmup:
                times[name].append(seconds)
        print(f'step {i}: ' + ' | '.join(line), flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"median step: unrolled {medians['unrolled'] * 1e3:.1f} ms, "
          f"scanned {medians['scanned'] * 1e3:.1f} ms")  # fmt: skip
    return medians['scanned'] / medians['unrolled']


def compile_speedup(size: str) -> float:
    seconds = {}
    for scan in (True, False):
        config = config_lib.load_config(f'configs/paper_scale.py:experts=8,target=8xh100{size}')
        if not scan:
            config.model.llm.update(scan_layers=False, remat='none')
        _, plan = lower.compile_stage(experiment.from_config_dict(config), 's3_moe')
        name = 'scanned' if scan else 'unrolled'
        seconds[name] = plan.lower_seconds + plan.compile_seconds
        print(f'{name}: lowered {plan.lower_seconds:.1f} s, compiled {plan.compile_seconds:.1f} s, '
              f'temporaries {plan.temp_bytes / 2**30:.2f} GiB per device', flush=True)  # fmt: skip
    return seconds['unrolled'] / seconds['scanned']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='tiny shapes (smoke run)')
    args = parser.parse_args()
    print(f'jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} devices)')
    shape = QUICK if args.quick else FULL
    print(f'train step: {shape}')
    ratio = step_ratio(shape)
    speedup = compile_speedup(',size=test' if args.quick else '')
    print(f'RESULT compile_speedup={speedup:.2f} step_ratio={ratio:.3f}')


if __name__ == '__main__':
    main()
