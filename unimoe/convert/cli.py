r"""Command line: Hugging Face folders to unimoe checkpoints and back, and the parity check.

  python -m unimoe.convert from-hf HF_DIR OUT_DIR [--select-layer -2] [--num-queries 50]
  python -m unimoe.convert from-beats BEATS_FILE.pt OUT_DIR
  python -m unimoe.convert from-unimoe --variant={speech_4e,audio_4e,8e} --base=DIR --finetuned=DIR
      [--experts=DIR] --clip=DIR --whisper=DIR [--beats=FILE] OUT_DIR
  python -m unimoe.convert to-hf CKPT_DIR OUT_DIR [--max-shard-size 5GB]
  python -m unimoe.convert parity HF_DIR|BEATS_FILE.pt [--tolerance 1e-4]

`to-hf` takes a directory `from-hf` wrote (the HF folder comes back as it was) or a finished
training stage, WORKDIR/STAGE as `python -m unimoe.main` writes it (`convert/stage.py`: the LM,
CLIP and Whisper towers as HF folders under OUT_DIR, the rest in a safetensors file, a README).
`from-beats` converts a BEATs checkpoint (the torch file microsoft/unilm publishes, holding `cfg`
and `model`) into a converted checkpoint with the parameters under sound/ (`convert/beats.py`).
`from-unimoe` converts a released Uni-MoE model (the base folder, the fine-tuned folder with its
peft adapter and side files, 8E's expert folder, the public CLIP / Whisper folders and for the
audio model the BEATs file) into one converted checkpoint, every LoRA merged, in the official
loader's order (`convert/released.py`); it prints what it dropped and why.
`parity` exits with status 1 when any output differs from the reference's (transformers; for a
BEATs file, SpeechBrain's BEATs) by more than the tolerance (float32). A mistake in the input (a
missing folder or file, an unsupported or damaged checkpoint, a missing torch) prints one
`error: ...` line and exits with status 2; `--debug` (or UNIMOE_DEBUG=1) adds the traceback.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

from unimoe import config as config_lib
from unimoe.convert import beats, core, parity, released, stage
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


def _add_from_unimoe(commands: argparse._SubParsersAction, debug: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "from-unimoe",
        parents=[debug],
        help="released Uni-MoE folders -> unimoe orbax checkpoint (all LoRA merged)",
    )
    p.add_argument("--variant", required=True, choices=released.VARIANTS)
    p.add_argument("--base", required=True, help="Uni-MoE-speech-base / Uni-MoE-audio-base")
    p.add_argument("--finetuned", required=True, help="Uni-MoE-speech-e2 / -audio-e2 / -8e-e2")
    p.add_argument("--experts", help="8e only: Uni-MoE-8e-Experts (mlp_<name>.bin files)")
    p.add_argument("--clip", required=True, help="clip-vit-large-patch14-336 (HF folder)")
    p.add_argument("--whisper", required=True, help="whisper-small (HF folder)")
    p.add_argument("--beats", help="audio_4e only: BEATs_iter3_plus_AS2M.pt")
    p.add_argument(
        "--qformer-heads",
        type=int,
        default=released.BLIP2_QFORMER_HEADS,
        help="audio_4e's Q-Former heads, which no file records (the release: BLIP-2's 12)",
    )
    p.add_argument(
        "--dtype",
        choices=released.STORE_DTYPES,
        help="store the weights in this dtype (default: as read; float16 = what the official "
        "evaluation loads, half the size of float32)",
    )
    p.add_argument("out_dir")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unimoe.convert", description=__doc__.split("\n")[0]
    )
    # Read by `config.debug_requested` (anywhere in argv); each command accepts it.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show an input error's traceback too")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--select-layer", type=int, default=-2, help="CLIP hidden state to return")
        p.add_argument("--num-queries", type=int, default=50, help="Whisper decoder queries kept")

    p = commands.add_parser(
        "from-hf", parents=[debug], help="HF folder -> unimoe orbax checkpoint"
    )
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    with_options(p)
    p = commands.add_parser(
        "from-beats",
        parents=[debug],
        help="BEATs checkpoint file (.pt) -> unimoe orbax checkpoint (params under sound/)",
    )
    p.add_argument("beats_file")
    p.add_argument("out_dir")
    _add_from_unimoe(commands, debug)
    p = commands.add_parser(
        "to-hf",
        parents=[debug],
        help="converted checkpoint or finished stage (WORKDIR/STAGE) -> HF folder(s)",
    )
    p.add_argument("ckpt_dir")
    p.add_argument("out_dir")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"))
    p = commands.add_parser(
        "parity",
        parents=[debug],
        help="max |unimoe - reference| on random inputs (an HF folder, or a BEATs .pt file)",
    )
    p.add_argument("hf_dir", metavar="hf_dir_or_beats_file")
    p.add_argument("--tolerance", type=float, default=parity.TOLERANCE)
    p.add_argument("--seed", type=int, default=0)
    with_options(p)
    return parser


def _check_out_dir(out_dir: str) -> None:
    path = pathlib.Path(out_dir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"{out_dir} exists and is not a directory: give a new or empty one"
        )


def _to_hf(args: argparse.Namespace) -> None:
    source = pathlib.Path(args.ckpt_dir)
    if (source / core.META_FILE).is_file():
        files = core.to_hf(source, args.out_dir, max_shard_bytes=args.max_shard_size)
        print(f"wrote {len(files)} safetensors file(s) to {args.out_dir}")
    elif stage.is_finished_stage(source):
        readme = stage.export_stage(source, args.out_dir, max_shard_bytes=args.max_shard_size)
        print("\n".join(readme))
        print(f"wrote {args.out_dir} (this is its {stage.README_FILE})")
    else:
        problem = (
            "is neither a converted checkpoint nor a finished stage"
            if source.is_dir()
            else "does not exist"
        )
        raise FileNotFoundError(
            f"{source} {problem}: give a directory `from-hf` wrote, or a finished stage "
            "WORKDIR/STAGE (with STAGE/checkpoints/DONE.json)"
        )


def _run(args: argparse.Namespace) -> int:
    if args.command == "from-hf":
        _check_out_dir(args.out_dir)
        conv = core.from_hf(args.hf_dir, args.out_dir, _options(args))
        print(
            f"{conv.family}: {len(conv.params)} params, {len(conv.extra)} HF tensors kept -> {args.out_dir}"
        )
        return 0
    if args.command == "from-beats":
        _check_out_dir(args.out_dir)
        conv, ignored = beats.from_beats(args.beats_file, args.out_dir)
        print(f"{conv.family}: {len(conv.params)} params -> {args.out_dir}")
        for note in ignored:
            print(f"ignored: {note}")
        return 0
    if args.command == "from-unimoe":
        _check_out_dir(args.out_dir)
        conv, notes = released.from_unimoe(
            args.variant, args.base, args.finetuned, args.out_dir, clip=args.clip,
            whisper=args.whisper, experts=args.experts, beats=args.beats,
            qformer_heads=args.qformer_heads, store_dtype=args.dtype,
        )  # fmt: skip
        for note in notes:
            print(f"note: {note}")
        print(f"{args.variant}: {len(conv.params)} params, LoRA merged -> {args.out_dir}")
        return 0
    if args.command == "to-hf":
        _check_out_dir(args.out_dir)
        _to_hf(args)
        return 0
    diffs = parity.parity(args.hf_dir, _options(args), seed=args.seed)
    worst = max(diffs.values())
    for name, diff in diffs.items():
        print(f"{name}: max abs diff {diff:.3e}")
    verdict = "PASS" if worst <= args.tolerance else "FAIL"
    print(f"{verdict}: max abs diff {worst:.3e} (tolerance {args.tolerance:g})")
    return 0 if verdict == "PASS" else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    # Every ValueError / OSError here is about the input: a folder, a file, a config.json; an
    # ImportError, about the environment (torch for BEATs files, the parity references).
    except (ValueError, OSError, ImportError) as error:
        config_lib.exit_on_user_error(error, argv)
