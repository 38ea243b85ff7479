"""A connection to one or several cloud workers: the edge's step 5 of the request path, and
what an MoE dispatcher uses to reach its expert shards.

**Several workers**: a call goes to the connected worker with the fewest calls outstanding
from this client. While it waits, the client watches the connection: when the worker is lost
(ZeroMQ saw the TCP connection close, or its heartbeats went unanswered for
``heartbeat_timeout_ms``), the same request — same id — is sent to another worker inside what
is left of the deadline (:class:`~tandem.runtime.client.pool.Failover`). ``Overloaded`` and
``ShuttingDown`` answers fail over too. Request ids are idempotency keys: a worker that
already answered an id answers a retry from its cache instead of running it again, and the
client returns exactly one answer per call (a late reply to an earlier try is dropped).

**Streams** (:meth:`CloudClient.generate`): :class:`~tandem.runtime.client.streams.RemoteStream`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
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
    ms_left,
)
from tandem.runtime.client.streams import RemoteStream
from tandem.runtime.curve import ClientKeys
from tandem.runtime.errors import (
    DeadlineExceeded,
    LimitExceeded,
    MalformedMessage,
    Unavailable,
    WireError,
)
from tandem.runtime.wire import (
    Envelope,
    Kind,
    WireCodec,
    WireLimits,
    deadline_after,
    frames_nbytes,
    recv_frames,
    send_frames,
)

if TYPE_CHECKING:
    from tandem.runtime.generation import SamplingParams  # imports the kernels: only when used

log = logging.getLogger(__name__)


class CloudClient:
    """Requests to one worker endpoint, or to several that serve the same models. Safe to
    call from many threads.

    When a request finds no connection to any worker and none comes up before its deadline,
    the link is taken as down for ``down_backoff_s``: requests in that window that find no
    connection fail at once with :class:`Unavailable` instead of each waiting out its
    deadline. ZeroMQ keeps reconnecting meanwhile, and a request that finds a connection back
    goes through.

    ``heartbeat_ivl_ms``/``heartbeat_timeout_ms`` set ZeroMQ's ZMTP heartbeats on every
    socket: a worker that stops answering them (a dead host, a cut cable: no TCP reset) is
    dropped after the timeout, and its requests fail over.

    ``curve``: CurveZMQ keys, as :class:`~tandem.runtime.curve.ClientKeys` or a pair of paths
    ``(client secret key file, worker public key file)``, loaded here (a bad file raises
    :class:`ConfigError` now, not at the first request). A worker that refuses the client's key
    looks like no connection: requests fail with :class:`Unavailable`.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        limits: WireLimits | None = None,
        context: zmq.Context | None = None,
        down_backoff_s: float = 1.0,
        heartbeat_ivl_ms: int = 500,
        heartbeat_timeout_ms: int = 1500,
        curve: ClientKeys | tuple[str | Path, str | Path] | None = None,
    ) -> None:
        self.curve = ClientKeys.load(*curve) if isinstance(curve, tuple) else curve
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self.endpoints:
            raise ValueError("CloudClient needs at least one endpoint")
        self.codec = WireCodec(limits)
        self.pool = WorkerPool(
            self.endpoints,
            self.codec,
            context or zmq.Context.instance(),
            down_backoff_s=down_backoff_s,
            heartbeat=(heartbeat_ivl_ms, heartbeat_timeout_ms),
            curve=self.curve,
        )

    @property
    def endpoint(self) -> str:
        """The first endpoint (the only one for a single-worker client)."""
        return self.endpoints[0]

    @property
    def failovers(self) -> int:
        """Tries sent to another worker after a first one, over the client's life."""
        return self.pool.failovers

    def request(self, env: Envelope, timeout_s: float) -> Envelope:
        """Send ``env`` and wait up to ``timeout_s`` for its reply (failing over between
        workers inside that time). The request carries what is left of ``timeout_s`` (or of
        its own deadline, if sooner) as its budget.

        Raises :class:`Unavailable` (no connection), :class:`DeadlineExceeded` (no reply in
        time), a :class:`WireError` (unreadable reply) or whatever error the worker answered.
        """
        socks = self.pool.checkout()
        try:
            return self._request(socks, env, timeout_s)[0]
        finally:
            self.pool.checkin(socks)

    def connection(self) -> Connection:
        """A socket set held until its ``close()``: every call through it reaches a worker as
        the same peer, as a speculative-decoding session needs (a worker scopes its sessions
        to the peer that opened them)."""
        return Connection(self)

    def _request(
        self, socks: Sockets, env: Envelope, timeout_s: float, prefer: int | None = None
    ) -> tuple[Envelope, int]:
        deadline = deadline_after(timeout_s)
        if env.deadline is None or env.deadline > deadline:
            env.deadline = deadline
        tries = Failover(self.pool, socks, f"request {env.id.hex()[:8]}", prefer)
        attempt = 0
        while True:
            i = tries.next_endpoint(deadline)
            self.pool.started(i)
            span = None
            if tracing.TRACER is not None:  # one span per try; env.trace: its context
                span = tracing.start_client_span(env, self.endpoints[i], attempt)
            attempt += 1
            err: BaseException | None = None
            try:
                return self._exchange(socks[i], self.endpoints[i], env, deadline, timeout_s), i
            except _WorkerLost as e:
                err = Unavailable(f"lost the connection to {self.endpoints[i]}: {e}")
                tries.failed(err)
            except FAILOVER_ERRORS as e:
                err = e
                tries.failed(e)
            except BaseException as e:
                err = e
                raise
            finally:
                self.pool.done(i)
                if span is not None:
                    tracing.end_span(span, err)

    def _exchange(
        self, sock: zmq.Socket, endpoint: str, env: Envelope, deadline: float, timeout_s: float
    ) -> Envelope:
        frames = self.codec.encode(env)  # encoded per try: the budget shrinks
        size = frames_nbytes(frames)
        if size > self.codec.limits.max_message_bytes:  # ZeroMQ would cut the link, not answer
            raise LimitExceeded(
                f"request is {size} bytes, over max_message_bytes "
                f"({self.codec.limits.max_message_bytes}): split it"
            )
        send_frames(sock, frames)
        while True:
            left = ms_left(deadline)
            if left <= 0:
                raise DeadlineExceeded(f"no reply from {endpoint} within {timeout_s * 1e3:.1f} ms")
            try:
                # a blocking receive (RCVTIMEO = _WATCH_MS) is one call; the last few ms before
                # the deadline are waited for exactly with a poll
                if not (left >= WATCH_MS or zmq.zmq_poll([(sock, POLLIN)], left)):
                    continue
                frames = recv_frames(sock, 1, self.codec.limits.max_frames)
            except zmq.Again:
                if not cast(int, sock.getsockopt(EVENTS)) & POLLOUT:
                    raise _WorkerLost("connection closed while waiting for the reply") from None
                continue
            try:
                reply = self.codec.decode(frames)
            except WireError as e:
                if e.request_id == env.id:
                    raise
                log.warning("dropped an unreadable reply from %s: %s", endpoint, e)
                continue
            if reply.id == env.id:
                return reply.raise_if_error()
            log.debug("dropped a late reply %s", reply.id.hex())

    def infer(
        self,
        model: str,
        inputs: np.ndarray,
        *,
        task: str = "",
        tags: tuple[str, ...] = (),
        timeout_s: float,
        request_id: bytes | None = None,
    ) -> dict[str, Any]:
        """Run ``model`` on a worker; returns the reply payload (``outputs``, ``version``…).
        ``request_id`` (16 bytes, default: random) is the idempotency key."""
        env = Envelope(
            kind=Kind.INFER, task=task, tags=tags, payload={"model": model, "inputs": inputs}
        )
        if request_id is not None:
            env.id = request_id
        payload = self.request(env, timeout_s).payload
        if not isinstance(payload, dict) or not isinstance(payload.get("outputs"), np.ndarray):
            raise MalformedMessage("infer reply has no outputs array")
        return payload

    def generate(
        self,
        model: str,
        prompt: str,
        params: SamplingParams | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        task: str = "",
        tags: tuple[str, ...] = (),
        timeout_s: float | None = None,
        first_token_s: float | None = None,
        request_id: bytes | None = None,
    ) -> RemoteStream:
        """Start streaming ``model``'s continuation of ``prompt`` on a worker; iterate the
        returned :class:`RemoteStream` for :class:`RemoteChunk` s, then read its ``end``.

        With ``messages`` (a chat), the worker renders them with its model's own chat
        template and ``prompt`` is the assistant's text so far (``""`` for a new answer).

        ``timeout_s`` bounds the whole answer and ``first_token_s`` the wait for its first
        token (None: no bound of that kind; the worker still ends a stream after its
        ``generation.max_stream_s``). Each is sent as a budget and watched here too: past it,
        iteration raises :class:`DeadlineExceeded` (and the stream is cancelled). ``params``
        default to greedy, 64 tokens. Use the call as a context manager (or ``close()`` it)
        to cancel a stream you stop reading.
        """
        if params is None:
            from tandem.runtime.generation import SamplingParams

            params = SamplingParams()
        text = {"prompt": prompt} if messages is None else {"messages": messages, "prefix": prompt}
        payload = {
            "model": model,
            **text,
            "max_tokens": params.max_tokens,
            "temperature": float(params.temperature),
            "top_p": float(params.top_p),
            "seed": params.seed,
            "stop": list(params.stop),
            "first_token_ms": None,
        }
        env = Envelope(kind=Kind.GENERATE, task=task, tags=tags, payload=payload)
        if request_id is not None:
            env.id = request_id
        return RemoteStream(self.pool, env, timeout_s, first_token_s)

    def health(self, timeout_s: float = 2.0) -> dict[str, Any]:
        return self.request(Envelope(kind=Kind.HEALTH), timeout_s).payload

    def admin(self, op: str, model: str | None = None, timeout_s: float = 120.0) -> dict[str, Any]:
        """Ask the worker to ``list``, ``load``, ``replace`` or ``unload`` (``model``) its
        models, or ``reload`` them all from its config and manifest; returns the result once
        done (see :mod:`tandem.cloud.model_admin`). Send it to one worker (a client of one
        endpoint): an admin message is about that worker. ``timeout_s`` covers the loading
        and warm-up of a new version."""
        payload = {"op": op, "model": model}
        return self.request(Envelope(kind=Kind.ADMIN, payload=payload), timeout_s).payload

    def echo(self, payload: Any, timeout_s: float = 2.0) -> Any:
        return self.request(Envelope(kind=Kind.ECHO, payload=payload), timeout_s).payload

    def close(self) -> None:
        """Close the client: new calls raise :class:`Unavailable`; calls in flight finish on
        their own sockets, which close as they return. Safe from any thread."""
        self.pool.close()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Connection:
    """Calls that must reach the workers as one peer (:meth:`CloudClient.connection`): one
    socket set, held from creation to ``close()``. Not thread-safe (one caller)."""

    def __init__(self, client: CloudClient) -> None:
        self._client = client
        self._socks: Sockets | None = client.pool.checkout()

    def request_via(
        self, env: Envelope, timeout_s: float, prefer: int | None = None
    ) -> tuple[Envelope, int]:
        """:meth:`CloudClient.request`, sent first to endpoint ``prefer`` (an index into
        ``endpoints``) when it is connected — the worker that holds the caller's session;
        returns the reply and the index of the endpoint that gave it."""
        if self._socks is None:
            raise Unavailable("connection is closed")
        return self._client._request(self._socks, env, timeout_s, prefer)

    def notify(self, env: Envelope, prefer: int = 0) -> bool:
        """Send ``env`` to endpoint ``prefer`` without waiting for the reply (it is dropped
        when it comes): a clean-up such as closing a speculative session. False if that
        endpoint is not connected or its queue is full."""
        if self._socks is None:
            return False
        sock = self._socks[prefer]
        if not cast(int, sock.getsockopt(EVENTS)) & POLLOUT:
            return False
        if env.deadline is None:
            env.deadline = deadline_after(1.0)
        try:
            send_frames(sock, self._client.codec.encode(env), DONTWAIT)
        except zmq.Again:
            return False
        return True

    def close(self) -> None:
        """Give the sockets back to the client's pool. Idempotent."""
        socks, self._socks = self._socks, None
        if socks is not None:
            self._client.pool.checkin(socks)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _WorkerLost(Exception):
    """The connection a request went out on closed before its reply came."""
