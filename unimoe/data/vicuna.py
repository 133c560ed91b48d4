"""Vicuna v1 examples built the way the reference builds them, for real (SentencePiece) tokenizers.

`conversation` builds the built-in data's examples from separately encoded segments, which is
exact for its byte-level BPE. A SentencePiece tokenizer adds a dummy-prefix space to every call,
so here the whole templated conversation is one string, tokenized as Uni-MoE's training code does:
- the string is `{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>`;
- it is split on media tags and on `</s>`; each text piece is encoded on its own, BOS once in
  front, `</s>` as the EOS id, each tag one placeholder;
- labels follow `preprocess_va`: BOS masked; per round (split on `</s>`), the part up to and
  including "ASSISTANT: " is masked with length len(tokens(instruction)) - 2; the answer and its
  `</s>` are supervised; a length mismatch means the template does not tokenize prefix-stably
  (the reference then masks the whole sample; here it is a record error);
- then each placeholder expands to its media's token count (those positions unsupervised).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from unimoe.data.conversation import ROLES, SEP, SEP2, SYSTEM_PROMPT, SequenceTooLongError
from unimoe.data.tokenizer import MEDIA_TAGS, PretrainedTokenizer

_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in (*MEDIA_TAGS, SEP2)) + ")")
_ANSWER_START = f"{ROLES['gpt']}: "


class TemplateMismatchError(ValueError):
    """The per-round lengths of `preprocess_va` do not add up to the tokenized conversation."""


def conversation_text(conversations: Sequence[dict[str, str]], *, with_last_answer: bool) -> str:
    """The Vicuna v1 string; without the last answer it ends in "ASSISTANT:" (the eval prompt)."""
    text = SYSTEM_PROMPT + SEP
    for i, turn in enumerate(conversations):
        role = ROLES[turn["from"]]
        is_last_answer = i == len(conversations) - 1 and turn["from"] == "gpt"
        if is_last_answer and not with_last_answer:
            return text + f"{role}:"
        text += f"{role}: {turn['value']}" + (SEP if i % 2 == 0 else SEP2)
    return text if with_last_answer else text + f"{ROLES['gpt']}:"


def tokenize(text: str, tokenizer: PretrainedTokenizer) -> list[int]:
    """BOS + ids of `text`: tags become one placeholder id each, `</s>` the EOS id."""
    special = {
        "<image>": tokenizer.image_id,
        "<video>": tokenizer.video_id,
        "<audio>": tokenizer.audio_id,
        SEP2: tokenizer.eos_id,
    }
    ids = [tokenizer.bos_id]
    for piece in _SPLIT.split(text):
        if piece in special:
            ids.append(special[piece])
        elif piece:
            ids += tokenizer.encode(piece)
    return ids


def reference_supervision(
    text: str, ids: Sequence[int], tokenizer: PretrainedTokenizer
) -> np.ndarray:
    """bool [len(ids)]: which tokens `preprocess_va` supervises (its labels != IGNORE_INDEX)."""
    supervised = np.ones(len(ids), bool)
    supervised[0] = False
    cur = 1
    for round_text in text.split(SEP2):
        if not round_text:
            break
        parts = round_text.split(_ANSWER_START)
        if len(parts) != 2:
            break
        # Both counts include a BOS; the round's own `</s>` was cut off by the split instead.
        round_len = len(tokenize(round_text, tokenizer))
        instruction_len = len(tokenize(parts[0] + _ANSWER_START, tokenizer)) - 2
        supervised[cur : cur + instruction_len] = False
        cur += round_len
    supervised[cur:] = False
    if cur != len(ids):
        raise TemplateMismatchError(
            f"round lengths add up to {cur} tokens but the conversation has {len(ids)}"
        )
    return supervised


def _expand(
    ids: Sequence[int], supervised: np.ndarray, media_lengths: dict[int, Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Each placeholder -> its media's token count (k-th audio tag -> k-th length), unsupervised."""
    ids = np.asarray(ids, np.int32)
    repeats = np.ones(len(ids), np.int64)
    is_media = np.zeros(len(ids), bool)
    for token, lengths in media_lengths.items():
        positions = np.flatnonzero(ids == token)
        if len(positions) > len(lengths):
            raise ValueError(f"{len(positions)} placeholders {token} for {len(lengths)} media")
        repeats[positions] = lengths[: len(positions)]
        is_media[positions] = True
    return np.repeat(ids, repeats), np.repeat(supervised & ~is_media, repeats)


def _media_lengths(
    tokenizer: PretrainedTokenizer,
    n_image_tokens: int,
    n_video_tokens: int,
    audio_tokens: Sequence[int],
) -> dict[int, Sequence[int]]:
    return {
        tokenizer.image_id: [n_image_tokens],
        tokenizer.video_id: [n_video_tokens],
        tokenizer.audio_id: list(audio_tokens),
    }


def build_example(
    conversations: Sequence[dict[str, str]],
    tokenizer: PretrainedTokenizer,
    *,
    n_image_tokens: int,
    n_video_tokens: int,
    audio_tokens: Sequence[int],
    seq_len: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Training example: (tokens int32 [seq_len] padded with pad_id, loss_mask float32 [seq_len]).

    `audio_tokens[k]` is the placeholder count of the k-th `<audio>` tag (tokens per chunk times
    that file's chunks). Raises SequenceTooLongError (the reference would truncate silently) or
    TemplateMismatchError.
    """
    text = conversation_text(conversations, with_last_answer=True)
    ids = tokenize(text, tokenizer)
    supervised = reference_supervision(text, ids, tokenizer)
    lengths = _media_lengths(tokenizer, n_image_tokens, n_video_tokens, audio_tokens)
    tokens, supervised = _expand(ids, supervised, lengths)
    if len(tokens) > seq_len:
        raise SequenceTooLongError(f"{len(tokens)} tokens, more than seq_len={seq_len}")
    padded = np.full((seq_len,), tokenizer.pad_id, np.int32)
    padded[: len(tokens)] = tokens
    loss_mask = np.zeros((seq_len,), np.float32)
    loss_mask[: len(tokens)] = supervised
    return padded, loss_mask


def build_prompt(
    conversations: Sequence[dict[str, str]],
    tokenizer: PretrainedTokenizer,
    *,
    n_image_tokens: int,
    n_video_tokens: int,
    audio_tokens: Sequence[int],
) -> np.ndarray:
    """Eval prompt int32 [prompt_len], ending in "ASSISTANT:" (a trailing gpt turn is left out)."""
    ids = tokenize(conversation_text(conversations, with_last_answer=False), tokenizer)
    lengths = _media_lengths(tokenizer, n_image_tokens, n_video_tokens, audio_tokens)
    tokens, _ = _expand(ids, np.zeros(len(ids), bool), lengths)
    return tokens
