"""The benchmark registry reads the real eval files, their official answers, and rejects bad records."""

import json
import pathlib

import pytest

from unimoe.data import formats
from unimoe.eval import benchmarks, metrics

FIXTURES = pathlib.Path(__file__).parent.parent / "data" / "fixtures" / "unimoe_formats"


def test_every_fixture_reads_with_its_references():
    aokvqa, skipped = benchmarks.read_items(benchmarks.get("aokvqa"), FIXTURES / "eval_aokvqa.json")
    assert skipped == 0 and len(aokvqa) == 25
    assert aokvqa[0].reference == {"answers": ["cigarette"] * 10}
    # The records already carry the short-answer suffix: it is not added twice.
    assert aokvqa[0].record.conversations[0]["value"].count(benchmarks.SHORT_ANSWER) == 1

    textvqa, _ = benchmarks.read_items(
        benchmarks.get("textvqa"),
        FIXTURES / "eval_textvqa_llava.json",
        answers_path=FIXTURES / "textvqa_annotations_val.json",
    )
    annotations = json.loads((FIXTURES / "textvqa_annotations_val.json").read_text())["data"]
    assert len(textvqa) == 25
    assert textvqa[0].reference["answers"] == annotations[0]["answers"]

    mmbench, _ = benchmarks.read_items(benchmarks.get("mmbench"), FIXTURES / "eval_mmbench11.json")
    assert mmbench[0].reference["answer"] == "B"
    assert set(mmbench[0].reference["options"]) == {"A", "B"}
    assert mmbench[0].reference["category"] == ["identity_reasoning", "attribute_reasoning"]
    assert mmbench[0].reference["group"] == 241

    mmvet, _ = benchmarks.read_items(benchmarks.get("mmvet"), FIXTURES / "eval_mmvet.json")
    assert mmvet[0].reference == {"answer": "-1<AND>-5", "categories": ["ocr", "math"]}
    assert mmvet[0].question == "What is x in the equation?"


def test_okvqa_needs_its_answers_file(tmp_path):
    bench = benchmarks.get("okvqa")
    with pytest.raises(formats.RecordError, match=r"record 0 .*field 'gt'.*answers file"):
        benchmarks.read_items(bench, FIXTURES / "eval_okvqa.json")
    records = json.loads((FIXTURES / "eval_okvqa.json").read_text())
    annotations = {
        "annotations": [
            {"question_id": r["question_id"], "answers": [{"answer": f"a{i}"}] * 10}
            for i, r in enumerate(records)
        ]
    }
    path = tmp_path / "mscoco_val2014_annotations.json"
    path.write_text(json.dumps(annotations))
    items, _ = benchmarks.read_items(bench, FIXTURES / "eval_okvqa.json", answers_path=path)
    assert items[3].reference == {"answers": ["a3"] * 10}


def test_bad_records_name_file_record_and_field_or_are_counted(tmp_path):
    records = json.loads((FIXTURES / "eval_aokvqa.json").read_text())[:4]
    del records[1]["gt"]
    records[2]["gt"] = ["only one"]
    records[3]["conversations"] = "not a list"
    path = tmp_path / "bad_aokvqa.json"
    path.write_text(json.dumps(records))
    bench = benchmarks.get("aokvqa")
    with pytest.raises(formats.RecordError, match=r"bad_aokvqa.json: record 1 .*field 'gt'"):
        benchmarks.read_items(bench, path)
    items, skipped = benchmarks.read_items(bench, path, on_error="skip")
    assert (len(items), skipped) == (1, 3)

    mmbench = json.loads((FIXTURES / "eval_mmbench11.json").read_text())[:1]
    mmbench[0]["answer"] = ["E"]
    path.write_text(json.dumps(mmbench))
    with pytest.raises(formats.RecordError, match=r"field 'answer'.*not one of the options"):
        benchmarks.read_items(benchmarks.get("mmbench"), path)


def test_a_missing_suffix_is_added_to_the_last_question(tmp_path):
    records = json.loads((FIXTURES / "eval_mmvet.json").read_text())[:1]
    records[0]["label"] = "yes"
    path = tmp_path / "pope.json"
    path.write_text(json.dumps(records))
    (item,), _ = benchmarks.read_items(benchmarks.get("pope"), path)
    assert item.record.conversations[0]["value"] == (
        f"<image>\nWhat is x in the equation?\n{benchmarks.SHORT_ANSWER}"
    )
    assert item.question == "What is x in the equation?"


