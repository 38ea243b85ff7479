"""Streams from a cloud worker, client side: what :meth:`CloudClient.generate
<tandem.runtime.client.CloudClient.generate>` returns.

A :class:`RemoteStream` holds its socket set for the stream's whole life and yields
:class:`RemoteChunk` s; when the caller reads slower than the
worker sends, every chunk already received is merged into one. Until the first chunk, a lost
worker, ``Overloaded`` or ``ShuttingDown`` fails over to another endpoint inside the deadline
(same id), as a request does; after it, losing the worker (the same connection watch:
ZeroMQ's disconnect or its heartbeats) raises :class:`StreamInterrupted` with the tokens
received, so the caller can finish the answer elsewhere. Closing a call (or leaving its
``with`` block, or dropping it) before its end sends ``cancel``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import zmq

from tandem.runtime import tracing
from tandem.runtime.client.pool import (
    DONTWAIT,
    EVENTS,
    FAILOVER_ERRORS,
    POLLIN,
    POLLOUT,
    WATCH_MS,
    Failover,
    Sockets,
    WorkerPool,
    error_of,
    ms_left,
)
from tandem.runtime.errors import (
    DeadlineExceeded,
    LimitExceeded,
    MalformedMessage,
    ShuttingDown,
    StreamInterrupted,
    TandemError,
    Unavailable,
    WireError,
)
from tandem.runtime.wire import Envelope, Kind, frames_nbytes, recv_frames, send_frames

log = logging.getLogger(__name__)

_MAX_MERGE = 1000  # chunk messages merged into one RemoteChunk at most (ZeroMQ's default RCVHWM)
_CONNECT_WAIT_S = 5.0  # how long a stream with no deadline waits for a connection


@dataclass(frozen=True, slots=True)
class RemoteChunk:
    """Consecutive tokens of a generated answer: ``seq`` is the index of the first one in the
    answer; ``logprobs`` (log p under the model) and ``entropies`` (nats; None where the
    backend cannot see them) have one value per token."""

    seq: int
    tokens: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...]
    entropies: tuple[float | None, ...]

    @classmethod
    def merge(cls, chunks: Sequence[RemoteChunk]) -> RemoteChunk:
        """One chunk holding consecutive ``chunks``."""
        if len(chunks) == 1:
            return chunks[0]
        return cls(
            chunks[0].seq,
            tuple(t for c in chunks for t in c.tokens),
            "".join(c.text for c in chunks),
            tuple(v for c in chunks for v in c.logprobs),
            tuple(v for c in chunks for v in c.entropies),
        )


class RemoteStream:
    """One streaming generation (from :meth:`CloudClient.generate`): iterate for
    :class:`RemoteChunk` s. Afterwards ``end`` holds the worker's ``end`` payload (``finish_reason``,
    ``tokens``, ``prompt_tokens``, ``model``, ``version``, ``timings``); ``text`` and
    ``tokens`` are what was received so far at any time.

    Not thread-safe (one reader). ``close()`` — also on leaving a ``with`` block, and on
    garbage collection as a last resort — cancels a stream that has not ended and returns the
    sockets to the client's pool.
    """

    def __init__(
        self,
        pool: WorkerPool,
        env: Envelope,
        timeout_s: float | None,
        first_token_s: float | None,
    ) -> None:
        self.id = env.id
        self.end: dict[str, Any] | None = None
        self.tokens = 0  # tokens received
        self._text: list[str] = []
        self._pool = pool
        self._env = env
        now = time.monotonic()
        self._deadline = None if timeout_s is None else now + timeout_s
        self._first_deadline = None if first_token_s is None else now + first_token_s
        self._timeouts = (timeout_s, first_token_s)
        env.deadline = self._deadline
        self._socks: Sockets | None = None
        self._i: int | None = None  # the endpoint streaming to us
        self._last_i = 0
        self._open = False  # a generate is out and its end/error has not come
        self._done = False  # iteration is over
        self._stashed: Envelope | None = None  # an end/error received behind merged chunks
        # encoded now: the finaliser may run inside this thread's own encode (msgpack's packer
        # is not reentrant), so it must not encode
        cancel = Envelope(kind=Kind.CANCEL, id=self.id, task=env.task)
        self._cancel_frames = pool.codec.encode(cancel)
        # traced: one tandem.cloud.request span per try, children of the caller's context now
        self._trace_parent = None if tracing.TRACER is None else tracing.current_context()
        self._span: Any = None
        self._attempt = 0
        self._socks = pool.checkout()
        self._tries = Failover(pool, self._socks, f"generate {self.id.hex()[:8]}")
        try:
            self._send_next()
        except BaseException:
            self._release(cancel=False)
            raise

    @property
    def text(self) -> str:
        """The answer's text received so far."""
        return "".join(self._text)

    @property
    def finish_reason(self) -> str | None:
        return None if self.end is None else self.end.get("finish_reason")

    @property
    def endpoint(self) -> str:
        """The worker this answer was last sent to (the one streaming it, once it streams)."""
        return self._pool.endpoints[self._last_i]

    def __iter__(self) -> RemoteStream:
        return self

    def __next__(self) -> RemoteChunk:
        if self._done:
            raise StopIteration
        try:
            chunk = self._next_chunk()
        except BaseException:
            self._release(cancel=True)
            raise
        if chunk is None:
            self._release(cancel=False)
            raise StopIteration
        return chunk

    def close(self) -> None:
        """Cancel the stream if it has not ended, and give the sockets back. Idempotent."""
        self._release(cancel=True)

    def __enter__(self) -> RemoteStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        # A finaliser runs wherever the garbage collector happens to run — possibly inside a
        # call of this thread that holds the pool's lock — so it takes no lock: the cancel is
        # sent on this stream's own sockets, the rest is settled at the pool's next checkout.
        # Interpreter shutdown, a closed context: nothing left to free.
        with contextlib.suppress(Exception):
            if self._socks is not None and not self._done:
                self._done = True
                i, self._i = self._i, None
                if i is not None and self._open:
                    self._send_cancel(i)
                self._pool.give_back_later(self._socks, i)
                self._socks = None

    # ------------------------------------------------------------------ sending
    def _send_next(self) -> None:
        """Send the generate to the least loaded endpoint not tried yet."""
        pool, socks = self._pool, self._socks
        assert socks is not None
        wait_until = min(
            (d for d in (self._deadline, self._first_deadline) if d is not None),
            default=time.monotonic() + _CONNECT_WAIT_S,
        )
        i = self._tries.next_endpoint(wait_until)
        if self._first_deadline is not None:
            self._env.payload["first_token_ms"] = ms_left(self._first_deadline)
        if self._trace_parent is not None and tracing.TRACER is not None:
            self._span = tracing.start_client_span(
                self._env, pool.endpoints[i], self._attempt, self._trace_parent
            )
            self._attempt += 1
        frames = pool.codec.encode(self._env)  # per try: the budgets shrink
        size = frames_nbytes(frames)
        if size > pool.codec.limits.max_message_bytes:
            raise LimitExceeded(
                f"generate request is {size} bytes, over max_message_bytes "
                f"({pool.codec.limits.max_message_bytes}): shorten the prompt"
            )
        send_frames(socks[i], frames)
        pool.started(i)
        self._i = self._last_i = i
        self._open = True

    def _fail_over(self, err: TandemError) -> None:
        """Before the first chunk: try the next endpoint, or raise ``err`` when none is left."""
        if self._span is not None:
            tracing.end_span(self._span, err)
            self._span = None
        self._leave(cancel=isinstance(err, Unavailable))
        self._tries.failed(err)
        self._send_next()

    def _leave(self, cancel: bool) -> None:
        """Stop streaming from the current endpoint (best-effort cancel first)."""
        if self._span is not None:
            tracing.end_span(self._span)
            self._span = None
        i, self._i = self._i, None
        if i is None or self._socks is None:
            return
        if cancel and self._open:
            self._send_cancel(i)
        self._open = False
        self._pool.done(i)

    def _send_cancel(self, i: int) -> None:
        """Best effort: with no connection, the worker frees the stream when it sees the peer
        gone."""
        assert self._socks is not None
        with contextlib.suppress(zmq.ZMQError):
            send_frames(self._socks[i], self._cancel_frames, DONTWAIT)

    def _release(self, cancel: bool) -> None:
        self._done = True
        self._leave(cancel)
        socks, self._socks = self._socks, None
        if socks is not None:
            self._pool.checkin(socks)

    # ------------------------------------------------------------------ receiving
    def _next_chunk(self) -> RemoteChunk | None:
        """The next chunk (every chunk already received, merged), or None after the end."""
        chunks: list[RemoteChunk] = []
        while len(chunks) < _MAX_MERGE:
            env, self._stashed = self._stashed, None
            if env is None:
                env = self._receive(block=not chunks)
                if env is None:
                    break
            if env.kind is Kind.CHUNK:
                chunks.append(self._take_chunk(env.payload))
                continue
            if chunks:  # the end (or error) after the chunks: deliver the chunks first
                self._stashed = env
                break
            if env.kind is Kind.END:
                self._take_end(env.payload)
                return None
            if env.kind is Kind.ERROR:
                err = error_of(env)
                if self.tokens == 0 and isinstance(err, FAILOVER_ERRORS):
                    self._fail_over(err)
                    continue
                self._open = False
                if isinstance(err, ShuttingDown):
                    raise self._interrupted(f"worker is shutting down ({err.message})")
                raise err
            raise MalformedMessage(f"a stream got a {env.kind.value!r} message")
        return RemoteChunk.merge(chunks) if chunks else None

    def _receive(self, block: bool) -> Envelope | None:
        """The next message of this stream; None if ``block`` is false and none is waiting.
        Watches the deadlines and the connection while it blocks."""
        codec = self._pool.codec
        while True:
            assert self._socks is not None and self._i is not None
            sock = self._socks[self._i]
            if block:
                left = self._wait_ms()
                try:
                    if not (left >= WATCH_MS or zmq.zmq_poll([(sock, POLLIN)], left)):
                        continue
                    frames = recv_frames(sock, 1, codec.limits.max_frames)
                except zmq.Again:
                    if not cast(int, sock.getsockopt(EVENTS)) & POLLOUT:
                        self._on_lost()
                    continue
            else:
                if not cast(int, sock.getsockopt(EVENTS)) & POLLIN:
                    return None
                frames = recv_frames(sock, 1, codec.limits.max_frames)
            try:
                env = codec.decode(frames)
            except WireError as e:
                if e.request_id == self.id:
                    raise
                log.warning("dropped an unreadable message: %s", e)
                continue
            if env.id == self.id:
                return env
            log.debug("dropped a late message %s", env.id.hex())

    def _wait_ms(self) -> int:
        """ms to the nearest deadline that applies now (a large number without one); raises
        :class:`DeadlineExceeded` once one has passed."""
        total, first = self._timeouts
        left = WATCH_MS * 100
        if self._deadline is not None:
            left = ms_left(self._deadline)
            if left <= 0:
                raise DeadlineExceeded(
                    f"stream not finished within {total * 1e3:.1f} ms ({self.tokens} tokens)"
                )
        if self._first_deadline is not None and self.tokens == 0:
            first_left = ms_left(self._first_deadline)
            if first_left <= 0:
                raise DeadlineExceeded(f"no first token within {first * 1e3:.1f} ms")
            left = min(left, first_left)
        return left

    def _on_lost(self) -> None:
        endpoint = self.endpoint
        if self.tokens == 0:
            self._fail_over(Unavailable(f"lost the connection to {endpoint}"))
            return
        self._open = False
        raise self._interrupted(f"lost the connection to {endpoint}")

    def _interrupted(self, why: str) -> StreamInterrupted:
        return StreamInterrupted(
            f"{why} after {self.tokens} tokens; continue the answer elsewhere "
            "(prompt + the text so far)",
            tokens=self.tokens,
        )

    def _take_chunk(self, p: Any) -> RemoteChunk:
        if not (
            type(p) is dict
            and type(p.get("seq")) is int
            and type(p.get("tokens")) is list
            and type(p.get("text")) is str
            and type(p.get("logprobs")) is list
            and type(p.get("entropies")) is list
            and len(p["tokens"]) == len(p["logprobs"]) == len(p["entropies"]) > 0
            and all(type(t) is int for t in p["tokens"])
            and all(type(v) is float for v in p["logprobs"])
            and all(v is None or type(v) is float for v in p["entropies"])
        ):
            raise MalformedMessage("chunk payload: {seq, tokens, text, logprobs, entropies}")
        if p["seq"] != self.tokens:
            raise MalformedMessage(f"chunk seq {p['seq']}, expected {self.tokens}: gap or repeat")
        chunk = RemoteChunk(
            p["seq"], tuple(p["tokens"]), p["text"], tuple(p["logprobs"]), tuple(p["entropies"])
        )
        self.tokens += len(chunk.tokens)
        self._text.append(chunk.text)
        return chunk

    def _take_end(self, p: Any) -> None:
        self._open = False
        if not (type(p) is dict and type(p.get("finish_reason")) is str):
            raise MalformedMessage("end payload has no finish_reason")
        if p.get("tokens") != self.tokens:
            raise MalformedMessage(f"end says {p.get('tokens')} tokens, {self.tokens} came")
        self.end = p
