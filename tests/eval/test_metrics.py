"""Benchmark scorers against hand-computed cases and the fixtures' real answers."""

import json
import pathlib

import pytest

from unimoe.eval import graders, metrics

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


OPTIONS = {"A": "a cat", "B": "a dog", "C": "a bird"}  # option texts: 16 characters in all
YES_NO = {"A": "Yes", "B": "No"}
LONG = {"A": "the distance the footballs traveled", "B": "the air pressure in the footballs"}
BIRD_CAT = {"A": "bird in the sky", "B": "cat on the mat"}


# Hand-checked against VLMEvalKit's matching_util.py (commit e8e78f05): `can_infer_option` reads
# letters from the words left after .()[],:;!*#{} become spaces; `can_infer_text` the option texts.
@pytest.mark.parametrize(
    "prediction, options, expected",
    [
        ("B", OPTIONS, "B"),
        ("B.", OPTIONS, "B"),
        ("(B) a dog", OPTIONS, "B"),
        ("[B]", OPTIONS, "B"),
        ("{C}", OPTIONS, "C"),
        ("C. a bird", OPTIONS, "C"),
        ("B: a dog", OPTIONS, "B"),
        ("Option C", OPTIONS, "C"),
        ("The answer is B.", OPTIONS, "B"),
        ("B B B", OPTIONS, "B"),  # one letter, however often
        ("A or Z", OPTIONS, "A"),  # Z only counts without an option letter
        ("I think B is it", OPTIONS, "B"),  # B is the 3rd of 5 words: among the last four
        ("B is right, I think so too", OPTIONS, None),  # 1st of 7 words: too early
        ("A cat, not B", OPTIONS, "A"),  # two letters: the option texts decide
        ("A or B", OPTIONS, None),  # two letters, no option text
        ("A DOG", OPTIONS, "A"),  # a capital "A" is a letter word
        ("It is a dog", OPTIONS, "B"),  # no letter: the one option text inside
        ("Bob has a dog", OPTIONS, "B"),  # a letter inside a word is no letter
        ("ABC", OPTIONS, None),
        ("b", OPTIONS, None),  # letters are capitals only
        ("a cat or a dog", OPTIONS, None),  # two option texts
        ("Looking closely at the picture it is a dog", OPTIONS, None),  # 42 > 2 * 16 characters
        ("D", OPTIONS, None),  # not an option
        ("Z", OPTIONS, None),  # VLMEvalKit's "no answer" letter
        ("Z. a dog", OPTIONS, None),  # ... decided before the option texts are read
        ("Cannot determine the answer", YES_NO, None),  # a refusal, though "no" is in "cannot"
        ("Cannot determine the answer, so A", YES_NO, None),  # a refusal wins over a letter
        ("I'm sorry, but without the image provided I guess A", YES_NO, None),
        ("Yes", YES_NO, "A"),
        ("no", YES_NO, "B"),
        ("Failed to obtain answer via API. B", LONG, None),  # API failure: no letters read
        ("Failed to obtain answer via API: the air pressure in the footballs", LONG, "B"),
        ("The answer is **B** because the dog is barking loudly", OPTIONS, "B"),  # "answer is"
        ("The correct answer is (C), as the bird on the left is flying", OPTIONS, None),
        ("the answer is b", OPTIONS, "B"),  # "answer is X" is case-insensitive upstream ...
        ("The answer is a dog", OPTIONS, "A"),  # ... so the article reads as A
        ("the answer is bird in the sky", BIRD_CAT, "B"),  # ... and the "b" of "bird" as B
    ],
)
def test_extract_choice_official(prediction, options, expected):
    assert metrics.extract_choice(prediction, options) == expected


@pytest.mark.parametrize(
    "prediction, options, expected",
    [
        ("the answer is b", OPTIONS, None),
        ("The answer is a dog", OPTIONS, "B"),  # the option text instead
        ("the answer is bird in the sky", BIRD_CAT, "A"),
        ("The answer is **B** because the dog is barking loudly", OPTIONS, "B"),
        ("The answer is C", OPTIONS, "C"),
    ],
)
def test_extract_choice_ours_reads_only_a_capital_after_answer_is(prediction, options, expected):
    assert metrics.extract_choice(prediction, options, protocol="ours") == expected


def test_parse_options_of_the_mmbench_fixture():
    record = fixture("eval_mmbench11.json")[3]
    options = metrics.parse_options(record["conversations"][0]["value"])
    assert options == {
        "A": "the distance the footballs traveled",
        "B": "the air pressure in the footballs",
    }
    assert metrics.parse_options("A. x\nnot an option\nA. y\nB. z") == {"A": "y", "B": "z"}


def test_choice_scores_per_category_and_circular():
    rows = [  # (prediction, answer, options, category, group); correct? by the table above
        ("A", "A", OPTIONS, "x", 1),  # yes
        ("The answer is C.", "C", OPTIONS, "x", 1),  # yes -> group 1 right
        ("A cat, not B", "A", OPTIONS, "x", 2),  # yes (by the option text)
        ("b", "B", OPTIONS, "x", 2),  # no -> group 2 wrong
        ("Cannot determine the answer", "A", YES_NO, "y", 3),  # no (a refusal)
        ("Yes", "A", YES_NO, "y", 3),  # yes -> group 3 wrong
        ("It is a bird", "C", OPTIONS, "y", 4),  # yes
        ("b", "B", OPTIONS, "y", 4),  # no -> group 4 wrong
        ("C", "C", OPTIONS, "y", None),  # yes, a group of its own
    ]
    items = [
        {"prediction": p, "answer": a, "options": o, "category": [c, "all"]}
        | ({} if g is None else {"group": g})
        for p, a, o, c, g in rows
    ]
    scores = metrics.choice_scores(items, circular=True)
    assert scores["accuracy"] == pytest.approx(6 / 9)
    assert scores["per_category"] == {
        "all": pytest.approx(6 / 9), "x": pytest.approx(3 / 4), "y": pytest.approx(3 / 5)
    }
    # Groups 1 and the lone item are right: 2 of 5; x: 1 of groups 1, 2; y: 1 of 3, 4, lone.
    assert scores["circular_accuracy"] == pytest.approx(2 / 5)
    assert scores["circular_groups"] == 5
    assert scores["circular_per_category"] == {
        "all": pytest.approx(2 / 5), "x": pytest.approx(1 / 2), "y": pytest.approx(1 / 3)
    }
    assert "circular_accuracy" not in metrics.choice_scores(items)
    with pytest.raises(ValueError, match="protocol must be one of"):
        metrics.choice_scores(items, protocol="vlmevalkit")


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


def test_pope_scores_where_llava_divides_by_zero_are_zero():
    # No "yes" prediction: LLaVA's eval_pope.py raises ZeroDivisionError for the precision.
    items = [{"prediction": "No.", "label": y} for y in ("yes", "no", "no")]
    scores = metrics.pope_scores(items)
    assert (scores["precision"], scores["recall"], scores["f1"]) == (0.0, 0.0, 0.0)
    assert scores["accuracy"] == pytest.approx(2 / 3) and scores["yes_ratio"] == 0.0


def test_exact_match_scores_use_the_shared_normalization():
    items = [
        {"prediction": "The dog.", "answers": ["dog"], "category": "a"},
        {"prediction": "two", "answers": ["3", "2"], "category": "a"},
        {"prediction": "cats", "answers": ["cat"], "category": "b"},
    ]
    scores = metrics.exact_match_scores(items)
    assert scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["per_category"] == {"a": 1.0, "b": 0.0}


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