def test_scores_of_a_predictions_file_match_the_metric(tmp_path):
    records = json.loads((FIXTURES / "eval_aokvqa.json").read_text())
    predictions = ["cigarette", "30th", "nothing"] + [r["gt"][0] for r in records[3:]]
    path = tmp_path / "aokvqa.predictions.json"
    path.write_text(json.dumps([{**r, "prediction": p} for r, p in zip(records, predictions)]))
    scores = benchmarks.score_predictions_file(benchmarks.get("aokvqa"), path)
    expected = [metrics.vqa_accuracy(p, r["gt"]) for p, r in zip(predictions, records)]
    assert scores["headline"] == "vqa_accuracy" and scores["n"] == 25
    assert scores["vqa_accuracy"] == pytest.approx(sum(expected) / 25)
    assert scores["vqa_accuracy"] < 1.0
    del records[0]["gt"]
    path.write_text(json.dumps(records))
    with pytest.raises(formats.RecordError, match="field 'gt'"):
        benchmarks.score_predictions_file(benchmarks.get("aokvqa"), path)


def test_unknown_benchmark_and_an_answers_file_it_does_not_read():
    with pytest.raises(ValueError, match="known:.*aokvqa"):
        benchmarks.get("gqa")
    with pytest.raises(ValueError, match="mmvet reads its references from the records"):
        benchmarks.read_items(
            benchmarks.get("mmvet"),
            FIXTURES / "eval_mmvet.json",
            answers_path=FIXTURES / "textvqa_annotations_val.json",
        )


def _record(i: int, question: str, **fields) -> dict:
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": ""}]
    return {"question_id": i, "conversations": turns, **fields}


def test_benchmarks_without_fixtures_read_and_score(tmp_path):
    cases = {
        "seed": [
            _record(0, "Color?\nA. red\nB. blue", answer="B", category="color"),
            _record(1, "Count?\nA. 1\nB. 2", answer="A", category="count"),
        ],
        "pope": [
            _record(0, "Is there a dog?", label="yes", category="random"),
            _record(1, "Is there a cat?", label="no", category="random"),
        ],
        "clotho": [
            _record(0, "<audio>\nDescribe.", voice=["/a.wav"], gt=["rain falls", "it rains"]),
            _record(1, "<audio>\nDescribe.", voice=["/b.wav"], gt=["a dog barks"]),
        ],
    }
    predictions = {
        "seed": ["The answer is B.", "B"],
        "pope": ["Yes, there is.", "Yes."],
        "clotho": ["rain falls", "a dog barks"],
    }
    for name, records in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(records))
        bench = benchmarks.get(name)
        items, _ = benchmarks.read_items(bench, path)
        assert items[0].record.conversations[0]["value"].endswith(bench.prompt_suffix)
        scores = benchmarks.score_items(bench, items, predictions[name])
        if name == "seed":
            assert scores["accuracy"] == 0.5
            assert scores["per_category"] == {"color": 1.0, "count": 0.0}
        elif name == "pope":
            assert (scores["accuracy"], scores["precision"], scores["yes_ratio"]) == (0.5, 0.5, 1.0)
        else:
            # Every n-gram is in one image's references: IDF log 2 for all. Image 0 copies one
            # of its two references (cosine 1 for n=1, 2; the other reference shares nothing):
            # 2 / 4 / 2 refs * 10 = 2.5; image 1 copies its 3-word reference: 3 / 4 * 10 = 7.5.
            assert scores["cider_d"] == pytest.approx(5.0) and scores["headline"] == "cider_d"


def test_a_bad_annotations_row_names_the_annotations_file(tmp_path):
    data = json.loads((FIXTURES / "textvqa_annotations_val.json").read_text())
    del data["data"][2]["answers"]
    path = tmp_path / "textvqa_annotations.json"
    path.write_text(json.dumps(data))
    with pytest.raises(
        formats.RecordError, match=r"textvqa_annotations.json: record 2 .*'answers'"
    ):
        benchmarks.read_items(
            benchmarks.get("textvqa"), FIXTURES / "eval_textvqa_llava.json", answers_path=path
        )
