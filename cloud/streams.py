"""The worker's generation streams: one ``generate`` request → ``chunk`` messages → one ``end``
(or one ``error``). See :mod:`tandem.runtime.wire` for the payloads.

A request is parsed first (:func:`~tandem.cloud.payloads.parse_generate`); a stream that
starts is a :class:`~tandem.cloud.worker_stream.WorkerStream`, whose backend's ``stream()``
runs on a thread of its own (the *producer*), which appends :class:`TokenStep` s to the
stream's buffer and wakes the worker loop through a pipe that the loop polls beside its
socket. The loop stays the only owner of the socket and the clock: each turn,
:meth:`WorkerStreams.pump` sends every stream's pending tokens as one ``chunk`` (so a chunk
carries several tokens whenever the loop or the reader is slower than the model), expires
streams past their deadlines, and sends the final ``end``/``error``.

Everything is bounded:

* streams: ``generation.max_streams`` at once (one more: ``Overloaded`` with a retry hint);
* a stream's unsent tokens: ``generation.buffer_tokens``. When the buffer is full, the
  producer waits on a condition (backpressure: the model stops until the reader catches up);
  when ZeroMQ's send queue toward the reader is full (a slow reader), the tokens stay in the
  buffer and go out together once it has room;
* time: the request's budget (the whole answer), ``first_token_ms`` (the first token),
  ``generation.max_stream_s`` (any stream), ``generation.stall_timeout_ms`` (a reader that
  takes nothing).

A stream ends in exactly one of these ways, and its table entry is removed once its final
message is out (or cannot be) *and* its producer has returned (so a stream's backend slot, e.g.
a KV cache, is free before the stream stops counting toward ``max_streams``):

==========================  =====================================================
the producer finished       ``end`` (``stop``/``length``) after the last chunk
the backend raised          ``error``: its TandemError, or ``backend.error``
``cancel`` from the client  ``end`` with ``finish_reason`` ``cancelled``
deadline / first token      ``error`` ``deadline_exceeded``
reader stalled              ``error`` ``deadline_exceeded`` (it is not reading it)
the reader's peer is gone   nothing (there is no one to tell)
worker shutdown             ``error`` ``shutting_down``
==========================  =====================================================

In every case but the first two the loop sets the stream's cancel event and wakes the
producer, which closes the backend's :class:`BackendStream` at the next token boundary.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from tandem.cloud.config import GenerationSpec
from tandem.cloud.engine import Engine
from tandem.cloud.engine_stream import StreamJob, prompt_size
from tandem.cloud.metrics import WorkerMetrics
from tandem.cloud.payloads import parse_generate
from tandem.cloud.worker_stream import WorkerStream
from tandem.runtime import tracing
from tandem.runtime.errors import (
    BadRequest,
    DeadlineExceeded,
    OverloadedError,
    ShuttingDown,
    TandemError,
    UnknownModel,
)
from tandem.runtime.generation import (
    FinishReason,
    GenerationBackend,
    TokenStep,
)
from tandem.runtime.wire import Envelope, Kind, WireCodec

log = logging.getLogger(__name__)

_MAX_CHUNK_CHARS = 1024 * 1024  # text per chunk (a chunk also holds at most buffer_tokens)
_MAX_CHUNKS_PER_TURN = 4  # per stream: the others' turn comes first
_SEND_RETRY_S = 0.005  # how often a stream whose reader's queue is full tries again
_DEFAULT_S_PER_TOKEN = 0.02  # the retry-hint estimate before a stream has finished

# What a send returns: 0, or the errno ZeroMQ raised under ROUTER_MANDATORY + DONTWAIT.
SENT, BLOCKED, GONE = 0, errno.EAGAIN, errno.EHOSTUNREACH
SendFn = Callable[[list[Any], list[Any]], int]


def is_generation_backend(backend: Any) -> bool:
    """Whether a loaded backend streams tokens (a language model) rather than mapping arrays."""
    return isinstance(backend, GenerationBackend)


class WorkerStreams:
    """The worker's active streams (see the module docstring). Everything here runs on the
    worker loop's thread; each stream's producer (:meth:`WorkerStream.produce`) on its own.

    ``send(route, frames)`` sends without blocking and returns :data:`SENT`, :data:`BLOCKED`
    (the peer's queue is full) or :data:`GONE` (no such peer); ``backend_failure(model, exc)``
    is the worker's one place that turns an exception from backend code into a typed error.
    ``metrics``: set by the worker when metrics are on.
    """

    metrics: WorkerMetrics | None = None

    def __init__(
        self,
        spec: GenerationSpec,
        backends: dict[str, Any],
        codec: WireCodec,
        send: SendFn,
        backend_failure: Callable[[str, Exception], TandemError],
        wake: Callable[[], None],
        engines: dict[str, Engine] | None = None,
    ) -> None:
        self.spec = spec
        self.backends = backends
        self.codec = codec
        self._send = send
        self._backend_failure = backend_failure
        self._streams: dict[bytes, WorkerStream] = {}
        self.counters: Counter[str] = Counter()
        self._s_per_token = _DEFAULT_S_PER_TOKEN
        self._wake = wake
        self._engines = engines or {}

    # ------------------------------------------------------------------ the loop's view
    @property
    def active(self) -> int:
        """Streams in the table: running, or finishing (final message or producer pending)."""
        return len(self._streams)

    def next_due(self, now: float) -> float | None:
        """The earliest time :meth:`pump` has something to do without being woken (a deadline,
        a blocked send to retry), or None."""
        due: float | None = None
        for s in self._streams.values():
            if s.answered:
                continue
            t = s.deadline
            if s.final is not None:
                t = min(now + _SEND_RETRY_S, s.final_until)
            elif s.blocked_since is not None:
                t = now + _SEND_RETRY_S
            elif s.pending:  # left over from a turn that sent its most
                t = now
            elif s.first_deadline is not None and s.first_token_at is None:
                t = min(t, s.first_deadline)
            due = t if due is None else min(due, t)
        return due

    # ------------------------------------------------------------------ messages
    def start(
        self,
        route: list[Any],
        env: Envelope,
        make_room: Callable[[str, Any], object] | None = None,
    ) -> None:
        """Admit a ``generate`` request and start its producer. Raises a :class:`TandemError`
        (answered at once by the worker) when it cannot start; then nothing was started.
        ``make_room(model, backend)`` frees a backend slot (a verify session's) for the
        stream: called only once every check has passed, just before the stream starts."""
        req = parse_generate(env.payload, self.spec.max_prompt_bytes)
        running = self._streams.get(env.id)
        if running is not None:
            if running.route == route:  # a resend: the running stream is its one answer
                return
            raise BadRequest("a stream with this request id is already running on this worker")
        backend = self.backends.get(req.model)
        if backend is None:
            gen = [n for n, b in self.backends.items() if is_generation_backend(b)]
            raise UnknownModel(
                f"no model {req.model!r} here; language models: {', '.join(gen) or 'none'}"
            )
        if not is_generation_backend(backend):
            raise BadRequest(f"model {req.model!r} is not a language model: send it infer")
        if len(self._streams) >= self.spec.max_streams:
            self.counters["overloaded"] += 1
            wait_ms = self._retry_after_ms()
            raise OverloadedError(
                f"worker is running {len(self._streams)} streams (generation.max_streams); "
                f"retry in {wait_ms:.0f} ms or elsewhere",
                retry_after_ms=wait_ms,
            )
        engine = self._engines.get(req.model)
        if engine is not None:
            engine.admits(prompt_size(req))  # before a verify session gives its slot up
        if make_room is not None:
            make_room(req.model, backend)
        now = time.monotonic()
        s = WorkerStream(route, env, req, backend, now)
        limit = now + self.spec.max_stream_s
        if env.deadline is None or limit < env.deadline:
            s.deadline, s.deadline_why = (
                limit,
                f"generation.max_stream_s ({self.spec.max_stream_s:g} s)",
            )
        else:
            s.deadline = env.deadline
        if engine is not None:  # stepped with the model's other sequences
            s.resume = engine.poke
            engine.submit(StreamJob(s, self.spec.buffer_tokens, self._wake))
            self._streams[env.id] = s
            self.counters["started"] += 1
            return
        s.thread = threading.Thread(
            target=s.produce,
            args=(self.spec.buffer_tokens, self._wake),
            name=f"tandem-stream-{env.id.hex()[:8]}",
            daemon=True,
        )
        self._streams[env.id] = s
        self.counters["started"] += 1
        try:
            s.thread.start()
        except BaseException:  # no thread to be had: nothing started
            del self._streams[env.id]
            self.counters["started"] -= 1
            raise

    def cancel(self, route: list[Any], request_id: bytes) -> None:
        """A ``cancel`` from the client: stop the stream, answer ``end`` (cancelled). A cancel
        for a stream that is over (or another peer's) is ignored: its one answer went out."""
        s = self._streams.get(request_id)
        if s is None or s.answered or s.final is not None or s.route != route:
            self.counters["cancel_ignored"] += 1
            return
        s.stop_producer()
        self.counters["cancelled"] += 1
        self._set_final(s, self._end(s, FinishReason.CANCELLED), time.monotonic())

    def shutdown(self) -> None:
        """The worker is draining: every stream ends now with ``shutting_down``."""
        now = time.monotonic()
        for s in list(self._streams.values()):
            if not s.answered and s.final is None:
                self.counters["shut_down"] += 1
                self._fail(s, ShuttingDown("worker is shutting down; continue elsewhere"), now)

    # ------------------------------------------------------------------ the loop's turn
    def pump(self, now: float) -> None:
        """Send what each stream has ready, expire what is late, free what is over."""
        for s in list(self._streams.values()):
            if not s.answered:
                self._advance(s, now)
            if s.answered and s.done:
                del self._streams[s.id]

    def _advance(self, s: WorkerStream, now: float) -> None:
        if s.final is not None:
            self._send_final(s, now)
            return
        if now >= s.deadline:
            self.counters["expired"] += 1
            msg = f"the stream's {s.deadline_why} ran out on the worker after {s.sent} tokens"
            self._fail(s, DeadlineExceeded(msg), now)
            return
        if s.first_deadline is not None and s.first_token_at is None and now >= s.first_deadline:
            self.counters["expired"] += 1
            msg = f"no first token within first_token_ms ({s.req.first_token_ms} ms)"
            self._fail(s, DeadlineExceeded(msg), now)
            return
        if (
            s.blocked_since is not None
            and now - s.blocked_since >= self.spec.stall_timeout_ms / 1e3
        ):
            self.counters["stalled"] += 1
            msg = f"the reader took nothing for {self.spec.stall_timeout_ms} ms"
            self._fail(s, DeadlineExceeded(msg), now)
            return
        for _ in range(_MAX_CHUNKS_PER_TURN):  # one, unless a chunk's text bound split them
            with s.cond:
                steps = self._ready_steps(s)
                done = s.done
            if not steps:
                break
            result = self._send(
                s.route, self.codec.encode(s.env.reply(Kind.CHUNK, _chunk(s, steps)))
            )
            if result == BLOCKED:
                if s.blocked_since is None:
                    s.blocked_since = now
                return
            if result != SENT:
                self._gone(s)
                return
            s.sent += len(steps)
            s.blocked_since = None
            with s.cond:
                was_full = len(s.pending) >= self.spec.buffer_tokens
                for _ in steps:
                    s.pending.popleft()
                s.cond.notify_all()
            if was_full and s.resume is not None:
                s.resume()
        else:
            return  # more is pending: next_due says so
        if done:
            if s.failure is not None:
                self._fail(s, self._as_error(s), now)
            else:
                self.counters["completed"] += 1
                if s.produced > 1 and s.first_token_at is not None and s.finished_at is not None:
                    per = (s.finished_at - s.first_token_at) / (s.produced - 1)
                    self._s_per_token += 0.2 * (per - self._s_per_token)
                reason = s.finish_reason or FinishReason.STOP
                self._set_final(s, self._end(s, reason), now)

    def _ready_steps(self, s: WorkerStream) -> list[TokenStep]:
        """The pending steps that fit one chunk (all of them, up to the text bound)."""
        out: list[TokenStep] = []
        chars = 0
        for step in s.pending:
            chars += len(step.text)
            if out and chars > _MAX_CHUNK_CHARS:
                break
            out.append(step)
        return out

    def _fail(self, s: WorkerStream, err: TandemError, now: float) -> None:
        s.stop_producer()
        self._set_final(s, s.env.error_reply(err), now)

    def _set_final(self, s: WorkerStream, env: Envelope, now: float) -> None:
        s.final = self.codec.encode(env)
        s.final_until = now + self.spec.stall_timeout_ms / 1e3
        self._send_final(s, now)
        if self.metrics is not None:
            if env.kind is Kind.END:
                cancelled = env.payload["finish_reason"] == FinishReason.CANCELLED
                self._record(s, "cancelled" if cancelled else "ok")
            else:
                self._record(s, str(env.payload.get("code")))
        if tracing.TRACER is not None:
            run = None if s.started_at is None else (s.started_at, s.finished_at or now)
            attrs = {"tandem.model": s.req.model, "tandem.tokens": s.sent}
            tracing.record_worker_span(s.env, s.arrived, now, attrs, backend=run, reply=env)

    def _send_final(self, s: WorkerStream, now: float) -> None:
        assert s.final is not None
        result = self._send(s.route, s.final)
        if result == BLOCKED and now < s.final_until:
            return
        if result != SENT:
            self.counters["final_dropped"] += 1
        s.answered = True
        s.final = None

    def _gone(self, s: WorkerStream) -> None:
        """The reader's peer left (ROUTER_MANDATORY: unroutable): stop, tell no one."""
        s.stop_producer()
        s.answered = True
        self.counters["peer_gone"] += 1
        if self.metrics is not None:
            self._record(s, "peer_gone")

    def _record(self, s: WorkerStream, outcome: str) -> None:
        assert self.metrics is not None
        self.metrics.stream_end(
            s.req.model,
            outcome,
            arrived=s.arrived,
            first_token_at=s.first_token_at,
            last_token_at=s.finished_at if outcome == "ok" else None,
            tokens=s.sent,
            prompt_tokens=s.prompt_tokens,
        )

    def _as_error(self, s: WorkerStream) -> TandemError:
        e = s.failure
        if isinstance(e, OverloadedError):
            self.counters["overloaded"] += 1
            if not e.retry_after_ms:
                e.retry_after_ms = self._retry_after_ms()
            return e
        if isinstance(e, TandemError):
            if not isinstance(e, BadRequest):
                self.counters["failed"] += 1
            return e
        self.counters["failed"] += 1
        assert isinstance(e, Exception)
        return self._backend_failure(s.req.model, e)

    def _end(self, s: WorkerStream, reason: str) -> Envelope:
        now = time.monotonic()

        def ms(t: float | None) -> float | None:
            return None if t is None else round((t - s.arrived) * 1e3, 3)

        return s.env.reply(
            Kind.END,
            {
                "finish_reason": reason,
                "tokens": s.sent,
                "prompt_tokens": s.prompt_tokens,
                "model": s.req.model,
                "version": str(s.backend.version),
                "timings": {
                    "queue_ms": ms(s.started_at),
                    "ttft_ms": ms(s.first_token_at),
                    "total_ms": ms(now),
                },
            },
        )

    def _retry_after_ms(self) -> float:
        """When the soonest running stream should end: its tokens left × the measured time
        per token."""
        left = [
            max(0, s.req.params.max_tokens - s.produced)
            for s in self._streams.values()
            if not s.done
        ]
        return round(max(1.0, min(left, default=0) * self._s_per_token * 1e3), 1)

    # ------------------------------------------------------------------ reporting
    def health(self) -> dict[str, Any]:
        c = self.counters
        return {
            "active": len(self._streams),
            "max_streams": self.spec.max_streams,
            **{
                k: c.get(k, 0)
                for k in ("started", "completed", "cancelled", "expired", "failed", "overloaded")
            },
            "peer_gone": c.get("peer_gone", 0),
            "stalled": c.get("stalled", 0),
            "shut_down": c.get("shut_down", 0),
        }

    def using(self, backend: Any) -> int:
        """Streams in the table that run on ``backend`` (a model version the model admin
        replaced finishes them before it is closed)."""
        return sum(1 for s in self._streams.values() if s.backend is backend)

    def close(self) -> None:
        """Stop every producer (the worker has stopped serving)."""
        for s in self._streams.values():
            s.stop_producer()


def _chunk(s: WorkerStream, steps: list[TokenStep]) -> dict[str, Any]:
    return {
        "seq": s.sent,
        "tokens": [t.token for t in steps],
        "text": "".join(t.text for t in steps),
        "logprobs": [t.logprob for t in steps],
        "entropies": [t.entropy for t in steps],
    }
