"""Tandem's character tokenizer: one token per character, plus ``<pad>``, ``<bos>``, ``<eos>``.

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

from tandem.runtime.errors import BadRequest, ConfigError

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<bos>", "<eos>")
FILE_NAME = "tokenizer.json"
TYPE = "tandem-char"


class CharTokenizer:
    """Characters ↔ ids. ``encode`` refuses characters outside the vocabulary (a clear
    :class:`BadRequest`, never a silent drop)."""

    def __init__(self, chars: Iterable[str]) -> None:
        chars = list(chars)
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("a character vocabulary holds distinct single characters")
        self.vocab: list[str] = [*SPECIALS, *chars]
        self._ids = {c: i for i, c in enumerate(self.vocab) if i >= len(SPECIALS)}

    @property
    def n_vocab(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
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

    def piece(self, token: int) -> str:
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
