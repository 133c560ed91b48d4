"""Benchmark registry: each benchmark's record reader, prompt suffix, metric and answer source.

Records are Uni-MoE evaluation JSON ( `data.formats` reads and validates them):
the conversation with an empty gpt turn plus evaluation fields. `read_items` pairs every record
with its references (from the record, or from the official annotations file the benchmark names);
`score_items` applies the benchmark's metric to predictions. A record without a usable reference
is a `formats.RecordError` naming the file, record and field (or a counted skip).

Formats of benchmarks without a fixture (VQAv2, SEED, POPE, RACE, English listening, ClothoAQA,
Clotho, ActivityNet-QA) follow the LLaVA / Video-ChatGPT eval files those benchmarks ship as
(docs/design.md, "Benchmarks and scoring"): the field names are listed per benchmark below.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from unimoe.data import formats
from unimoe.eval import cider, graders, metrics

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
METRICS = ("vqa", "choice", "pope", "exact_match", "cider", "gpt")
PREDICTION_KEY = "prediction"
_MMBENCH_CIRCULAR_STRIDE = 1_000_000  # MMBench's rotated copies have index + k * 1e6


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    metric: str  # one of METRICS
    prompt_suffix: str  # appended to the last question unless it already ends with it
    answer_fields: tuple[str, ...]  # record fields holding the reference, first present wins
    category_fields: tuple[str, ...] = ()
    answers_file: str = ""  # the official annotations format read by --answers, if any
    circular: bool = False  # MMBench: rotated copies of a question count once
    # Uni-MoE's eval.py decodes VQA and multiple choice greedily, video with T=0.2 sampling.
    temperature: float = 0.0

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"{self.name}: metric {self.metric!r} not in {METRICS}")


def _vqa(name: str, title: str, answers_file: str = "vqa") -> Benchmark:
    return Benchmark(name, title, "vqa", SHORT_ANSWER, ("gt",), answers_file=answers_file)


def _choice(name: str, title: str, suffix: str = LETTER_ANSWER, **kw: Any) -> Benchmark:
    return Benchmark(name, title, "choice", suffix, ("answer",), ("category",), **kw)


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        # VQA: `gt` (10 answers) in the record, or the VQA annotations file
        # ({"annotations": [{"question_id", "answers": [{"answer"}]}]}) by question_id.
        _vqa("vqav2", "VQAv2"),
        _vqa("okvqa", "OK-VQA"),
        _vqa("aokvqa", "A-OKVQA"),
        # TextVQA 0.5.1 annotations ({"data": [...]}), matched as LLaVA's eval_textvqa does: the
        # record's question_id is the image id, its question the first line of `text`.
        _vqa("textvqa", "TextVQA", answers_file="textvqa"),
        # Options are lines "A.text" of the question; `answer` a letter (MMBench: a list of one),
        # `category` a name or a list. Uni-MoE's MMBench-1.1 file asks for a short answer.
        _choice("mmbench", "MMBench", SHORT_ANSWER, circular=True),
        _choice("seed", "SEED-Bench"),
        _choice("race", "RACE (speech)"),
        _choice("english_listening", "English High School Listening"),
        # `label` 'yes' / 'no', `category` random / popular / adversarial.
        Benchmark("pope", "POPE", "pope", SHORT_ANSWER, ("label", "answer"), ("category",)),
        # `gt` with <AND> / <OR>, `capability` a list; GPT-4 graded.
        Benchmark("mmvet", "MM-Vet", "gpt", "", ("gt",), ("capability",)),
        # `answer` (Video-ChatGPT's field); GPT-3.5 graded.
        Benchmark(
            "activitynet_qa",
            "ActivityNet-QA",
            "gpt",
            "",
            ("answer", "gt"),
            ("category",),
            temperature=0.2,
        ),
        # `answer` or `gt`: one answer or a list.
        Benchmark("clothoaqa", "ClothoAQA", "exact_match", SHORT_ANSWER, ("answer", "gt")),
        # `gt` or `captions`: the reference captions.
        Benchmark("clotho", "Clotho (captioning)", "cider", "", ("gt", "captions")),
    )
}


def get(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One record, the question the model is asked (suffix applied) and its references."""

    record: formats.Record
    raw: dict[str, Any]
    question: str
    reference: dict[str, Any]


