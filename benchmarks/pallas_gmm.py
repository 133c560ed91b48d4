"""Pallas grouped matmul (issue 4) against a dense matmul of the same FLOPs and `lax.ragged_dot`.

On a GPU or TPU: bfloat16, M=16384 rows, K=4096, N=14336 (Mixtral's w1), G=8 and G=64 groups
with uneven sizes (a multinomial draw, as tokamax benchmarks: even splits are unrealistically
fast), forward only. TFLOP/s = 2*M*K*N / time; every variant runs in this one process,
interleaved round by round, each time the median over rounds.

    python benchmarks/pallas_gmm.py            # the shapes above on an accelerator
    python benchmarks/pallas_gmm.py --quick    # smaller shapes

The last line is `RESULT gmm_vs_dense=<x> gmm_vs_ragged_dot=<y>` (TFLOP/s ratios of the default
lowering, the lower of the two G). On Hopper both GPU lowerings (Mosaic GPU, the default for
bf16, and Triton) are timed. On CPU Pallas runs only in interpret mode, which says nothing about speed: the script
then checks the kernels against the XLA references (forward and gradients) on tiny shapes and
ends `RESULT interpret_ok=<true|false>`.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from unimoe.kernels import gmm as kgmm


def group_sizes(num_rows: int, num_groups: int, seed: int = 0) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.multinomial(num_rows, np.full(num_groups, 1 / num_groups)), jnp.int32)


def median_seconds(thunks: dict[str, object], rounds: int) -> dict[str, float]:
    for thunk in thunks.values():  # compile / warm up
        jax.block_until_ready(thunk())
    times: dict[str, list[float]] = {name: [] for name in thunks}
    for _ in range(rounds):
        for name, thunk in thunks.items():
            start = time.perf_counter()
            jax.block_until_ready(thunk())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def accelerator(args: argparse.Namespace) -> None:
    m, k, n = (2048, 1024, 2048) if args.quick else (16384, 4096, 14336)
    tiling = kgmm.default_tiling(jax.default_backend())
    print(f"device {jax.devices()[0].device_kind}; jax {jax.__version__}; bf16 M={m} K={k} N={n}")
    print(f"block sizes (m, k, n) = ({tiling.block_m}, {tiling.block_k}, {tiling.block_n})")
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    w_dense = jax.random.normal(keys[1], (k, n), jnp.bfloat16)
    dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    ragged = jax.jit(functools.partial(jax.lax.ragged_dot, preferred_element_type=jnp.float32))
    default = kgmm.default_gpu_lowering(jnp.bfloat16, jax.default_backend())
    lowerings = {"gmm": None}
    if default == "mosaic":
        lowerings["gmm_triton"] = "triton"
    print(f"gmm lowering: {default if jax.default_backend() != 'tpu' else 'mosaic tpu'}")
    thunks = {"dense": lambda: dense(x, w_dense)}
    for g in args.groups:
        w = jax.random.normal(keys[2], (g, k, n), jnp.bfloat16)
        sizes = group_sizes(m, g)
        for name, lowering in lowerings.items():
            gmm = functools.partial(
                kgmm.gmm, preferred_element_type=jnp.float32, gpu_lowering=lowering
            )
            thunks[f"{name}/G={g}"] = functools.partial(jax.jit(gmm), x, w, sizes)
        thunks[f"ragged_dot/G={g}"] = functools.partial(ragged, x, w, sizes)
    med = median_seconds(thunks, args.rounds)
    tflops = {name: 2 * m * k * n / t / 1e12 for name, t in med.items()}
    print(f"{'variant':<20}{'ms':>10}{'TFLOP/s':>10}")
    for name, t in med.items():
        print(f"{name:<20}{1e3 * t:>10.2f}{tflops[name]:>10.1f}")
    vs_dense = min(tflops[f"gmm/G={g}"] / tflops["dense"] for g in args.groups)
    vs_ragged = min(tflops[f"gmm/G={g}"] / tflops[f"ragged_dot/G={g}"] for g in args.groups)
    print(f"RESULT gmm_vs_dense={vs_dense:.3f} gmm_vs_ragged_dot={vs_ragged:.3f}")


@functools.partial(jax.jit, static_argnames=("tiling", "platform", "gpu_lowering"))
def max_errors(x, w, sizes, dy, *, tiling, platform, gpu_lowering):
    """max |kernel - reference| of the output and both input gradients."""
    kernel = functools.partial(
        kgmm.gmm, tiling=tiling, interpret=True, platform=platform, gpu_lowering=gpu_lowering
    )
    got, got_vjp = jax.vjp(lambda x, w: kernel(x, w, sizes), x, w)
    want, want_vjp = jax.vjp(lambda x, w: kgmm.gmm_reference(x, w, sizes), x, w)
    pairs = zip((got, *got_vjp(dy)), (want, *want_vjp(dy)))
    return [jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) for a, b in pairs]


def interpret_check() -> None:
    print(
        f"jax {jax.__version__} on cpu: Pallas runs in interpret mode only; correctness, no timing"
    )
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (72, 40))
    w = jax.random.normal(keys[1], (4, 40, 24))
    dy = jax.random.normal(keys[2], (72, 24))
    sizes = jnp.array([20, 0, 33, 11], jnp.int32)  # an empty group, 8 rows past the groups
    print(f"M=72 K=40 N=24 G=4 group sizes {sizes.tolist()}")
    ok = True
    # (kernel, platform, GPU lowering, dtype, blocks, tolerance): Mosaic GPU takes bf16 and
    # blocks of 64, compared with the reference on the same bf16 operands.
    kernels = [
        ("tpu (Mosaic)", "tpu", None, jnp.float32, kgmm.Tiling(16, 16, 16), 1e-3),
        ("gpu (Triton)", "gpu", "triton", jnp.float32, kgmm.Tiling(16, 16, 16), 1e-3),
        ("gpu (Mosaic GPU)", "gpu", "mosaic", jnp.bfloat16, kgmm.Tiling(64, 64, 64), 0.1),
    ]
    for name, platform, lowering, dtype, tiling, tol in kernels:
        operands = [a.astype(dtype) for a in (x, w)] + [sizes, dy.astype(dtype)]
        errors = max_errors(*operands, tiling=tiling, platform=platform, gpu_lowering=lowering)
        errors = [float(e) for e in errors]
        kernel_ok = max(errors) < tol
        ok &= kernel_ok
        print(f"{name} kernel, {jnp.dtype(dtype).name}, blocks {tiling}:")
        print(f"  max |error| out/d_lhs/d_rhs = {errors} -> ok={kernel_ok}")
    print(f"RESULT interpret_ok={str(ok).lower()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (median)")
    parser.add_argument("--groups", type=int, nargs="+", default=[8, 64], help="values of G")
    args = parser.parse_args()
    if jax.default_backend() == "cpu":
        interpret_check()
    else:
        accelerator(args)


if __name__ == "__main__":
    main()
