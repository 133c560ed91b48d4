"""CIDEr-D, as coco-caption's `pycocoevalcap/cider` computes it, on coco-caption's tokens.

coco-caption first runs Stanford's PTBTokenizer (Java, CoreNLP 3.4.1) with `-lowerCase` over all
captions of one side (references, or candidates) as the lines of one file, then drops the tokens
in its punctuation list; `ptb_tokenize_lines` does the same with `unimoe.eval.ptb`, the lexer in
Python. Brackets stay, as -lrb- / -rrb- / -lsb- / -rcb- (the list names them in capitals, after
lowercasing), so do "$", "%", "?!" and other symbols. Scores then follow `CiderScorer` exactly:
words split on whitespace, n-grams 1..4, document frequency over each image's reference set, IDF
log(#images) - log(max(1, df)), TF-IDF vectors, clipped cosine with the Gaussian length penalty
(sigma 6), mean over references and n, times 10; the corpus score is the mean over images.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence

from unimoe.eval import ptb

MAX_N = 4
SIGMA = 6.0
# coco-caption's tokenizer.ptbtokenizer.PUNCTUATIONS, compared with the lowercased tokens.
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
     "...", ";"]
)  # fmt: skip


def ptb_tokenize_lines(captions: Sequence[str]) -> list[list[str]]:
    """coco-caption's tokens of each caption, the captions read as one file, in this order."""
    return [
        [t for t in (token.lower() for token in tokens) if t not in PUNCTUATIONS]
        for tokens in ptb.tokenize_lines(captions)
    ]


def ptb_tokenize(caption: str) -> list[str]:
    """coco-caption's tokens of one caption: "A dog's ball (red)." -> ['a', 'dog', "'s", 'ball',
    '-lrb-', 'red', '-rrb-']."""
    return ptb_tokenize_lines([caption])[0]


Ngrams = collections.Counter


def _ngrams(words: Sequence[str]) -> Ngrams:
    counts: Ngrams = collections.Counter()
    for n in range(1, MAX_N + 1):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i : i + n])] += 1
    return counts


def _tokenized_ngrams(
    ids: Sequence[str], predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> tuple[dict[str, Ngrams], dict[str, list[Ngrams]]]:
    """Each image's candidate and reference n-grams, tokenized as coco-caption does: all
    references as one file, all candidates as another; words split on any whitespace, as
    `CiderScorer` splits the tokenizer's output (a PTB token may hold a no-break space)."""
    ref_lines = ptb_tokenize_lines([r for k in ids for r in references[k]])
    hyp_lines = ptb_tokenize_lines([predictions[k] for k in ids])
    hyps, refs, start = {}, {}, 0
    for k, hyp_tokens in zip(ids, hyp_lines, strict=True):
        count = len(references[k])
        refs[k] = [_ngrams(" ".join(t).split()) for t in ref_lines[start : start + count]]
        hyps[k] = _ngrams(" ".join(hyp_tokens).split())
        start += count
    return hyps, refs


def _vector(
    counts: Ngrams, doc_freq: Mapping[tuple[str, ...], int], log_num_images: float
) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
    """Per n: TF-IDF weights, their L2 norm; and the caption's length in words."""
    vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(MAX_N)]
    norm = [0.0] * MAX_N
    length = 0
    for ngram, tf in counts.items():
        n = len(ngram) - 1
        df = math.log(max(1.0, doc_freq.get(ngram, 0.0)))
        vec[n][ngram] = float(tf) * (log_num_images - df)
        norm[n] += vec[n][ngram] ** 2
        if n == 1:  # coco-caption's quirk: the "length" counts bigrams, not words
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def _similarity(hyp, ref) -> list[float]:
    (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
    delta = float(len_h - len_r)
    val = [0.0] * MAX_N
    for n in range(MAX_N):
        for ngram, weight in vec_h[n].items():
            # CIDEr-D clips the candidate's weights by the reference's (no gain from repeating).
            val[n] += min(weight, vec_r[n].get(ngram, 0.0)) * vec_r[n].get(ngram, 0.0)
        if norm_h[n] != 0 and norm_r[n] != 0:
            val[n] /= norm_h[n] * norm_r[n]
        val[n] *= math.e ** (-(delta**2) / (2 * SIGMA**2))
    return val


def cider_d(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> tuple[float, dict[str, float]]:
    """(corpus CIDEr-D, per-image scores) of one caption per image against its references.

    Both are keyed by image id; every prediction needs at least one reference. The IDF comes from
    the references of the images scored, so (as in coco-caption) a score depends on the corpus.
    """
    missing = [k for k in predictions if not references.get(k)]
    if missing:
        raise ValueError(f"cider_d: no reference captions for image(s) {missing[:5]}")
    if not predictions:
        raise ValueError("cider_d: no predictions")
    ids = list(predictions)
    hyps, refs = _tokenized_ngrams(ids, predictions, references)
    doc_freq: collections.Counter = collections.Counter()
    for k in ids:
        for ngram in set(ngram for counts in refs[k] for ngram in counts):
            doc_freq[ngram] += 1
    log_num_images = math.log(float(len(ids)))
    per_image = {}
    for k in ids:
        hyp = _vector(hyps[k], doc_freq, log_num_images)
        total = [0.0] * MAX_N
        for counts in refs[k]:
            sim = _similarity(hyp, _vector(counts, doc_freq, log_num_images))
            total = [a + b for a, b in zip(total, sim)]
        per_image[k] = sum(total) / MAX_N / len(refs[k]) * 10.0
    return sum(per_image.values()) / len(per_image), per_image