def question_text(record: formats.Record) -> str:
    """The last question without media tags: what graders and answer files see."""
    text = record.conversations[-2 if len(record.conversations) % 2 == 0 else -1]["value"]
    text = re.sub(r"<(image|video|audio)>\n?", "", text)
    return text.strip()


def with_suffix(conversations: Sequence[dict[str, str]], suffix: str) -> list[dict[str, str]]:
    """The conversation with `suffix` on its last human turn (once: records that carry it keep it)."""
    turns = [dict(t) for t in conversations]
    last_human = max(i for i, t in enumerate(turns) if t["from"] == "human")
    value = turns[last_human]["value"].rstrip()
    if suffix and not value.endswith(suffix):
        turns[last_human]["value"] = f"{value}\n{suffix}"
    return turns


def read_answers_file(path: str | os.PathLike, kind: str) -> dict[Any, list[str]]:
    """An official annotations file: {key: answers}. `kind` 'vqa' keys by str(question_id),
    'textvqa' by (image_id, lowercased question)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    rows_key = {"vqa": "annotations", "textvqa": "data"}[kind]
    rows = data.get(rows_key) if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected {{{rows_key!r}: [...]}} ({kind} annotations)")
    out = {}
    for index, row in enumerate(rows):
        answers = row.get("answers") if isinstance(row, dict) else None
        if not isinstance(answers, list) or not answers:
            raise formats.RecordError(path, index, f"#{index}", "answers", "missing or empty")
        answers = [a["answer"] if isinstance(a, dict) else a for a in answers]
        try:
            key = (
                str(row["question_id"])
                if kind == "vqa"
                else (str(row["image_id"]), str(row["question"]).lower())
            )
        except KeyError as e:
            raise formats.RecordError(path, index, f"#{index}", str(e.args[0]), "missing") from None
        out[key] = [str(a) for a in answers]
    return out


def _answer_key(benchmark: Benchmark, record: formats.Record) -> Any:
    question_id = str(record.extra.get("question_id", record.id))
    if benchmark.answers_file == "textvqa":
        # LLaVA's prompt_processor: the question is the first line of the prompt.
        return (question_id, question_text(record).split("\n")[0].lower())
    return question_id


def _references(
    benchmark: Benchmark, record: formats.Record, answers: Mapping[Any, list[str]] | None
) -> dict[str, Any]:
    field, value = next(
        ((f, record.extra[f]) for f in benchmark.answer_fields if f in record.extra), (None, None)
    )
    if value is None and answers is not None:
        field, value = "answers file", answers.get(_answer_key(benchmark, record))
        if value is None:
            raise record.error("question_id", f"no entry {_answer_key(benchmark, record)!r}")
    if value is None:
        where = (
            f" (or pass its {benchmark.answers_file} answers file)"
            if benchmark.answers_file
            else ""
        )
        raise record.error("/".join(benchmark.answer_fields), f"no reference answer{where}")
    categories = next(
        (record.extra[f] for f in benchmark.category_fields if f in record.extra), None
    )
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str | int | float) for v in values):
        raise record.error(field, f"must be an answer or a list of answers, got {value!r:.80}")
    values = [str(v) for v in values]
    metric = benchmark.metric
    if metric == "vqa":
        if len(values) < 2:
            raise record.error(field, f"VQA accuracy needs the 10 human answers, got {values}")
        return {"answers": values}
    if metric == "choice":
        options = metrics.parse_options(question_text(record))
        if len(values) != 1 or values[0].strip().upper() not in options:
            raise record.error(field, f"answer {values} is not one of the options {list(options)}")
        ref = {"answer": values[0].strip().upper(), "options": options, "category": categories}
        if benchmark.circular:
            index = re.search(r"(\d+)$", record.id)
            ref["group"] = int(index.group()) % _MMBENCH_CIRCULAR_STRIDE if index else record.id
        return ref
    if metric == "pope":
        if len(values) != 1 or values[0].strip().lower() not in ("yes", "no"):
            raise record.error(field, f"POPE label must be 'yes' or 'no', got {value!r}")
        return {"label": values[0], "category": categories}
    if metric == "gpt":
        return {"answer": values[0], "categories": metrics.category_list(categories)}
    if metric == "cider":
        return {"captions": values}
    return {"answers": values, "category": categories}


def read_items(
    benchmark: Benchmark,
    path: str | os.PathLike,
    *,
    answers_path: str | os.PathLike | None = None,
    on_error: str = "raise",
) -> tuple[list[EvalItem], int]:
    """(items, number of bad records skipped) of an eval file; `on_error` 'raise' or 'skip'."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if answers_path and not benchmark.answers_file:
        raise ValueError(f"{benchmark.name} reads its references from the records, not a file")
    answers = read_answers_file(answers_path, benchmark.answers_file) if answers_path else None
    raws = formats.load_json_list(path)
    items, skipped = [], 0
    for index, parsed in enumerate(formats.iter_records(path)):
        try:
            if isinstance(parsed, formats.RecordError):
                raise parsed
            ref = _references(benchmark, parsed, answers)
        except formats.RecordError:
            if on_error == "raise":
                raise
            skipped += 1
            continue
        convs = tuple(with_suffix(parsed.conversations, benchmark.prompt_suffix))
        record = dataclasses.replace(parsed, conversations=convs)
        items.append(EvalItem(record, raws[index], question_text(parsed), ref))
    return items, skipped


