"""Benchmark scorers against hand-computed cases and the fixtures' real answers."""

import json
import math
import pathlib

import numpy as np
import pytest

from unimoe.eval import cider, graders, metrics

FIXTURES = pathlib.Path(__file__).parent.parent / "data" / "fixtures" / "unimoe_formats"


def fixture(name: str):
    return json.loads((FIXTURES / name).read_text())


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two Dogs!", "2 dogs"),
        ("the cat", "cat"),
        ("dont", "don't"),
        ("u.s. army", "us army"),  # periods not before a digit go
        ("3.5", "3.5"),
        ("yes, it is", "yes it is"),
        ("black-and-white", "black and white"),  # a mark between letters splits the words
        ("x - y", "x y"),  # a mark beside a space is dropped
        ("cat's toy", "cat 's toy"),
        ("None", "0"),
        ("  A\tred\ncar ", "red car"),
    ],
)
def test_normalize_vqa_answer(text, expected):
    assert metrics.normalize_vqa_answer(text) == expected


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0)])
def test_vqa_accuracy_leave_one_out(matches, expected):
    # k of 10 annotators agree: the k subsets leaving one of them out see k-1 matches, the 10-k
    # others see k; e.g. k=3: (3 * 2/3 + 7 * 1) / 10 = 0.9.
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert metrics.vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalizes_both_sides():
    assert metrics.vqa_accuracy("Two.", ["2"] * 4 + ["3"] * 6) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.vqa_accuracy("cat", ["cat"])


def test_vqa_accuracy_on_fixture_answers():
    aokvqa = fixture("eval_aokvqa.json")
    assert metrics.vqa_accuracy("Cigarette.", aokvqa[0]["gt"]) == pytest.approx(1.0)
    # Record 1: 8 x "thirty", 2 x "30th".
    assert metrics.vqa_accuracy("30th", aokvqa[1]["gt"]) == pytest.approx(0.6)
    assert metrics.vqa_accuracy("thirty", aokvqa[1]["gt"]) == pytest.approx(1.0)
    textvqa = fixture("textvqa_annotations_val.json")["data"][0]["answers"]
    # 5 x "dakota", 3 x "dakota digital", 1 x "nous les gosses".
    assert metrics.vqa_accuracy("Dakota", textvqa) == pytest.approx(1.0)
    assert metrics.vqa_accuracy("dakota digital", textvqa) == pytest.approx(0.9)
    assert metrics.vqa_accuracy("nous les gosses", textvqa) == pytest.approx(0.3)
    assert metrics.vqa_accuracy("canon", textvqa) == 0.0


OPTIONS = {"A": "a cat", "B": "a dog", "C": "a bird"}


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("B", "B"),
        ("(B) a dog", "B"),
        ("The answer is B.", "B"),
        ("C. a bird", "C"),
        ("It is a dog", "B"),  # no letter: the one option text it contains
        ("A or B", None),  # two letters
        ("I cannot tell", None),
        ("a cat or a dog", None),  # two option texts
        ("b", None),  # letters are matched case-sensitively, as VLMEvalKit
    ],
)
def test_extract_choice(prediction, expected):
    assert metrics.extract_choice(prediction, OPTIONS) == expected


def test_parse_options_of_the_mmbench_fixture():
    record = fixture("eval_mmbench11.json")[3]
    options = metrics.parse_options(record["conversations"][0]["value"])
    assert options == {
        "A": "the distance the footballs traveled",
        "B": "the air pressure in the footballs",
    }
    assert metrics.parse_options("A. x\nnot an option\nA. y\nB. z") == {"A": "y", "B": "z"}


def test_choice_scores_per_category_and_circular():
    items = [
        {
            "prediction": "A",
            "answer": "A",
            "options": OPTIONS,
            "category": ["x", "all"],
            "group": 1,
        },
        {
            "prediction": "B",
            "answer": "A",
            "options": OPTIONS,
            "category": ["x", "all"],
            "group": 1,
        },
        {
            "prediction": "C",
            "answer": "C",
            "options": OPTIONS,
            "category": ["y", "all"],
            "group": 2,
        },
        {"prediction": "??", "answer": "B", "options": OPTIONS, "category": "y", "group": 3},
    ]
    scores = metrics.choice_scores(items, circular=True)
    assert scores["accuracy"] == pytest.approx(0.5)
    assert scores["per_category"] == {"all": pytest.approx(2 / 3), "x": 0.5, "y": 0.5}
    # Group 1 has a wrong copy, group 3 is wrong: only group 2 counts.
    assert scores["circular_accuracy"] == pytest.approx(1 / 3)
    assert "circular_accuracy" not in metrics.choice_scores(items)


