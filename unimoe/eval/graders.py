"""GPT-graded benchmarks (MM-Vet, ActivityNet-QA): the official grading prompts, a pluggable
grader, and an exact-match proxy for offline runs that is labelled as a proxy wherever it appears.

No GPT model is reachable offline. A user with one wraps it as a `Grader` (`ChatGrader` turns any
`complete(messages) -> reply text` function into one, with the official prompt and reply
parsing); `graded_scores` then gives the official numbers. Without a grader, `proxy_scores`
gives the exact-match proxy under keys and labels that say `proxy`.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from unimoe.eval import scoring

PROXY_LABEL = "exact-match proxy, not the GPT-graded score"

# MM-Vet's few-shot grading prompt (github.com/yuweihao/MM-Vet, mm-vet_evaluator), to which the
# question, the ground truth (<AND>/<OR> spaced out) and the prediction are appended as a row.
MMVET_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""  # noqa: E501

# Video-ChatGPT's zero-shot QA grading (evaluate_activitynet_qa.py): a system and a user message;
# the reply is a Python dict {'pred': 'yes'|'no', 'score': 0..5}; accuracy is the share of 'yes'.
ACTIVITYNET_SYSTEM = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative "
    "outputs for question-answer pairs. Your task is to compare the predicted answer with the "
    "correct answer and determine if they match meaningfully. Here's how you can accomplish the "
    "task:------##INSTRUCTIONS: - Focus on the meaningful match between the predicted answer and "
    "the correct answer.\n- Consider synonyms or paraphrases as valid matches.\n- Evaluate the "
    "correctness of the prediction compared to the answer."
)
ACTIVITYNET_USER = (
    "Please evaluate the following video-based question-answer pair:\n\n"
    "Question: {question}\nCorrect Answer: {answer}\nPredicted Answer: {prediction}\n\n"
    "Provide your evaluation only as a yes/no and score where the score is an integer value "
    "between 0 and 5, with 5 indicating the highest meaningful match. Please generate the "
    "response in the form of a Python dictionary string with keys 'pred' and 'score', where "
    "value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not "
    "STRING.DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python "
    "dictionary string. For example, your response should look like this: "
    "{{'pred': 'yes', 'score': 4.8}}."
)

Messages = list[dict[str, str]]


class Grader(Protocol):
    """Scores one prediction in [0, 1]: MM-Vet's correctness, or ActivityNet-QA's yes (1) / no (0)."""

    def grade(self, question: str, answer: str, prediction: str) -> float: ...


def mmvet_messages(question: str, answer: str, prediction: str) -> Messages:
    ground_truth = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    row = f"{question} | {ground_truth} | {prediction} | "
    return [{"role": "user", "content": MMVET_PROMPT + row}]


def parse_mmvet_reply(reply: str) -> float:
    """The correctness the grader wrote (its first number), which must lie in [0, 1]."""
    match = re.search(r"\d+(?:\.\d+)?", reply)
    if match is None or not 0.0 <= float(match.group()) <= 1.0:
        raise ValueError(f"MM-Vet grader reply has no correctness in [0, 1]: {reply!r:.200}")
    return float(match.group())


def activitynet_messages(question: str, answer: str, prediction: str) -> Messages:
    user = ACTIVITYNET_USER.format(question=question, answer=answer, prediction=prediction)
    return [{"role": "system", "content": ACTIVITYNET_SYSTEM}, {"role": "user", "content": user}]


def parse_activitynet_reply(reply: str) -> float:
    """1.0 if the grader's dict says 'pred': 'yes', 0.0 for 'no'."""
    try:
        verdict = ast.literal_eval(reply.strip())
        pred = str(verdict["pred"]).lower()
    except (ValueError, SyntaxError, KeyError, TypeError) as e:
        raise ValueError(
            f"ActivityNet-QA grader reply is not {{'pred': ...}}: {reply!r:.200}"
        ) from e
    if pred not in ("yes", "no"):
        raise ValueError(f"ActivityNet-QA grader reply has pred={pred!r}, not 'yes' / 'no'")
    return 1.0 if pred == "yes" else 0.0


PROTOCOLS: dict[str, tuple[Callable[[str, str, str], Messages], Callable[[str], float]]] = {
    "mmvet": (mmvet_messages, parse_mmvet_reply),
    "activitynet_qa": (activitynet_messages, parse_activitynet_reply),
}


class ChatGrader:
    """A `Grader` from a chat model: `complete(messages) -> reply text` (e.g. an OpenAI client
    call), with the benchmark's official prompt and reply parsing."""

    def __init__(self, benchmark: str, complete: Callable[[Messages], str]):
        if benchmark not in PROTOCOLS:
            raise ValueError(f"no GPT grading protocol for {benchmark!r}; have {sorted(PROTOCOLS)}")
        self.build, self.parse = PROTOCOLS[benchmark]
        self.complete = complete

    def grade(self, question: str, answer: str, prediction: str) -> float:
        return self.parse(self.complete(self.build(question, answer, prediction)))


def _per_category(values: Sequence[float], categories: Sequence[list[str]]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for value, cats in zip(values, categories, strict=True):
        for c in cats:
            groups.setdefault(c, []).append(value)
    return {c: sum(v) / len(v) for c, v in sorted(groups.items())}


def graded_scores(grader: Grader, items: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Official scores of `{question, answer, prediction, categories}` items with a real grader."""
    items = list(items)
    if not items:
        raise ValueError("graded_scores: no items")
    grades = [grader.grade(i["question"], i["answer"], i["prediction"]) for i in items]
    return {
        "score": sum(grades) / len(grades),
        "n": len(grades),
        "per_category": _per_category(grades, [list(i["categories"]) for i in items]),
    }


def proxy_match(prediction: str, answer: str) -> bool:
    """The proxy's verdict: an MM-Vet `<OR>` alternative, or every `<AND>` part, occurs in the
    normalized prediction (ActivityNet answers have neither and must occur whole)."""
    pred = f" {scoring.normalize_answer(prediction)} "
    alternatives = answer.split("<OR>")
    return any(
        all(f" {scoring.normalize_answer(part)} " in pred for part in alt.split("<AND>"))
        for alt in alternatives
    )


def proxy_scores(items: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The exact-match proxy of `{answer, prediction, categories}` items, every key marked proxy."""
    items = list(items)
    if not items:
        raise ValueError("proxy_scores: no items")
    hits = [float(proxy_match(i["prediction"], i["answer"])) for i in items]
    return {
        "metric_label": PROXY_LABEL,
        "exact_match_proxy": sum(hits) / len(hits),
        "n": len(hits),
        "per_category_exact_match_proxy": _per_category(
            hits, [list(i["categories"]) for i in items]
        ),
    }
