import os

import pytest
import tokenizers
from tokenizers import models

from unimoe.data import builtin, tasks
from unimoe.data.tokenizer import SPECIAL_TOKENS, Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(tasks.tokenizer_corpus())


def test_special_token_ids(tokenizer):
    assert SPECIAL_TOKENS == ("<unk>", "<s>", "</s>", "<image>", "<video>", "<audio>")
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.backend.token_to_id(token) == token_id
    ids = (
        tokenizer.pad_id,
        tokenizer.bos_id,
        tokenizer.eos_id,
        tokenizer.image_id,
        tokenizer.video_id,
        tokenizer.audio_id,
    )
    assert ids == (0, 1, 2, 3, 4, 5)
    assert tokenizer.encode("<image><video><audio></s>") == [3, 4, 5, 2]


def test_vocab_size_and_whole_words(tokenizer):
    assert 400 <= tokenizer.vocab_size <= 600
    # Trained to saturation on the small corpus, so answers are single tokens.
    for word in (" red", " triangle", " 7", " horizontally", " chirp"):
        assert len(tokenizer.encode(word)) == 1, word


def test_training_is_deterministic(tokenizer):
    assert Tokenizer.train(tasks.tokenizer_corpus()).backend.to_str() == tokenizer.backend.to_str()


def test_round_trip_and_no_pad_in_text(tokenizer):
    for text in tasks.tokenizer_corpus() + ["unseen words: Zebra 42 ünïcode!"]:
        ids = tokenizer.encode(text)
        assert tokenizer.pad_id not in ids
        assert tokenizer.decode(ids) == text


def test_decode_skips_special_tokens(tokenizer):
    ids = [1, 3, 3, *tokenizer.encode("What color?"), 2, *tokenizer.encode(" red"), 2, 0, 0]
    assert tokenizer.decode(ids) == "What color? red"


@pytest.mark.parametrize(
    "prompt, answer",
    [
        ("questions. USER: What is 3 plus 4? ASSISTANT:", " 7"),
        ("USER: \nWhat color is the circle? ASSISTANT:", " red"),
        (
            "USER: \nDescribe the image briefly. ASSISTANT:",
            " a red circle, a blue square and a green triangle",
        ),
        ("USER: \nTranscribe the speech. ASSISTANT:", " what shape is the purple object"),
        ("USER: anything ASSISTANT:", " zebra-42!"),
    ],
)
def test_segments_concatenate_like_the_whole_string(tokenizer, prompt, answer):
    whole = tokenizer.encode(prompt + answer + "</s>USER: next ASSISTANT:")
    parts = (
        tokenizer.encode(prompt)
        + tokenizer.encode(answer)
        + [2]
        + tokenizer.encode("USER: next ASSISTANT:")
    )
    assert parts == whole


def test_media_tags_split_text(tokenizer):
    assert tokenizer.encode("USER: <image>\nHi") == tokenizer.encode("USER: ") + [
        3
    ] + tokenizer.encode("\nHi")


def test_load_or_train_caches(tmp_path, tokenizer):
    path = tmp_path / "sub" / "tokenizer.json"
    first = builtin.load_or_train_tokenizer(path)
    assert first.backend.to_str() == tokenizer.backend.to_str()
    stamp = os.stat(path).st_mtime_ns
    second = builtin.load_or_train_tokenizer(path)
    assert os.stat(path).st_mtime_ns == stamp
    assert second.encode("What shape is the red object?") == tokenizer.encode(
        "What shape is the red object?"
    )
    assert Tokenizer.from_file(path).vocab_size == tokenizer.vocab_size


def test_bad_arguments_raise(tokenizer):
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["a b c"], vocab_size=100)
    wrong = tokenizers.Tokenizer(models.WordLevel({"<s>": 0, "<unk>": 1}, unk_token="<unk>"))
    with pytest.raises(ValueError, match="<unk>"):
        Tokenizer(wrong)


def test_experiment_tokenizer_when_the_builtin_one_is_missing(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="unimoe_tokenizer.json"):
        builtin.experiment_tokenizer(None, tmp_path, on_missing="error")
    in_memory = builtin.experiment_tokenizer(None, tmp_path, on_missing="train")
    assert in_memory.backend.to_str() == tokenizer.backend.to_str()
    assert not (tmp_path / builtin.TOKENIZER_FILE).exists()  # a dry run writes nothing
    builtin.experiment_tokenizer(None, tmp_path, on_missing="train_and_save")
    assert (tmp_path / builtin.TOKENIZER_FILE).is_file()