def test_pope_scores_hand_computed():
    predictions = ["Yes, there is.", "No.", "There is not a dog.", "yes", "Yes. No doubt."]
    labels = ["yes", "yes", "no", "no", "yes"]
    items = [
        {"prediction": p, "label": y, "category": c}
        for p, y, c in zip(predictions, labels, ["r", "r", "r", "a", "a"])
    ]
    scores = metrics.pope_scores(items)
    # predicted yes: T F F T T -> TP 2, FN 1, TN 1, FP 1
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["yes_ratio"] == pytest.approx(3 / 5)
    assert scores["per_category"]["a"]["accuracy"] == pytest.approx(0.5)
    assert scores["per_category"]["r"]["recall"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        metrics.pope_scores([{"prediction": "yes", "label": "maybe"}])


def test_exact_match_scores_use_the_shared_normalization():
    items = [
        {"prediction": "The dog.", "answers": ["dog"], "category": "a"},
        {"prediction": "two", "answers": ["3", "2"], "category": "a"},
        {"prediction": "cats", "answers": ["cat"], "category": "b"},
    ]
    scores = metrics.exact_match_scores(items)
    assert scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["per_category"] == {"a": 1.0, "b": 0.0}


def test_ptb_tokenize():
    assert cider.ptb_tokenize("Don't stop.") == ["do", "n't", "stop"]
    assert cider.ptb_tokenize("The dog's ball, (red)!") == ["the", "dog", "'s", "ball", "red"]
    assert cider.ptb_tokenize("A black-and-white cat...") == ["a", "black-and-white", "cat"]


def test_cider_d_hand_computed():
    refs = {"1": ["A cat."], "2": ["a dog"]}
    # Two images: IDF log(2) - log(df); "a" is in both reference sets (weight 0), every other
    # n-gram in one. An exact copy has cosine 1 for n=1, 2 and no 3-, 4-grams: (1 + 1) / 4 * 10.
    corpus, per_image = cider.cider_d({"1": "a cat", "2": "a dog"}, refs)
    assert per_image == {"1": pytest.approx(5.0), "2": pytest.approx(5.0)}
    assert corpus == pytest.approx(5.0)
    # "cat": unigram cosine 1, no bigram; length (bigram count) 0 vs 1 -> penalty e^(-1/72).
    _, per_image = cider.cider_d({"1": "cat", "2": "a dog"}, refs)
    assert per_image["1"] == pytest.approx(2.5 * math.exp(-1 / 72))
    with pytest.raises(ValueError, match="no reference"):
        cider.cider_d({"3": "x"}, refs)


def test_cider_d_matches_coco_caption_scorer():
    # coco-caption's scorer on the same tokens (its Java PTB tokenizer replaced by ours).
    from pycocoevalcap.cider.cider import Cider

    rng = np.random.default_rng(0)
    words = "a the dog cat runs sits on grass red ball two men play in park".split()

    def caption() -> str:
        return " ".join(rng.choice(words, size=rng.integers(3, 10)))

    predictions = {str(i): caption() for i in range(12)}
    references = {str(i): [caption() for _ in range(rng.integers(1, 6))] for i in range(12)}
    predictions["0"] = references["0"][0]  # an exact copy
    corpus, per_image = cider.cider_d(predictions, references)
    tokens = lambda text: " ".join(cider.ptb_tokenize(text))  # noqa: E731
    expected, expected_per_image = Cider().compute_score(
        {k: [tokens(r) for r in v] for k, v in references.items()},
        {k: [tokens(v)] for k, v in predictions.items()},
    )
    assert corpus == pytest.approx(expected, rel=1e-12)
    assert [per_image[k] for k in predictions] == pytest.approx(list(expected_per_image), rel=1e-12)
    assert corpus > 0.1


def test_mmvet_grading_prompt_and_a_pluggable_grader():
    record = fixture("eval_mmvet.json")[0]  # gt "-1<AND>-5"
    seen = []

    def complete(messages):
        seen.append(messages)
        # A stand-in model that reads the row it is asked to complete.
        row = messages[-1]["content"].rsplit("\n", 1)[-1]
        return "1.0" if "-1 or x = -5" in row else "0.0"

    grader = graders.ChatGrader("mmvet", complete)
    items = [
        {"question": record["text"], "answer": record["gt"], "prediction": p, "categories": ["ocr"]}
        for p in ("x = -1 or x = -5", "x = 3")
    ]
    scores = graders.graded_scores(grader, items)
    assert scores["score"] == pytest.approx(0.5) and scores["per_category"] == {"ocr": 0.5}
    prompt = seen[0][0]["content"]
    assert prompt.startswith(graders.MMVET_PROMPT)
    assert prompt.endswith("What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | ")


def test_activitynet_reply_parsing():
    messages = graders.activitynet_messages("What?", "a ball", "ball")
    assert messages[0]["role"] == "system"
    assert "Correct Answer: a ball\nPredicted Answer: ball" in messages[1]["content"]
    assert graders.parse_activitynet_reply("{'pred': 'yes', 'score': 4}") == 1.0
    assert graders.parse_activitynet_reply(" {'pred': 'no', 'score': 1} ") == 0.0
    with pytest.raises(ValueError, match="pred"):
        graders.parse_activitynet_reply("yes, 4")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        graders.parse_mmvet_reply("7")


def test_exact_match_proxy_is_labelled_and_reads_and_or():
    assert graders.proxy_match("x = -1 or x = -5", "-1<AND>-5")
    assert not graders.proxy_match("x = -1", "-1<AND>-5")
    assert graders.proxy_match("d is 5/4", "1.25<OR>=1.25<OR>5/4")
    scores = graders.proxy_scores(
        [{"prediction": "x = -1", "answer": "-1<OR>-5", "categories": ["math"]}]
    )
    assert scores["exact_match_proxy"] == 1.0
    assert scores["metric_label"] == graders.PROXY_LABEL and "proxy" in graders.PROXY_LABEL
    assert all("proxy" in key for key in scores if key not in ("n", "metric_label"))
