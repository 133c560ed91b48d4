"""Benchmark scorers, each following its benchmark's official protocol (docs/design.md,
"Benchmarks and scoring").

- `vqa_accuracy`: VQA soft accuracy with EvalAI's answer normalization, as the reference's
  TextVQA scorer (`m4c_evaluator.py`, LLaVA's `EvalAIAnswerProcessor` +
  `TextVQAAccuracyEvaluator`) computes it; VQAv2, OK-VQA, A-OKVQA and TextVQA;
- `extract_choice` / `choice_scores`: option letters read from free text as VLMEvalKit's
  `can_infer` does (commit e8e78f05, `vlmeval/utils/matching_util.py`), accuracy overall and per
  category, MMBench circular accuracy as its `mcq_circular_eval` without a judge model;
- `pope_scores`: LLaVA's POPE yes/no reading; accuracy, precision, recall, F1, yes-ratio (0.0
  where LLaVA's script divides by zero);
- `exact_match_scores`: `unimoe.eval.scoring`'s normalization (ClothoAQA, audio / video QA).
CIDEr-D is in `unimoe.eval.cider`, the GPT-graded benchmarks in `unimoe.eval.graders`.
Every score here is a fraction in [0, 1]; tables print percent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from unimoe import config as config_lib
from unimoe.eval import scoring

# --- VQA soft accuracy ---------------------------------------------------------------------------

# EvalAI's tables (VQA eval script, m4c_evaluator.EvalAIAnswerProcessor): a contraction written
# without its apostrophe -> with it; number words -> digits.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBER_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_VQA_ARTICLES = ("a", "an", "the")
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
# The published pattern, typo included: `(?!<=\d)` is a lookahead for the text "<=digit", not a
# lookbehind, so a period goes unless a digit follows it ("3.5" stays, "u.s." -> "us").
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_VQA_ANNOTATORS_LEFT_OUT = 3  # min(1, matches / 3)


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATION:
        # A mark next to a space (or any digit,digit in the text) is dropped, else it splits words.
        if f"{p} " in text or f" {p}" in text or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The scripts pass re.UNICODE (32) as `count`: at most 32 periods are stripped.
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _VQA_ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """EvalAI's answer processor: 'Two Dogs!' -> '2 dogs', "dont" -> "don't", 'u.s.' -> 'us'."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy of one prediction against the human answers (10 in every VQA dataset).

    Both sides are normalized; for each answer left out, the score is min(1, #matches among the
    others / 3); the result is the mean over the leave-one-out subsets. With 10 answers: 1 match
    -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0.
    """
    if len(answers) < 2:
        raise ValueError(f"vqa_accuracy needs at least 2 reference answers, got {list(answers)}")
    pred = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(a) == pred for a in answers]
    total = sum(matches)
    per_subset = [min(1.0, (total - left_out) / _VQA_ANNOTATORS_LEFT_OUT) for left_out in matches]
    return sum(per_subset) / len(per_subset)


# --- Multiple choice ----------------------------------------------------------------------------

# The answer reading of each evaluation protocol (`unimoe.eval.protocol`).
PROTOCOLS = config_lib.EVAL_PROTOCOLS
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.:)]\s*(.+?)\s*$")
# VLMEvalKit's matching_util.py as of commit e8e78f05 (2026-08-18), `can_infer` and the two steps
# it chains; docs/design.md "Benchmarks and scoring" says what each rule does to real answers.
_CHOICE_SEPARATORS = ".()[],:;!*#{}"
_API_FAILURE = "Failed to obtain answer via API"
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_NO_ANSWER = "Z"  # VLMEvalKit's letter for "the model declined": never a correct option
# "The answer is **B**": case-insensitive and unbounded upstream, so "the answer is a dog" -> A.
_VERBOSE_ANSWER = {
    "official": re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**"),
    # ours: the letter must be a capital standing alone, as in the letter step.
    "ours": re.compile(r"(?i:(?:correct\s+)?answer\s+is\s+)\**([ABCD])(?![A-Za-z0-9])"),
}


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def parse_options(question: str) -> dict[str, str]:
    """{'A': text, ...} from the option lines of a question ("A.text", "A. text", "(A) text").

    Only the last run of consecutive letters A, B, C... counts, so a passage line that happens to
    start with "A." is not read as an option.
    """
    options: dict[str, str] = {}
    for line in question.splitlines():
        match = _OPTION_LINE.match(line)
        if not match:
            continue
        letter, text = match.groups()
        if letter == "A":
            options = {}
        if letter == chr(ord("A") + len(options)):
            options[letter] = text
    return options


def _choice_by_letter(prediction: str, options: Mapping[str, str], protocol: str) -> str | None:
    """VLMEvalKit's `can_infer_option`: an option letter, `_NO_ANSWER`, or None (try the texts)."""
    if _API_FAILURE in prediction:
        return None
    if any(refusal in prediction for refusal in _REFUSALS):
        return _NO_ANSWER
    words = prediction
    for c in _CHOICE_SEPARATORS:
        words = words.replace(c, " ")
    tokens = words.split()
    named = [letter for letter in options if letter in tokens]
    # One letter, first seen among the last four words ("B", "(B) cat", "The answer is B.").
    if len(named) == 1 and tokens.index(named[0]) > len(tokens) - 5:
        return named[0]
    if not named and _NO_ANSWER in tokens:
        return _NO_ANSWER
    match = _VERBOSE_ANSWER[protocol].search(prediction)
    if match and match.group(1).upper() in options:
        return match.group(1).upper()
    return None


def _choice_by_text(prediction: str, options: Mapping[str, str]) -> str | None:
    """VLMEvalKit's `can_infer_text`: the one option whose text is inside a short enough answer."""
    lowered = prediction.lower()
    if len(lowered) > 2 * sum(len(text) for text in options.values()):
        return None
    found = [letter for letter, text in options.items() if text.lower() in lowered]
    return found[0] if len(found) == 1 else None


