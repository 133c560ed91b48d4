r"""Command line: Hugging Face folders to unimoe checkpoints and back, and the parity check.

  python -m unimoe.convert from-hf HF_DIR OUT_DIR [--select-layer -2] [--num-queries 50]
  python -m unimoe.convert to-hf CKPT_DIR OUT_DIR [--max-shard-size 5GB]
  python -m unimoe.convert parity HF_DIR [--tolerance 1e-4]

`parity` exits with status 1 when any output differs from transformers' by more than the
tolerance (float32).
"""

from __future__ import annotations

import argparse
import re

from unimoe.convert import core, parity
from unimoe.convert.families import Options

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as transformers' max_shard_size); '0' = no sharding."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"size {text!r} is not like 5GB, 500MB or 1000")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _options(args: argparse.Namespace) -> Options:
    return Options(select_layer=args.select_layer, num_queries=args.num_queries)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m unimoe.convert", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def with_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--select-layer", type=int, default=-2, help="CLIP hidden state to return")
        p.add_argument("--num-queries", type=int, default=50, help="Whisper decoder queries kept")

    p = commands.add_parser("from-hf", help="HF folder -> unimoe orbax checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    with_options(p)
    p = commands.add_parser("to-hf", help="unimoe converted checkpoint -> HF folder")
    p.add_argument("ckpt_dir")
    p.add_argument("out_dir")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"))
    p = commands.add_parser("parity", help="max |unimoe - transformers| on random inputs")
    p.add_argument("hf_dir")
    p.add_argument("--tolerance", type=float, default=parity.TOLERANCE)
    p.add_argument("--seed", type=int, default=0)
    with_options(p)
    args = parser.parse_args(argv)

    if args.command == "from-hf":
        conv = core.from_hf(args.hf_dir, args.out_dir, _options(args))
        print(
            f"{conv.family}: {len(conv.params)} params, {len(conv.extra)} HF tensors kept -> {args.out_dir}"
        )
        return 0
    if args.command == "to-hf":
        files = core.to_hf(args.ckpt_dir, args.out_dir, max_shard_bytes=args.max_shard_size)
        print(f"wrote {len(files)} safetensors file(s) to {args.out_dir}")
        return 0
    diffs = parity.parity(args.hf_dir, _options(args), seed=args.seed)
    worst = max(diffs.values())
    for name, diff in diffs.items():
        print(f"{name}: max abs diff {diff:.3e}")
    verdict = "PASS" if worst <= args.tolerance else "FAIL"
    print(f"{verdict}: max abs diff {worst:.3e} (tolerance {args.tolerance:g})")
    return 0 if verdict == "PASS" else 1
