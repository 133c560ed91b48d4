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


class PretrainedTokenizer:
    """A LLaMA-style tokenizer read from local files: SentencePiece `tokenizer.model` or `tokenizer.json`.

    Ids are the file's; pad is unk (LLaMA's `pad_token = unk_token`). The media placeholders, which
    the model replaces before embedding (the reference uses negative sentinels), get the first ids
    past the vocabulary: image = vocab, video = vocab + 1, audio = vocab + 2, so `vocab_size`
    counts them and an embedding table of that size can look every id up.
    `encode` treats its text as one SentencePiece call (dummy-prefix space included), the way the
    reference tokenizes each piece between media tags.
    """

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        if path.endswith(".json"):
            self._json = tokenizers.Tokenizer.from_file(path)
            self._sp = None
            ids = {t: self._json.token_to_id(t) for t in ("<unk>", "<s>", "</s>")}
            missing = [t for t, i in ids.items() if i is None]
            if missing:
                raise ValueError(f"{path}: no special token(s) {missing}")
            self.unk_id, self.bos_id, self.eos_id = ids["<unk>"], ids["<s>"], ids["</s>"]
            base = self._json.get_vocab_size(with_added_tokens=True)
        else:
            import sentencepiece  # only needed for `tokenizer.model` files

            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
            self._json = None
            self.unk_id, self.bos_id, self.eos_id = (
                self._sp.unk_id(),
                self._sp.bos_id(),
                self._sp.eos_id(),
            )
            if min(self.bos_id, self.eos_id) < 0:
                raise ValueError(f"{path}: the SentencePiece model has no BOS / EOS ids")
            base = self._sp.get_piece_size()
        self.path = path
        self.pad_id = self.unk_id
        self.image_id, self.video_id, self.audio_id = base, base + 1, base + 2
        self.vocab_size = base + 3

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return self._sp.encode(text)
        return self._json.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        kept = [int(i) for i in ids if i < self.image_id and i not in (self.bos_id, self.eos_id)]
        kept = [i for i in kept if i != self.pad_id]
        if self._sp is not None:
            return self._sp.decode(kept)
        return self._json.decode(kept, skip_special_tokens=True)

    def __getstate__(self) -> dict:
        # SentencePiece processors do not pickle: grain workers reload from the file.
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


# Either tokenizer: both encode / decode text and expose the media placeholder ids.
TextTokenizer = Tokenizer | PretrainedTokenizer
