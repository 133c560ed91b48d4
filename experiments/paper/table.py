r"""Scores prediction files and writes Table 9 in the paper's column order, paper numbers beside ours.

  python experiments/paper/table.py --predictions runs/paper/predictions --output runs/paper \
      --answers okvqa=mscoco_val2014_annotations.json --answers vqav2=v2_mscoco_val2014_annotations.json

`--predictions DIR` holds one folder per row of experiments/paper/config.py, each with the
`<benchmark>.predictions.json` files `python -m unimoe.eval --output=DIR/<row>` writes; a missing
file is '-'. `--released DIR` holds one folder per released Uni-MoE variant (speech_4e, audio_4e,
8e), the predictions of the released model (`configs/unimoe_released.py`, official protocol); each
is shown under the paper row it was released as (`RELEASED`). MM-Vet and ActivityNet-QA are GPT-graded in the paper; here they are the exact-match
proxy (`unimoe.eval.graders`), and their headers say so. Writes table.md and table.json.

`--dry-run` runs the same path on the eval fixtures with no model: the predictions are the
fixtures' own answers ("oracle") and a constant "A", in rows labelled as such.
"""

import argparse
import collections
import dataclasses
import importlib.util
import json
import pathlib
import sys
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from unimoe.eval import benchmarks  # noqa: E402

FIXTURES = REPO / "tests" / "data" / "fixtures" / "unimoe_formats"
DRY_RUN_FILES = {  # benchmark -> fixture (OK-VQA's fixture has no answers: its column stays '-')
    "aokvqa": "eval_aokvqa.json",
    "mmbench": "eval_mmbench11.json",
    "mmvet": "eval_mmvet.json",
}


@dataclasses.dataclass(frozen=True)
class Column:
    header: str
    benchmark: str
    splits: tuple[str, ...] = ()  # categories reported as "a/b" (the paper's two-split columns)


# Reference §5.3, in the paper's order. RACE's splits are read as RACE-middle / RACE-high, EHSL's
# as its 150 long / 50 short questions (the table does not name them).
COLUMNS = (
    Column("AOK", "aokvqa"),
    Column("OK", "okvqa"),
    Column("VQAv2", "vqav2"),
    Column("MMB", "mmbench"),
    Column("POPE", "pope"),
    Column("SEED", "seed"),
    Column("MMVet", "mmvet"),
    Column("RAudio", "race", ("middle", "high")),
    Column("EHSL", "english_listening", ("long", "short")),
    Column("AN-QA", "activitynet_qa"),
)

# Table 9's numbers (%) for the rows this codebase trains, keyed like experiments/paper/config.py.
PAPER = {
    "expert_task2": "67.07 62.91 75.18 71.26 84.7 60.63 27.8 - - -",
    "expert_task5": "58.86 56.01 67.35 65.80 62.48 53.50 26.9 30.78/24.90 9.33/12.00 -",
    "expert_task6": "58.69 57.77 68.74 67.53 65.84 55.21 25.6 32.59/29.02 18.67/8.00 -",
    "moe_task1_4e": "61.22 57.63 68.42 68.15 76.67 56.58 30.1 47.08/47.08 41.33/36.00 -",
    "moe_task2_4e": "65.07 62.10 73.87 70.50 85.43 60.54 28.2 49.65/49.37 42.00/48.00 42.2",
    "moe_task3_4e": "64.28 61.96 73.87 69.82 86.10 59.16 31.7 - - 42.8",
    "moe_task4_4e": "70.22 66.02 76.4 73.2 86.0 63.4 32.6 64.21/64.72 48.00/58.67 45.6",
    "moe_task4_4e_aux": "69.61 66.13 76.0 72.6 85.0 63.3 31.7 63.86/64.24 50.00/54.00 45.2",
    "moe_task4_8e": "70.0 66.2 76.6 73.0 86.2 63.3 32.5 63.75/61.56 48.67/46.0 46.0",
    "moe_task4_8e_aux": "70.7 66.4 76.7 73.2 86.3 63.4 32.8 62.33/64.18 42.00/50.00 46.4",
}


# Released variant -> the Table 9 row it reproduces (Uni_MoE/README.md: Uni-MoE-speech is MoE-Task2,
# Uni-MoE-audio MoE-Task3; the 8E release adds LLaVA-665K, read as MoE-Task4 8E).
RELEASED = {"speech_4e": "moe_task2_4e", "audio_4e": "moe_task3_4e", "8e": "moe_task4_8e"}


