"""A generation stream as an engine job: the producer side of a
:class:`~tandem.cloud.worker_stream.WorkerStream` when its model has an
:class:`~tandem.cloud.engine.Engine`.

It writes the same fields a producer thread writes (``pending``, ``produced``, ``done``, the
timestamps; under the stream's ``cond``) and wakes the socket thread the same way, so
:class:`~tandem.cloud.streams.WorkerStreams` sends, expires and ends it unchanged. The decode
is :func:`tandem.runtime.generation.decode`'s, one step at a time: prefill (chunked by the
engine), then sample → confidence → :class:`~tandem.runtime.generation.TokenText` (UTF-8,
EOS, stop strings) → the next token joins the engine's next step. A stream whose reader has
``buffer_tokens`` unsent waits (backpressure) without holding the step up for the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tandem.cloud.engine import Job
from tandem.cloud.payloads import GenerateRequest
from tandem.cloud.worker_stream import WorkerStream, checked
from tandem.runtime.chat import chat_tokens
from tandem.runtime.generation import (
    FinishReason,
    TokenStep,
    TokenText,
    check_fits,
    sample,
    token_confidence,
)
from tandem.runtime.speculative import shared_prefix


class StreamJob(Job):
    """One stream's decode on its model's engine (see the module docstring)."""

    def __init__(self, s: WorkerStream, buffer_tokens: int, wake: Callable[[], None]) -> None:
        self.s = s
        self.buffer_tokens = buffer_tokens
        self.wake = wake
        self.todo: list[int] = []
        self.n_rows = 1
        self.made = 0  # tokens sampled
        self.prefill = prompt_size(s.req)
        self.rng: np.random.Generator | None = None
        self.text: TokenText | None = None

    def start(self, backend: Any) -> None:
        s, req = self.s, self.s.req
        s.started_at = time.monotonic()
        if s.cancel.is_set():
            self._finish(FinishReason.CANCELLED)
            return
        if req.messages is not None:
            ids = chat_tokens(backend, req.messages, req.prefix)
        else:
            ids = backend.tokenize(req.prompt)
        s.prompt_tokens = len(ids)
        params = req.params
        check_fits(req.model, len(ids), params, int(backend.n_ctx))
        self.lease = backend.lease(ids, len(ids) + params.max_tokens)
        keep = min(shared_prefix(self.lease.cached_tokens, ids), len(ids) - 1)
        self.lease.truncate(keep)
        # a state that cannot roll back part of the way (a recurrent model) was emptied
        keep = min(keep, len(self.lease.cached_tokens))
        self.todo = list(ids[keep:])
        self.rng = np.random.default_rng(params.seed) if params.temperature > 0 else None
        self.text = TokenText(backend.piece, backend.eos_tokens, params.stop)

    def runnable(self) -> bool:
        return len(self.s.pending) < self.buffer_tokens

    def cancelled(self) -> bool:
        return self.s.cancel.is_set()

    def cancel(self) -> None:
        self._finish(FinishReason.CANCELLED)

    def take(self, rows: np.ndarray) -> None:
        s, params, text = self.s, self.s.req.params, self.text
        assert text is not None
        if s.cancel.is_set():
            self._finish(FinishReason.CANCELLED)
            return
        row = rows[-1]
        token = sample(row, params, self.rng)
        self.made += 1
        self._emit(text.push(token, *token_confidence(row, token)))
        if text.ended:
            self._finish(FinishReason.STOP)
        elif self.made >= params.max_tokens:
            self._emit(text.flush())
            self._finish(FinishReason.LENGTH)
        else:
            self.todo = [token]

    def fail(self, exc: BaseException) -> None:
        self.s.failure = exc
        self._finish(None)

    def close(self) -> None:
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.close()

    def _emit(self, steps: list[TokenStep]) -> None:
        if not steps:
            return
        s = self.s
        steps = [checked(step) for step in steps]
        with s.cond:
            if s.cancel.is_set():
                return
            if s.first_token_at is None:
                s.first_token_at = time.monotonic()
            s.pending.extend(steps)
            s.produced += len(steps)
        self.wake()

    def _finish(self, reason: str | None) -> None:
        s = self.s
        if reason is not None and s.finish_reason is None:
            s.finish_reason = str(reason)
        self.done = True
        self.todo = []
        self.close()  # the slot is free before the stream stops counting
        s.finished_at = time.monotonic()
        with s.cond:
            s.done = True
        self.wake()


def prompt_size(req: GenerateRequest) -> int:
    """The prompt's size in UTF-8 bytes: what the engine's queue bound counts before the
    tokenizer (on the engine thread) says how many tokens it is (a token is one byte at
    least, but for a chat template's)."""
    texts = [req.prompt]
    if req.messages is not None:
        texts = [req.prefix, *(v for m in req.messages for v in m.values())]
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
