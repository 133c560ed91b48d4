"""Vicuna v1 conversation template (Uni-MoE `--version v1`) with placeholder expansion and loss masks.

The token sequence is `<s>{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>`.
Each `<image>` / `<video>` / `<audio>` tag becomes n copies of its id, which the model replaces by
connector outputs. `loss_mask[t] = 1` means token t is supervised (predicted from position t-1):
answers and their `</s>`; BOS, the system prompt, every `USER: ... ASSISTANT:` and the media
positions are 0. The split between prompt and answer falls after "ASSISTANT:" so that the eval
prompt (which ends there) tokenizes exactly like the training prefix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from unimoe.data.tokenizer import MEDIA_TAGS, Tokenizer

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = {"human": "USER", "gpt": "ASSISTANT"}
SEP = " "
SEP2 = "</s>"
_TAG_PATTERN = re.compile("(" + "|".join(re.escape(tag) for tag in MEDIA_TAGS) + ")")

Conversation = Sequence[dict[str, str]]


class SequenceTooLongError(ValueError):
    """An example does not fit in seq_len (pipelines may skip these instead of failing)."""


def _check_conversation(conversations: Conversation, record_id: str) -> None:
    """Turns alternate human / gpt starting with human; each media tag occurs at most once."""
    if not conversations:
        raise ValueError(f"conversations of record {record_id!r} is empty")
    for i, turn in enumerate(conversations):
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            raise ValueError(
                f"conversations[{i}]['from'] of record {record_id!r} must be {expected!r}, "
                f"got {turn.get('from')!r}"
            )
    text = "".join(turn["value"] for turn in conversations)
    for tag in MEDIA_TAGS:
        if text.count(tag) > 1:
            raise ValueError(
                f"conversations of record {record_id!r} use {tag} {text.count(tag)} times; "
                "one slot per modality allows at most one"
            )


def _encode_with_media(text: str, tokenizer: Tokenizer, tag_lengths: dict[str, int]) -> list[int]:
    ids: list[int] = []
    tag_ids = {
        "<image>": tokenizer.image_id,
        "<video>": tokenizer.video_id,
        "<audio>": tokenizer.audio_id,
    }
    for piece in _TAG_PATTERN.split(text):
        if piece in tag_ids:
            ids += [tag_ids[piece]] * tag_lengths[piece]
        elif piece:
            ids += tokenizer.encode(piece)
    return ids


def _segments(
    conversations: Conversation,
    tokenizer: Tokenizer,
    tag_lengths: dict[str, int],
    *,
    with_last_answer: bool,
) -> list[tuple[list[int], bool]]:
    """(ids, supervised) pieces whose concatenation is the templated conversation."""
    segments: list[tuple[list[int], bool]] = [([tokenizer.bos_id], False)]
    prefix = SYSTEM_PROMPT + SEP
    for i in range(0, len(conversations), 2):
        question = conversations[i]["value"]
        prompt = f"{prefix}{ROLES['human']}: {question}{SEP}{ROLES['gpt']}:"
        segments.append((_encode_with_media(prompt, tokenizer, tag_lengths), False))
        prefix = ""
        is_last = i + 2 >= len(conversations)
        if i + 1 < len(conversations) and (with_last_answer or not is_last):
            answer = conversations[i + 1]["value"]
            segments.append((tokenizer.encode(f" {answer}") + [tokenizer.eos_id], True))
    return segments


def _pad(
    segments: list[tuple[list[int], bool]], seq_len: int, pad_id: int, record_id: str
) -> tuple[np.ndarray, np.ndarray]:
    length = sum(len(ids) for ids, _ in segments)
    if length > seq_len:
        raise SequenceTooLongError(
            f"record {record_id!r} has {length} tokens, more than seq_len={seq_len}"
        )
    tokens = np.full((seq_len,), pad_id, np.int32)
    loss_mask = np.zeros((seq_len,), np.float32)
    start = 0
    for ids, supervised in segments:
        tokens[start : start + len(ids)] = ids
        loss_mask[start : start + len(ids)] = float(supervised)
        start += len(ids)
    return tokens, loss_mask


def build_chat_example(
    conversations: Conversation,
    tokenizer: Tokenizer,
    *,
    n_image_tokens: int,
    n_video_tokens: int,
    n_audio_tokens: int,
    seq_len: int,
    record_id: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Training sequence: (tokens int32 [seq_len] right-padded with pad_id, loss_mask float32 [seq_len]).

    Raises ValueError naming the record and both lengths if the example does not fit in seq_len.
    """
    _check_conversation(conversations, record_id)
    if len(conversations) % 2:
        raise ValueError(
            f"conversations of record {record_id!r} must end with a gpt turn for training"
        )
    tag_lengths = {"<image>": n_image_tokens, "<video>": n_video_tokens, "<audio>": n_audio_tokens}
    segments = _segments(conversations, tokenizer, tag_lengths, with_last_answer=True)
    return _pad(segments, seq_len, tokenizer.pad_id, record_id)


def build_prompt(
    conversations: Conversation,
    tokenizer: Tokenizer,
    *,
    n_image_tokens: int,
    n_video_tokens: int,
    n_audio_tokens: int,
    record_id: str = "",
) -> np.ndarray:
    """Eval prompt int32 [prompt_len] (unpadded): every round, the last answer left for the model.

    Ends with "ASSISTANT:"; a trailing gpt turn (the reference answer) is dropped.
    """
    _check_conversation(conversations, record_id)
    tag_lengths = {"<image>": n_image_tokens, "<video>": n_video_tokens, "<audio>": n_audio_tokens}
    segments = _segments(conversations, tokenizer, tag_lengths, with_last_answer=False)
    return np.asarray([i for ids, _ in segments for i in ids], np.int32)


def lm_text(conversations: Conversation) -> str:
    """The templated conversation as plain text: media tags and the newline after each removed."""
    text = SYSTEM_PROMPT + SEP
    for i, turn in enumerate(conversations):
        value = re.sub(_TAG_PATTERN.pattern + r"\n?", "", turn["value"])
        text += (
            f"{ROLES['human']}: {value}{SEP}{ROLES['gpt']}:" if i % 2 == 0 else f" {value}{SEP2}"
        )
    return text


def build_lm_text(
    conversations: Conversation,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    record_id: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """LM-pretraining sequence of `lm_text`: (tokens, loss_mask) like `build_chat_example`, with
    every real token after BOS supervised."""
    _check_conversation(conversations, record_id)
    ids = tokenizer.encode(lm_text(conversations))
    return _pad([([tokenizer.bos_id], False), (ids, True)], seq_len, tokenizer.pad_id, record_id)
