import numpy as np
import pytest

from unimoe.data import conversation, tasks
from unimoe.data.tokenizer import Tokenizer

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
TWO_ROUNDS = [
    {"from": "human", "value": "<image>\nWhat color is the circle?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "<audio>\nWhich shape did the speaker say?"},
    {"from": "gpt", "value": "square"},
]
# The first record of Uni-MoE's data_sample/samples.json (the tag comes after the question there).
UNIMOE_RECORD = [
    {"from": "human", "value": "What is in the motorcyclist's mouth?\n<image>"},
    {"from": "gpt", "value": "cigarette"},
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(tasks.tokenizer_corpus())


def test_two_round_masking_matches_hand_written_segments(tok):
    tokens, loss_mask = conversation.build_chat_example(
        TWO_ROUNDS,
        tok,
        n_image_tokens=3,
        n_video_tokens=4,
        n_audio_tokens=2,
        seq_len=120,
        record_id="r",
    )
    # Hand-written Vicuna v1 segments: (ids, supervised).
    segments = [
        ([1], 0),
        (
            tok.encode(SYSTEM + " USER: ")
            + [3, 3, 3]
            + tok.encode("\nWhat color is the circle? ASSISTANT:"),
            0,
        ),
        (tok.encode(" red") + [2], 1),
        (
            tok.encode("USER: ")
            + [5, 5]
            + tok.encode("\nWhich shape did the speaker say? ASSISTANT:"),
            0,
        ),
        (tok.encode(" square") + [2], 1),
    ]
    expected_tokens = [i for ids, _ in segments for i in ids]
    expected_mask = [m for ids, m in segments for _ in ids]
    n = len(expected_tokens)
    assert tokens.dtype == np.int32 and loss_mask.dtype == np.float32
    assert tokens.shape == loss_mask.shape == (120,)
    np.testing.assert_array_equal(tokens[:n], expected_tokens)
    np.testing.assert_array_equal(loss_mask[:n], expected_mask)
    np.testing.assert_array_equal(tokens[n:], 0)
    np.testing.assert_array_equal(loss_mask[n:], 0)
    # Supervised: exactly the two answers and their </s>.
    assert list(tokens[loss_mask == 1]) == tok.encode(" red") + [2] + tok.encode(" square") + [2]
    assert tok.decode(tokens[loss_mask == 1]) == " red square"
    # Segment-wise encoding equals encoding the whole Vicuna string.
    whole = (
        f"{SYSTEM} USER: <image><image><image>\nWhat color is the circle? ASSISTANT: red</s>"
        "USER: <audio><audio>\nWhich shape did the speaker say? ASSISTANT: square</s>"
    )
    assert [1] + tok.encode(whole) == expected_tokens


def test_prompt_is_the_training_prefix(tok):
    kwargs = dict(n_image_tokens=3, n_video_tokens=4, n_audio_tokens=2)
    tokens, loss_mask = conversation.build_chat_example(TWO_ROUNDS, tok, seq_len=120, **kwargs)
    prompt = conversation.build_prompt(TWO_ROUNDS, tok, **kwargs)
    assert prompt.dtype == np.int32
    np.testing.assert_array_equal(tokens[: len(prompt)], prompt)
    assert tok.decode(prompt).endswith("Which shape did the speaker say? ASSISTANT:")
    assert (
        loss_mask[len(prompt) - 1] == 0 and loss_mask[len(prompt)] == 1
    )  # first answer token follows
    # A conversation whose last turn is the human's gives the same prompt.
    np.testing.assert_array_equal(conversation.build_prompt(TWO_ROUNDS[:3], tok, **kwargs), prompt)


def test_lm_text_removes_tags_and_supervises_every_token(tok):
    text = conversation.lm_text(TWO_ROUNDS)
    assert text == (
        f"{SYSTEM} USER: What color is the circle? ASSISTANT: red</s>"
        "USER: Which shape did the speaker say? ASSISTANT: square</s>"
    )
    tokens, loss_mask = conversation.build_lm_text(TWO_ROUNDS, tok, seq_len=100)
    ids = [1] + tok.encode(text)
    np.testing.assert_array_equal(tokens[: len(ids)], ids)
    np.testing.assert_array_equal(loss_mask, [0] + [1] * (len(ids) - 1) + [0] * (100 - len(ids)))
    assert not {3, 4, 5} & set(tokens.tolist())


def test_real_unimoe_record_with_trailing_tag(tok):
    tokens, loss_mask = conversation.build_chat_example(
        UNIMOE_RECORD, tok, n_image_tokens=2, n_video_tokens=1, n_audio_tokens=1, seq_len=100
    )
    n = int((tokens != 0).sum())
    expected = (
        [1]
        + tok.encode(SYSTEM + " USER: What is in the motorcyclist's mouth?\n")
        + [3, 3]
        + tok.encode(" ASSISTANT:")
        + tok.encode(" cigarette")
        + [2]
    )
    np.testing.assert_array_equal(tokens[:n], expected)
    assert tok.decode(tokens[loss_mask == 1]) == " cigarette"


def test_too_long_names_record_and_lengths(tok):
    full = conversation.build_chat_example(
        TWO_ROUNDS, tok, n_image_tokens=3, n_video_tokens=4, n_audio_tokens=2, seq_len=200
    )[0]
    length = int((full != 0).sum())
    with pytest.raises(
        conversation.SequenceTooLongError, match=rf"'rec-7'.*{length} tokens.*seq_len={length - 1}"
    ):
        conversation.build_chat_example(
            TWO_ROUNDS,
            tok,
            n_image_tokens=3,
            n_video_tokens=4,
            n_audio_tokens=2,
            seq_len=length - 1,
            record_id="rec-7",
        )
    # Exactly fitting is fine.
    conversation.build_chat_example(
        TWO_ROUNDS, tok, n_image_tokens=3, n_video_tokens=4, n_audio_tokens=2, seq_len=length
    )
    assert issubclass(conversation.SequenceTooLongError, ValueError)


@pytest.mark.parametrize(
    "convs, match",
    [
        ([], "empty"),
        ([{"from": "gpt", "value": "hi"}], r"conversations\[0\]"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], r"conversations\[1\]"),
        (
            [{"from": "human", "value": "<audio>\n<audio>\nq"}, {"from": "gpt", "value": "a"}],
            "<audio>",
        ),
        ([{"from": "human", "value": "q"}], "end with a gpt turn"),
    ],
)
def test_malformed_conversations_raise(tok, convs, match):
    with pytest.raises(ValueError, match=match):
        conversation.build_chat_example(
            convs,
            tok,
            n_image_tokens=1,
            n_video_tokens=1,
            n_audio_tokens=1,
            seq_len=100,
            record_id="bad",
        )