def score_items(
    benchmark: Benchmark,
    items: Sequence[EvalItem],
    predictions: Sequence[str],
    grader: graders.Grader | None = None,
    protocol: str = "official",
) -> dict[str, Any]:
    """The benchmark's scores of `predictions` (one per item, in order); fractions in [0, 1].
    `protocol` picks the multiple-choice answer reading (`metrics.extract_choice`).

    `headline` names the key of the number a results table reports; GPT-graded benchmarks
    without a grader report the labelled exact-match proxy instead.
    """
    if len(items) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} items")
    if not items:
        raise ValueError(f"{benchmark.name}: nothing to score")
    rows = [{**item.reference, "prediction": p} for item, p in zip(items, predictions)]
    metric = benchmark.metric
    if metric == "vqa":
        per_item = [metrics.vqa_accuracy(r["prediction"], r["answers"]) for r in rows]
        scores = {"vqa_accuracy": sum(per_item) / len(per_item), "n": len(per_item)}
        headline = "vqa_accuracy"
    elif metric == "choice":
        scores = metrics.choice_scores(rows, circular=benchmark.circular, protocol=protocol)
        headline = "circular_accuracy" if benchmark.circular else "accuracy"
    elif metric == "pope":
        scores, headline = metrics.pope_scores(rows), "f1"
    elif metric == "exact_match":
        scores, headline = metrics.exact_match_scores(rows), "accuracy"
    elif metric == "cider":
        ids = [str(i) for i in range(len(rows))]
        corpus, _ = cider.cider_d(
            dict(zip(ids, predictions)), dict(zip(ids, [r["captions"] for r in rows]))
        )
        scores, headline = {"cider_d": corpus, "n": len(rows)}, "cider_d"
    elif grader is not None:
        questions = [{**r, "question": item.question} for r, item in zip(rows, items)]
        scores, headline = graders.graded_scores(grader, questions), "score"
    else:
        scores, headline = graders.proxy_scores(rows), "exact_match_proxy"
    return {"benchmark": benchmark.name, "metric": metric, "headline": headline, **scores}


def score_predictions_file(
    benchmark: Benchmark,
    path: str | os.PathLike,
    *,
    answers_path: str | os.PathLike | None = None,
    grader: graders.Grader | None = None,
) -> dict[str, Any]:
    """Scores a predictions file (the eval records, each with a `prediction` field)."""
    items, _ = read_items(benchmark, path, answers_path=answers_path)
    predictions = []
    for item in items:
        prediction = item.record.extra.get(PREDICTION_KEY)
        if not isinstance(prediction, str):
            raise item.record.error(PREDICTION_KEY, f"missing or not a string: {prediction!r:.80}")
        predictions.append(prediction)
    return score_items(benchmark, items, predictions, grader)
