"""What the local language-model backends (llama.cpp, transformers) share: both tokenize here
and run token ids through their own decode loop (``_stream_ids``), for a raw prompt and for a
chat rendered by the model's template (:func:`tandem.runtime.chat.chat_tokens`); and the
vocabulary side of :class:`~tandem.runtime.generation.LocalGenerationBackend` (``piece``,
``eos_tokens``), from the tables each builds at load (``_pieces``, ``_eos``)."""

from __future__ import annotations

import threading

from tandem.runtime.chat import ChatTemplate, Message, chat_tokens
from tandem.runtime.errors import BadRequest
from tandem.runtime.generation import BackendStream, SamplingParams


class LocalStreams:
    """``stream`` and ``stream_chat`` on top of a backend's ``tokenize`` and ``_stream_ids``;
    ``piece`` and ``eos_tokens`` from its ``_pieces`` and ``_eos``."""

    chat: ChatTemplate
    name: str
    _pieces: list[bytes]  # each token's bytes (b"" for control tokens)
    _eos: frozenset[int]

    def piece(self, token: int) -> bytes:
        """The bytes ``token`` adds to the text (b"" for control tokens)."""
        return self._pieces[token]

    @property
    def eos_tokens(self) -> frozenset[int]:
        """Tokens that end an answer."""
        return self._eos

    def _non_empty(self, ids: list[int]) -> list[int]:
        if not ids:
            raise BadRequest(f"model {self.name!r}: the prompt is empty")
        return ids

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        raise NotImplementedError

    def _stream_ids(
        self, ids: list[int], params: SamplingParams, cancel: threading.Event | None
    ) -> BackendStream:
        raise NotImplementedError

    def stream(
        self, prompt: str, params: SamplingParams, *, cancel: threading.Event | None = None
    ) -> BackendStream:
        """A continuation of ``prompt`` (tokenized as plain text: no control tokens)."""
        return self._stream_ids(self.tokenize(prompt), params, cancel)

    def stream_chat(
        self,
        messages: list[Message],
        params: SamplingParams,
        *,
        prefix: str = "",
        cancel: threading.Event | None = None,
    ) -> BackendStream:
        """The assistant's answer to ``messages``, rendered with the model's chat template,
        continuing after ``prefix``."""
        return self._stream_ids(chat_tokens(self, messages, prefix), params, cancel)