def extract_choice(
    prediction: str, options: Mapping[str, str], *, protocol: str = "official"
) -> str | None:
    """The option letter a free-text answer gives, or None (VLMEvalKit's `can_infer`).

    Letters first (case-sensitive, punctuation read as spaces): exactly one option letter among
    the words, first seen in the last four words; else an "answer is X" phrase. A refusal (a
    phrase like "Cannot determine the answer" anywhere, or a word "Z" and no option letter) is
    None at once. Otherwise the option texts: exactly one occurring (lowercased substring) in an
    answer at most twice as long as all option texts together. Anything else (no option,
    several) is None, counted as wrong. `protocol` 'ours' only reads "answer is X" with X a
    capital standing alone (`_VERBOSE_ANSWER`); 'official' is VLMEvalKit's.
    """
    check_protocol(protocol)
    letter = _choice_by_letter(prediction, options, protocol)
    if letter == _NO_ANSWER:
        return None
    return letter or _choice_by_text(prediction, options)


def category_list(value: Any) -> list[str]:
    """A record's category field (absent, one name or a list) as a list of names."""
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _per_category(items: Sequence[Mapping[str, Any]], correct: Sequence[bool]) -> dict[str, float]:
    per_category: dict[str, list[bool]] = {}
    for item, ok in zip(items, correct, strict=True):
        for category in category_list(item.get("category")):
            per_category.setdefault(category, []).append(ok)
    return {c: sum(v) / len(v) for c, v in sorted(per_category.items())}


def choice_scores(
    items: Iterable[Mapping[str, Any]], *, circular: bool = False, protocol: str = "official"
) -> dict[str, Any]:
    """Accuracy of `{prediction, answer (letter), options, category?, group?}` items.

    `category` (a name or a list: MMBench gives the fine and the coarse one) adds per-category
    accuracy. With `circular`, items sharing a `group` (MMBench's rotated copies of one question)
    count once, correct only if every copy's extracted letter is its answer, as VLMEvalKit's
    `mcq_circular_eval` without a judge model: `circular_accuracy` and, by the group's first
    item's categories, `circular_per_category`. `protocol`: see `extract_choice`.
    """
    check_protocol(protocol)
    items = list(items)
    if not items:
        raise ValueError("choice_scores: no items")
    correct = [
        extract_choice(item["prediction"], item["options"], protocol=protocol)
        == str(item["answer"]).strip().upper()
        for item in items
    ]
    out: dict[str, Any] = {
        "accuracy": sum(correct) / len(correct),
        "n": len(correct),
        "per_category": _per_category(items, correct),
    }
    if circular:
        groups: dict[Any, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.get("group", ("item", i)), []).append(i)
        group_ok = [all(correct[i] for i in members) for members in groups.values()]
        out["circular_accuracy"] = sum(group_ok) / len(groups)
        out["circular_groups"] = len(groups)
        firsts = [items[members[0]] for members in groups.values()]
        out["circular_per_category"] = _per_category(firsts, group_ok)
    return out


# --- POPE ---------------------------------------------------------------------------------------


def pope_answer(prediction: str) -> str:
    """LLaVA's POPE reading: the first sentence says 'no' if it has the word No / no / not."""
    first = prediction.split(".")[0] if "." in prediction else prediction
    words = first.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def _binary_scores(predicted_yes: Sequence[bool], label_yes: Sequence[bool]) -> dict[str, float]:
    pairs = list(zip(predicted_yes, label_yes, strict=True))
    tp = sum(p and y for p, y in pairs)
    fp = sum(p and not y for p, y in pairs)
    fn = sum(not p and y for p, y in pairs)
    tn = len(pairs) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(predicted_yes) / len(pairs),
        "n": len(pairs),
    }


def pope_scores(items: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """POPE metrics of `{prediction, label ('yes'/'no'), category?}` items, 'yes' the positive
    class, overall and per category (POPE's random / popular / adversarial splits).

    As LLaVA's `eval_pope.py`, except where it divides by zero and stops (no 'yes' predicted:
    precision; no 'yes' label: recall; both 0: F1): those are 0.0 here, so a split a model
    answers all 'no' scores F1 0 instead of ending the run.
    """
    items = list(items)
    if not items:
        raise ValueError("pope_scores: no items")
    predicted = [pope_answer(item["prediction"]) == "yes" for item in items]
    labels = []
    for item in items:
        label = str(item["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"pope_scores: label must be 'yes' or 'no', got {item['label']!r}")
        labels.append(label == "yes")
    out: dict[str, Any] = _binary_scores(predicted, labels)
    per_category: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        for category in category_list(item.get("category")):
            per_category.setdefault(category, []).append(i)
    out["per_category"] = {
        c: _binary_scores([predicted[i] for i in idx], [labels[i] for i in idx])
        for c, idx in sorted(per_category.items())
    }
    return out


# --- Exact match --------------------------------------------------------------------------------


def exact_match_scores(items: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Exact-match accuracy of `{prediction, answers (list), category?}` items: correct if the
    normalized prediction equals any normalized reference (`scoring.normalize_answer`)."""
    correct, per_category = [], {}
    for item in items:
        ok = any(scoring.exact_match(item["prediction"], a) for a in item["answers"])
        correct.append(ok)
        for category in category_list(item.get("category")):
            per_category.setdefault(category, []).append(ok)
    if not correct:
        raise ValueError("exact_match_scores: no items")
    return {
        "accuracy": sum(correct) / len(correct),
        "n": len(correct),
        "per_category": {c: sum(v) / len(v) for c, v in sorted(per_category.items())},
    }
