"""One generation stream on the worker, and the one place where a stream crosses threads.

A :class:`WorkerStream` is shared by two threads, and this module is the boundary between
them: its *producer* (:meth:`WorkerStream.produce`, on a thread of its own) runs the backend's
:class:`~tandem.runtime.generation.BackendStream` and appends each checked step to ``pending``,
waiting while ``buffer_tokens`` are unsent; the worker loop
(:class:`~tandem.cloud.streams.WorkerStreams`) takes them from ``pending``, sends them, and
owns every other field. They meet under ``cond``; the producer wakes the loop through the
``wake`` callable it is given, and the loop stops the producer with :meth:`stop_producer`.
"""

from __future__ import annotations

import operator
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from tandem.cloud.payloads import GenerateRequest
from tandem.runtime.generation import BackendStream, FinishReason, TokenStep
from tandem.runtime.wire import Envelope

_MAX_STEP_CHARS = 64 * 1024  # one token's text: more is a backend bug, not a token


class WorkerStream:
    """One active generation. The producer thread writes ``pending``, ``produced``,
    ``done`` (under ``cond``) and its timestamps; the loop reads them and owns the rest."""

    __slots__ = (
        "answered",
        "arrived",
        "backend",
        "blocked_since",
        "cancel",
        "cond",
        "deadline",
        "deadline_why",
        "done",
        "env",
        "failure",
        "final",
        "final_until",
        "finish_reason",
        "finished_at",
        "first_deadline",
        "first_token_at",
        "id",
        "pending",
        "produced",
        "prompt_tokens",
        "req",
        "resume",
        "route",
        "sent",
        "started_at",
        "thread",
    )

    def __init__(
        self, route: list[Any], env: Envelope, req: GenerateRequest, backend: Any, now: float
    ) -> None:
        self.id = env.id
        self.route = route
        self.env = env
        self.req = req
        self.backend = backend
        self.arrived = now
        self.deadline = now  # set by the table: the budget, or max_stream_s if sooner
        self.deadline_why = "budget"
        self.first_deadline: float | None = (
            None if req.first_token_ms is None else now + req.first_token_ms / 1e3
        )
        self.cancel = threading.Event()
        self.cond = threading.Condition(threading.Lock())
        self.pending: deque[TokenStep] = deque()
        self.produced = 0  # tokens appended by the producer
        self.sent = 0  # tokens sent in chunks
        self.done = False  # the producer has returned (its BackendStream closed)
        self.failure: BaseException | None = None
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.started_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.answered = False  # the final message went out, or cannot
        self.final: list[Any] | None = None  # the final message's frames, not sent yet
        self.final_until = 0.0
        self.blocked_since: float | None = None  # the reader's queue has been full since
        self.thread: threading.Thread | None = None
        # with an engine: wakes it when the stream may run again (tokens taken, or cancelled)
        self.resume: Callable[[], None] | None = None

    def stop_producer(self) -> None:
        """Ask the producer to stop at the next token boundary; unsent tokens are dropped."""
        self.cancel.set()
        with self.cond:
            self.pending.clear()
            self.cond.notify_all()
        if self.resume is not None:
            self.resume()

    def produce(self, buffer_tokens: int, wake: Callable[[], None]) -> None:
        """The stream's thread: run the backend, fill the buffer (at most ``buffer_tokens``
        unsent; then wait), call ``wake`` when the loop has something new."""
        ts: BackendStream | None = None
        try:
            self.started_at = time.monotonic()
            if self.cancel.is_set():
                return
            ts = self.req.start(self.backend, self.cancel)
            self.prompt_tokens = operator.index(ts.prompt_tokens)
            for raw in ts:
                step = checked(raw)
                with self.cond:
                    while len(self.pending) >= buffer_tokens and not self.cancel.is_set():
                        self.cond.wait()
                    if self.cancel.is_set():
                        break
                    if self.first_token_at is None:
                        self.first_token_at = time.monotonic()
                    self.pending.append(step)
                    self.produced += 1
                wake()
            else:
                self.finish_reason = str(ts.finish_reason or FinishReason.STOP)
        except Exception as e:
            self.failure = e
        finally:
            try:
                if ts is not None:
                    # a server (format openai) reports the prompt's size at the end
                    self.prompt_tokens = operator.index(ts.prompt_tokens)
                    ts.close()  # frees the backend's slot (KV cache, context)
            except Exception as e:
                if self.failure is None:
                    self.failure = e
            self.finished_at = time.monotonic()
            with self.cond:
                self.done = True
            wake()


def checked(step: Any) -> TokenStep:
    """A backend's step as plain, bounded values (what a chunk is built from)."""
    token, text = operator.index(step.token), step.text
    if type(text) is not str or len(text) > _MAX_STEP_CHARS:
        raise TypeError(f"a token's text must be a str of at most {_MAX_STEP_CHARS} chars")
    entropy = None if step.entropy is None else float(step.entropy)
    return TokenStep(token, text, float(step.logprob), entropy)
