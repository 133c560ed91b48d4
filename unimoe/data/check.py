"""`python -m unimoe.data check FILE.json [--media-root DIR] [--no-media] [--tokenizer T]
[--seq-len N] [--max-audio-chunks N] [--sound [--max-sound-chunks N] [--sound-chunk-samples N]]`:
validates a Uni-MoE JSON file.

(`python -m unimoe.data verify DIR [--checksums TSV] [--record OUT.tsv]` checks downloaded files
against their published checksums: `unimoe.data.verify`.)

Each record goes through the training pipeline's own `ExampleBuilder` (structure, tag / media
agreement, media read and decoded, token length when a tokenizer is given; audio longer than
`--max-audio-chunks` 30-s chunks is refused from its header, not decoded). With `--sound` the
file is read as a sound source (`json_data.sound_sources`): its voice files become BEATs features,
limited by `--max-sound-chunks` chunks of `--sound-chunk-samples`. One line per bad
record names its index, id and field; the last line is `N records, M ok, K errors`. Exit status 1
if any record is bad. Mistaken arguments are found before any record is read: one
`error: ...` line each, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Sequence

from unimoe import config
from unimoe.data import formats, json_pipeline, verify
from unimoe.data.tokenizer import PretrainedTokenizer

# The least value of each numeric flag of `check` (argparse dest -> minimum).
_MINIMUMS = {
    "seq_len": 1,
    "max_audio_chunks": 1,
    "max_sound_chunks": 1,
    "sound_chunk_samples": 400,  # one Kaldi window (25 ms at 16 kHz)
}
# The source name `check` gives the file's records (a sound source with `--sound`).
_SOURCE = "check"


class _Parser(argparse.ArgumentParser):
    """argparse, with its own errors (unknown flag, a value that is not a number) as one
    `error: ...` line and exit status 2, as the project's other command lines report."""

    def error(self, message: str):
        config.exit_with_problems([message])


def check_file(
    path: str,
    *,
    read_media: bool,
    tokenizer: PretrainedTokenizer | None,
    cfg: json_pipeline.JsonDataConfig,
) -> tuple[int, list[formats.RecordError]]:
    """(number of records, errors) of `path`; without a tokenizer, token lengths are not checked."""
    raws = formats.load_json_list(path)
    builder = json_pipeline.ExampleBuilder(cfg, tokenizer, read_media=read_media, source=_SOURCE)
    errors = []
    for index, raw in enumerate(raws):
        try:
            builder(json.dumps(raw), index, path)
        except formats.RecordError as e:
            errors.append(e)
    return len(raws), errors


def _parser() -> _Parser:
    parser = _Parser(prog="python -m unimoe.data")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate every record of a Uni-MoE JSON file")
    check.add_argument("file")
    check.add_argument("--media-root", default=None, help="folder or zip the media paths are in")
    check.add_argument("--no-media", action="store_true", help="skip reading media files")
    check.add_argument(
        "--tokenizer", default=None, help="tokenizer.model / tokenizer.json: check lengths"
    )
    check.add_argument("--seq-len", type=int, default=2048)
    check.add_argument(
        "--max-audio-chunks",
        type=int,
        default=json_pipeline.JsonDataConfig.max_audio_chunks,
        help="30-s audio chunks a record may have over all its voice files (the stage's "
        "json_data.max_audio_chunks)",
    )
    _add_sound_flags(check)
    verify_cmd = commands.add_parser(
        "verify", help="check downloaded files against data/checksums.tsv (size + sha256)"
    )
    verify_cmd.add_argument("directory", help="where the downloads are (searched recursively)")
    verify_cmd.add_argument("--checksums", default=str(verify.DEFAULT_TABLE))
    verify_cmd.add_argument(
        "--record", default=None, help="write size + sha256 of the files the table does not name"
    )
    return parser


def _add_sound_flags(check: argparse.ArgumentParser) -> None:
    defaults = json_pipeline.JsonDataConfig
    check.add_argument(
        "--sound",
        action="store_true",
        help="a sound source (json_data.sound_sources): voice files go to BEATs, not Whisper",
    )
    check.add_argument(
        "--max-sound-chunks",
        type=int,
        default=defaults.max_sound_chunks,
        help="with --sound: BEATs chunks a record may have over all its voice files",
    )
    check.add_argument(
        "--sound-chunk-samples",
        type=int,
        default=defaults.sound_chunk_samples,
        help="with --sound: samples (16 kHz) per BEATs chunk",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "verify":
        return _verify(args.directory, args.checksums, args.record)
    problems = _check_args(args)
    if problems:
        config.exit_with_problems(problems)
    cfg = json_pipeline.JsonDataConfig(
        data_dir="",
        sources=(_SOURCE,),
        media_root=args.media_root,
        seq_len=args.seq_len,
        batch_size=1,
        max_audio_chunks=args.max_audio_chunks,
        sound_sources=(_SOURCE,) if args.sound else (),
        max_sound_chunks=args.max_sound_chunks,
        sound_chunk_samples=args.sound_chunk_samples,
    )
    tokenizer = PretrainedTokenizer(args.tokenizer) if args.tokenizer else None
    try:
        total, errors = check_file(
            os.fspath(args.file),
            read_media=not args.no_media,
            tokenizer=tokenizer,
            cfg=cfg,
        )
    except ValueError as e:  # the file itself is unreadable
        print(e)
        return 2
    for e in errors:
        print(f"record {e.index} (id {e.record_id}): {e.field}: {e.message}")
    print(f"{total} records, {total - len(errors)} ok, {len(errors)} errors")
    return 1 if errors else 0


def _check_args(args: argparse.Namespace) -> list[str]:
    """Every problem with `check`'s arguments, found before any record is read."""
    problems = [
        f"--{name.replace('_', '-')} must be >= {least} (got {getattr(args, name)})"
        for name, least in _MINIMUMS.items()
        if getattr(args, name) < least
    ]
    for problem in (
        formats.file_problem("FILE", args.file),
        formats.file_problem("--tokenizer", args.tokenizer),
        args.media_root and formats.media_root_problem(args.media_root),
    ):
        if problem:
            problems.append(problem)
    return problems


def _verify(directory: str, table: str, record_to: str | None) -> int:
    try:
        statuses, others = verify.verify_dir(directory, table)
    except (FileNotFoundError, AssertionError) as e:  # no directory, or an unreadable table
        print(e)
        return 2
    for s in statuses:
        if s.status != "missing":
            print(f"{s.status:8s} {s.filename} {s.detail}".rstrip())
    missing = sum(s.status == "missing" for s in statuses)
    bad = sum(s.status == "mismatch" for s in statuses)
    print(
        f"{len(statuses) - missing} of {len(statuses)} listed files present: "
        f"{len(statuses) - missing - bad} ok, {bad} mismatched; {len(others)} files not listed"
    )
    if record_to and others:
        verify.record(others, pathlib.Path(directory), record_to)
        print(f"recorded {len(others)} files in {record_to}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
