"""Tokenizers: one interface (:class:`Tokenizer`), three sources.

* :class:`CharTokenizer` — Tandem's own, one token per character (the reference models);
* :class:`~tandem.runtime.hf_tokenizer.HFTokenizer` — a Hugging Face tokenizer from a model
  directory (``tokenizer.json`` or SentencePiece, through ``AutoTokenizer``, offline);
* llama.cpp's own vocabulary inside a GGUF file (:class:`~tandem.runtime.backends.llamacpp.LlamaCppBackend`
  implements the same members).

:func:`load_tokenizer` picks between the first two for a model directory.

Text comes back a token at a time as **bytes** (:meth:`Tokenizer.piece`): a token of a
byte-level BPE or a SentencePiece byte-fallback token can be part of a UTF-8 character, and the
decode loop (:func:`tandem.runtime.generation.decode`) joins them with an incremental UTF-8
decoder, so a stream never shows half a character.

Tandem's character tokenizer
----------------------------

The reference language models (``tandem models build --llm``) are trained with it, and the
GGUF export (:mod:`tandem.runtime.gguf`) writes the same vocabulary into the GGUF file, so
llama.cpp and transformers see identical token ids. It is saved beside the model weights as
``tokenizer.json`` in a model directory::

    {"type": "tandem-char", "vocab": ["<pad>", "<bos>", "<eos>", "a", "b", ...]}

Ids 0, 1, 2 are always pad, bos, eos.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from tandem.runtime.errors import BadRequest, ConfigError

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<bos>", "<eos>")
FILE_NAME = "tokenizer.json"
TYPE = "tandem-char"


@runtime_checkable
class Tokenizer(Protocol):
    """What the language-model backends need of a tokenizer.

    ``n_vocab``: ids ``0..n_vocab-1`` exist; ``eos_tokens``: the ids that end an answer (a
    model may have several: ``generation_config.eos_token_id`` can be a list);
    ``chat_template``: the model's Jinja chat template, or None; ``special_tokens``: the texts
    a template refers to (``bos_token``, ``eos_token``...); ``control_tokens``: id → text of the
    control tokens (``<|im_start|>``, ``<bos>``), whose :meth:`piece` is empty."""

    n_vocab: int
    eos_tokens: frozenset[int]
    control_tokens: dict[int, str]
    chat_template: str | None
    special_tokens: dict[str, str]

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of ``text``, with BOS first when the model wants one. ``special``: the
        text is a rendered chat template, whose control tokens (``<|im_start|>``) are parsed
        as such and which carries its own BOS if any; else they are plain text (a user's
        prompt can never inject a control token)."""
        ...

    def piece(self, token: int) -> bytes:
        """The bytes ``token`` adds to the text (b"" for control tokens): maybe part of a
        UTF-8 character."""
        ...


class CharTokenizer:
    """Characters ↔ ids. ``encode`` refuses characters outside the vocabulary (a clear
    :class:`BadRequest`, never a silent drop)."""

    def __init__(self, chars: Iterable[str]) -> None:
        chars = list(chars)
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("a character vocabulary holds distinct single characters")
        self.vocab: list[str] = [*SPECIALS, *chars]
        self._ids = {c: i for i, c in enumerate(self.vocab) if i >= len(SPECIALS)}
        self.eos_tokens = frozenset({EOS})
        self.control_tokens = dict(enumerate(SPECIALS))
        self.chat_template: str | None = None
        self.special_tokens = {"bos_token": SPECIALS[BOS], "eos_token": SPECIALS[EOS]}

    @property
    def n_vocab(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, *, bos: bool = True, special: bool = False) -> list[int]:
        """``special`` changes nothing: the vocabulary has no control-token syntax."""
        try:
            ids = [self._ids[c] for c in text]
        except KeyError as e:
            raise BadRequest(
                f"character {e.args[0]!r} is not in the model's vocabulary "
                f"({''.join(self.vocab[len(SPECIALS) :])!r})"
            ) from None
        return [BOS, *ids] if bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens decode to nothing."""
        n = len(self.vocab)
        return "".join(self.vocab[i] for i in ids if len(SPECIALS) <= i < n)

    def piece(self, token: int) -> bytes:
        return self.text(token).encode()

    def text(self, token: int) -> str:
        """The character ``token`` stands for ("" for the specials)."""
        return self.vocab[token] if len(SPECIALS) <= token < len(self.vocab) else ""

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILE_NAME
        path.write_text(json.dumps({"type": TYPE, "vocab": self.vocab}, ensure_ascii=False))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> CharTokenizer:
        path = Path(directory) / FILE_NAME
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read a Tandem tokenizer: {e}") from None
        if not isinstance(data, dict) or data.get("type") != TYPE:
            raise ConfigError(f"{path}: type: expected {TYPE!r}, got {data.get('type')!r}")
        vocab = data.get("vocab")
        if not isinstance(vocab, list) or tuple(vocab[: len(SPECIALS)]) != SPECIALS:
            raise ConfigError(f"{path}: vocab: expected a list starting with {list(SPECIALS)}")
        return cls(vocab[len(SPECIALS) :])


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved in a model directory: Tandem's character tokenizer when
    ``tokenizer.json`` says ``"type": "tandem-char"``, else the directory's own Hugging Face
    tokenizer (loaded offline). :class:`ConfigError` saying what is missing otherwise."""
    path = Path(directory) / FILE_NAME
    if path.is_file():
        try:
            head = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read: {e}") from None
        if isinstance(head, dict) and head.get("type") == TYPE:
            return CharTokenizer.load(directory)
    from tandem.runtime.hf_tokenizer import HFTokenizer

    return HFTokenizer(directory)
