"""CIDEr-D and coco-caption's PTB tokens: hand-computed cases, and parity with pycocoevalcap's
PTBTokenizer (its Java jar) and `Cider` on a few hundred messy captions."""

import math
import random
import shutil

import pytest

from unimoe.eval import cider

WORDS = "a dog cat man woman frisbee park street red big small running on in the of with".split()
SPECIAL = (
    "U.S. U.K. e.g. i.e. etc. Mr. Dr. St. Jan. 3.5 10:30 $5 US$20 50% 1,000 1/2 3D T-shirt x-ray "
    "B-52 2nd 1990s '90s C++ AT&T and/or www.example.com http://a.org/x?y=1 me@x.com #tag @user "
    "5-year-old rock'n'roll o'clock 12/25/2020 555-123-4567 p.m. No. vs. Inc. -5 +3 .5 1.2.3 "
    "A.B.C. I. 4x4 mp3 file.txt Ph.D. anti-war co-op :) ;-) ^_^ &amp; &quot; -----"
).split() + ["1 1/2", "555 123 4567", "vitamin A.", "in the U.S. The", "etc. The"]
CONTRACTIONS = (
    "don't can't won't it's they're we'll I'd you've isn't cannot gonna y'all ma'am 'em Don't "
    "IT'S dog's dogs' 'til l'amour ain't shouldn't've"
).split()
UNICODE = (
    "café naïve São Straße Москва 東京 ΑΒΓ 😀 ★ → ™ © °C × — – … €10 £5 ¥100 ¢50 « » „ “ ” ‘ ’ · ½ ² ¿"
).split()
PUNCT = (
    ", . ! ? ; : ... -- - --- !! ?! ( ) [ ] { } \" '' `` ' ` * ** / & = + < > | ~ ^ _ # @ % $ \\ "
    ".... . . ."
).split(" ")
WRAPS = ['"{}"', "'{}'", "“{}”", "‘{}’", "({})", "[{}]", "{{{}}}", "<{}>", "*{}*", "{}'s", "{}-",
         "{} . . ."]  # fmt: skip


def messy_caption(rng: random.Random) -> str:
    """Words, abbreviations, numbers, contractions, unicode, punctuation, brackets and quotes,
    some glued to the previous item."""
    items: list[str] = []
    for _ in range(rng.randint(2, 12)):
        pool = rng.choices(
            [WORDS, SPECIAL, CONTRACTIONS, UNICODE, PUNCT, WRAPS], [35, 15, 10, 10, 15, 15]
        )[0]
        item = rng.choice(pool)
        item = item.format(rng.choice(WORDS)) if pool is WRAPS else item
        if items and rng.random() < 0.25:
            items[-1] += item
        else:
            items.append(item)
    text = " ".join(items)
    if rng.random() < 0.5:
        text = text[:1].upper() + text[1:]
    return text + rng.choice(["", "", ".", "!", " .", "...", "?"])


@pytest.fixture(scope="module")
def corpus():
    """60 images x 4 messy references, one candidate each (half a reference edited), and
    coco-caption's tokens of all 300 captions from one PTBTokenizer call."""
    if shutil.which("java") is None:
        pytest.skip("java not on PATH: coco-caption's PTBTokenizer runs its Stanford CoreNLP jar")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    rng = random.Random(0)
    ids = [str(i) for i in range(60)]
    references = {k: [messy_caption(rng) for _ in range(4)] for k in ids}
    # A plain last line: the references and the candidates go to the jar as one file here, so
    # no rule may look from the last reference into the first candidate.
    references[ids[-1]][-1] = "a dog in the park"
    predictions = {
        k: references[k][0] + " " + rng.choice(WORDS) if i % 2 else messy_caption(rng)
        for i, k in enumerate(ids)
    }
    lines = {f"r{k}": references[k] for k in ids} | {f"p{k}": [predictions[k]] for k in ids}
    tokens = PTBTokenizer().tokenize({key: [{"caption": c} for c in v] for key, v in lines.items()})
    return references, predictions, lines, tokens


def test_ptb_tokenize_lines_matches_coco_caption_java(corpus):
    _, _, lines, expected = corpus
    captions = [c for v in lines.values() for c in v]
    got = iter(cider.ptb_tokenize_lines(captions))
    mismatches = [
        (caption, ours, theirs)
        for key in lines
        for caption, theirs in zip(lines[key], expected[key], strict=True)
        if (ours := " ".join(next(got))) != theirs
    ]
    assert not mismatches, f"{len(mismatches)} of {len(captions)} differ, e.g. {mismatches[:3]}"
    # The corpus exercises what a naive tokenizer gets wrong.
    joined = " ".join(t for v in expected.values() for t in v).split(" ")
    for token in ("u.s.", "3.5", "10:30", "$", "%", "-lrb-", "-rsb-", "-lcb-", "n't", "'s", "?!"):
        assert token in joined, token


def test_cider_d_matches_coco_caption_on_its_tokens(corpus):
    from pycocoevalcap.cider.cider import Cider

    references, predictions, _, tokens = corpus
    expected, expected_per_image = Cider().compute_score(
        {k: tokens[f"r{k}"] for k in references}, {k: tokens[f"p{k}"] for k in references}
    )
    score, per_image = cider.cider_d(predictions, references)
    assert score == pytest.approx(expected, rel=1e-12)
    assert list(per_image.values()) == pytest.approx(list(expected_per_image), rel=1e-12)
    assert score > 0.5  # half the candidates copy a reference


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("Don't stop.", ["do", "n't", "stop"]),
        ("The dog's ball, (red)!", ["the", "dog", "'s", "ball", "-lrb-", "red", "-rrb-"]),
        ("U.S. $5 50% at 10:30, 3.5 [x]", ["u.s.", "$", "5", "50", "%", "at", "10:30", "3.5",
                                          "-lsb-", "x", "-rsb-"]),
        ('He said "hi" -- twice?!', ["he", "said", "hi", "twice", "?!"]),
        ("A black-and-white cat...", ["a", "black-and-white", "cat"]),
        ("cannot, gonna", ["can", "not", "gon", "na"]),
        ("1 1/2 cups", ["1\u00a01/2", "cups"]),  # PTB keeps the fraction, with a no-break space
    ],
)  # fmt: skip
def test_ptb_tokenize(caption, expected):
    assert cider.ptb_tokenize(caption) == expected


def test_ptb_tokenize_lines_sees_the_next_line():
    # "A." before a sentence start is the letter and a period; alone it is an abbreviation.
    assert cider.ptb_tokenize_lines(["vitamin A.", "The end"]) == [["vitamin", "a"], ["the", "end"]]
    assert cider.ptb_tokenize("vitamin A.") == ["vitamin", "a."]
    assert cider.ptb_tokenize_lines([]) == []


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
