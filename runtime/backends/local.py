"""What the local language-model backends (llama.cpp, transformers) share: both tokenize here
and run token ids through their own decode loop (``_stream_ids``), for a raw prompt and for a
chat rendered by the model's template (:func:`tandem.runtime.chat.chat_tokens`)."""

from __future__ import annotations

import threading

from tandem.runtime.chat import ChatTemplate, Message, chat_tokens
from tandem.runtime.generation import BackendStream, SamplingParams


class LocalStreams:
    """``stream`` and ``stream_chat`` on top of a backend's ``tokenize`` and ``_stream_ids``."""

    chat: ChatTemplate

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
