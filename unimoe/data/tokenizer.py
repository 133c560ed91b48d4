"""A small byte-level BPE tokenizer for the built-in dataset, with LLaMA's special-token layout.

Ids 0-5 are `<unk>` (also the pad id, as LLaMA pads with unk), `<s>`, `</s>`, `<image>`, `<video>`,
`<audio>`. The GPT-2 byte-level pre-tokenizer attaches a space to the word after it and covers every
byte, so (a) no text ever encodes to `<unk>`/pad, and (b) encoding a prompt ending in "ASSISTANT:"
and the answer " red" separately gives the same ids as encoding "ASSISTANT: red" at once, which the
conversation template relies on to split prompt from answer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<image>", "<video>", "<audio>")
MEDIA_TAGS: tuple[str, ...] = ("<image>", "<video>", "<audio>")


class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` exposing the ids the model code needs."""

    pad_id = 0
    unk_id = 0
    bos_id = 1
    eos_id = 2
    image_id = 3
    video_id = 4
    audio_id = 5

    def __init__(self, backend: tokenizers.Tokenizer):
        for token_id, token in enumerate(SPECIAL_TOKENS):
            if backend.token_to_id(token) != token_id:
                raise ValueError(
                    f"tokenizer must map special token {token} to id {token_id}, "
                    f"got {backend.token_to_id(token)}"
                )
        self.backend = backend

    @classmethod
    def train(cls, corpus: Iterable[str], vocab_size: int = 600) -> Tokenizer:
        """Byte-level BPE trained on `corpus`; deterministic for a given corpus order."""
        if vocab_size < len(SPECIAL_TOKENS) + 256:
            raise ValueError(
                f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256} (specials + 256 bytes), "
                f"got {vocab_size}"
            )
        backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(list(corpus), trainer=trainer)
        return cls(backend)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        return cls(tokenizers.Tokenizer.from_file(os.fspath(path)))

    @classmethod
    def load_or_train(cls, path: str | os.PathLike, vocab_size: int = 600) -> Tokenizer:
        """Loads the tokenizer cached at `path`, or trains it on the built-in corpus and caches it."""
        if os.path.exists(path):
            return cls.from_file(path)
        from unimoe.data.tasks import tokenizer_corpus  # tasks -> conversation -> tokenizer

        tokenizer = cls.train(tokenizer_corpus(), vocab_size)
        tokenizer.save(path)
        return tokenizer

    def save(self, path: str | os.PathLike) -> None:
        """Writes atomically, so concurrent processes never read a half-written file."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp_path = f"{path}.tmp{os.getpid()}"
        self.backend.save(tmp_path)
        os.replace(tmp_path, path)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without BOS/EOS; special-token strings in `text` map to their ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` with special tokens (pad, BOS, EOS, media) skipped; does not stop at EOS."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)