def row_titles() -> dict[str, str]:
    """Row key -> Table 9 title, from experiments/paper/config.py (one list of rows)."""
    spec = importlib.util.spec_from_file_location("paper_config", HERE / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {key: row.title for key, row in module.ROWS.items()}


def header(column: Column) -> str:
    if benchmarks.get(column.benchmark).metric == "gpt":
        return f"{column.header} (ours: exact-match proxy)"
    return column.header


def cell(scores: dict[str, Any] | None, column: Column) -> str:
    """One table cell in percent, or '-'."""
    if scores is None:
        return "-"
    if column.splits:
        per = scores.get("per_category", {})
        return "/".join(f"{100 * per[s]:.2f}" if s in per else "-" for s in column.splits)
    if column.benchmark == "pope" and scores.get("per_category"):
        # POPE is reported as the F1 averaged over its random / popular / adversarial splits.
        f1s = [s["f1"] for s in scores["per_category"].values()]
        return f"{100 * sum(f1s) / len(f1s):.2f}"
    return f"{100 * scores[scores['headline']]:.2f}"


def score_row(folder: pathlib.Path, answers: dict[str, str]) -> dict[str, dict[str, Any]]:
    """{benchmark: scores} of the prediction files in `folder`."""
    out = {}
    for column in COLUMNS:
        path = folder / f"{column.benchmark}.predictions.json"
        if path.is_file():
            out[column.benchmark] = benchmarks.score_predictions_file(
                benchmarks.get(column.benchmark), path, answers_path=answers.get(column.benchmark)
            )
    return out


def markdown(rows: list[tuple[str, list[str]]]) -> str:
    head = ["model"] + [header(c) for c in COLUMNS]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(COLUMNS)) + "|",
    ]
    lines += ["| " + " | ".join([title, *cells]) + " |" for title, cells in rows]
    return "\n".join(lines) + "\n"


def build_table(
    predictions: pathlib.Path | None,
    answers: dict[str, str],
    extra: dict[str, pathlib.Path],
    released: pathlib.Path | None = None,
) -> tuple[str, dict[str, Any]]:
    """Paper, ours and the released model for every config row, then the `extra` rows (title ->
    folder)."""
    rows, raw = [], {}
    released_rows = {row: variant for variant, row in RELEASED.items()}
    for key, title in row_titles().items():
        rows.append((f"{title}: paper", PAPER[key].split()))
        found = [
            (key, f"{title}: ours", predictions / key if predictions else None),
            (
                f"released_{released_rows.get(key)}",
                f"{title}: released {released_rows.get(key)} (official protocol)",
                released / released_rows[key] if released and key in released_rows else None,
            ),
        ]
        for raw_key, row_title, folder in found:
            if folder is not None and folder.is_dir():
                raw[raw_key] = score_row(folder, answers)
                rows.append((row_title, [cell(raw[raw_key].get(c.benchmark), c) for c in COLUMNS]))
    for title, folder in extra.items():
        raw[title] = score_row(folder, answers)
        rows.append((title, [cell(raw[title].get(c.benchmark), c) for c in COLUMNS]))
    return markdown(rows), raw


def oracle_answer(item: benchmarks.EvalItem) -> str:
    ref = item.reference
    if "answers" in ref:  # VQA: the most common human answer
        return collections.Counter(ref["answers"]).most_common(1)[0][0]
    if "options" in ref:
        return ref["answer"]
    # MM-Vet: the first alternative, its parts joined.
    return " and ".join(ref["answer"].split("<OR>")[0].split("<AND>"))


def write_dry_run_predictions(
    output: pathlib.Path, fixtures: pathlib.Path
) -> dict[str, pathlib.Path]:
    """Prediction files from the fixtures with no model; returns {row title: folder}."""
    predictors = {
        "dry run: fixture answers as predictions (no model)": ("oracle", oracle_answer),
        "dry run: constant 'A' (no model)": ("constant_a", lambda item: "A"),
    }
    folders = {}
    for title, (name, predict) in predictors.items():
        folder = output / "dry_run" / name
        folder.mkdir(parents=True, exist_ok=True)
        for bench, file in DRY_RUN_FILES.items():
            items, _ = benchmarks.read_items(benchmarks.get(bench), fixtures / file)
            records = [{**item.raw, benchmarks.PREDICTION_KEY: predict(item)} for item in items]
            (folder / f"{bench}.predictions.json").write_text(json.dumps(records, indent=1))
        folders[title] = folder
    return folders


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--predictions", type=pathlib.Path, help="DIR/<row>/<benchmark>.predictions.json"
    )
    parser.add_argument(
        "--output", type=pathlib.Path, required=True, help="writes table.md, table.json"
    )
    parser.add_argument(
        "--answers", action="append", default=[], metavar="BENCHMARK=FILE",
        help="official annotations for benchmarks whose records carry no answers (OK-VQA, VQAv2)",
    )  # fmt: skip
    parser.add_argument(
        "--released", type=pathlib.Path,
        help="DIR/<variant>/<benchmark>.predictions.json of the released Uni-MoE models",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="score the fixtures, no model")
    parser.add_argument("--fixtures", type=pathlib.Path, default=FIXTURES)
    args = parser.parse_args(argv)
    answers = dict(a.split("=", 1) for a in args.answers)
    unknown = set(answers) - {c.benchmark for c in COLUMNS}
    if unknown:
        parser.error(f"--answers for benchmarks not in the table: {sorted(unknown)}")
    if not args.dry_run and args.predictions is None and args.released is None:
        parser.error("--predictions or --released is required (or --dry-run)")
    args.output.mkdir(parents=True, exist_ok=True)
    extra = write_dry_run_predictions(args.output, args.fixtures) if args.dry_run else {}
    table, raw = build_table(args.predictions, answers, extra, args.released)
    (args.output / "table.md").write_text(table)
    (args.output / "table.json").write_text(json.dumps(raw, indent=1) + "\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
