"""A connection to one or several cloud workers: the edge's step 5 of the request path, and
what an MoE dispatcher uses to reach its expert shards.

ZeroMQ sockets are not thread-safe, so a request checks out a set of DEALER sockets (one per
endpoint) from a small pool for its duration and returns it after: no socket is ever used by
two threads at once, none is closed under a request in flight, and the number of sockets
follows the number of concurrent requests, not of threads ever seen (a thread per request
would otherwise leak a socket and a file descriptor per thread). Replies are matched by
request id.

**Several workers** (zguide's "Freelance" pattern, client side): a request goes to the
connected worker with the fewest requests outstanding from this client. While it waits, the
client watches the connection: when the worker is lost (ZeroMQ saw the TCP connection close,
or its heartbeats went unanswered for ``heartbeat_timeout_ms``), the same request — same id —
is sent to another worker inside what is left of the deadline. ``Overloaded`` and
``ShuttingDown`` answers fail over too. Request ids are idempotency keys: a worker that
already answered an id answers a retry from its cache instead of running it again, and the
client returns exactly one answer per call (a late reply to an earlier try is dropped).

**Streams** (:meth:`CloudClient.generate`): see :mod:`tandem.runtime.streaming`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import zmq

from tandem.runtime.curve import ClientKeys
from tandem.runtime.errors import (
    DeadlineExceeded,
    LimitExceeded,
    MalformedMessage,
    OverloadedError,
    ShuttingDown,
    TandemError,
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
    from tandem.runtime.streaming import GenerationCall

log = logging.getLogger(__name__)

# plain ints: pyzmq's flag enums cost more than the calls they are passed to
_EVENTS, _POLLIN, _POLLOUT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT)
_DONTWAIT = int(zmq.DONTWAIT)
# While waiting for a reply, the connection is checked this often (ms): how soon a dead
# worker is noticed once ZeroMQ has dropped its connection.
_WATCH_MS = 10
_FAILOVER_ERRORS = (OverloadedError, ShuttingDown)
_MAX_ROUNDS = 2  # tries per request: at most this many rounds over the endpoints
_MAX_IDLE_SETS = 64  # socket sets kept for reuse; more concurrent requests make (and close) more


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
        self.down_backoff_s = down_backoff_s
        self.heartbeat = (heartbeat_ivl_ms, heartbeat_timeout_ms)
        self._down_until = 0.0  # monotonic time until which the link is taken as down
        self.codec = WireCodec(limits)
        self._ctx = context or zmq.Context.instance()
        self._idle: list[list[zmq.Socket]] = []  # socket sets not in use (LIFO: warm first)
        self._in_use = 0
        self._lock = threading.Lock()
        self._closed = False
        self._outstanding = [0] * len(self.endpoints)  # requests in flight, all threads
        self._rotate = itertools.count()
        self.failovers = 0

    @property
    def endpoint(self) -> str:
        """The first endpoint (the only one for a single-worker client)."""
        return self.endpoints[0]

    def _checkout(self) -> list[zmq.Socket]:
        with self._lock:
            if self._closed:
                raise Unavailable("client is closed")
            self._in_use += 1
            if self._idle:
                return self._idle.pop()
        try:
            return [self._new_socket(ep) for ep in self.endpoints]
        except BaseException:
            with self._lock:
                self._in_use -= 1
            raise

    def _checkin(self, socks: list[zmq.Socket]) -> None:
        with self._lock:
            self._in_use -= 1
            if not self._closed and len(self._idle) < _MAX_IDLE_SETS:
                self._idle.append(socks)
                return
        for sock in socks:
            sock.close(linger=0)

    def _new_socket(self, endpoint: str) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing toward a peer that is not there
        sock.setsockopt(zmq.MAXMSGSIZE, self.codec.limits.max_message_bytes)
        ivl, timeout = self.heartbeat
        if ivl:
            sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout)
            sock.setsockopt(zmq.HEARTBEAT_TTL, timeout)
        sock.setsockopt(zmq.RCVTIMEO, _WATCH_MS)  # how often a waiting request checks its link
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self.curve is not None:
            self.curve.apply(sock)
        sock.connect(endpoint)
        return sock

    def request(self, env: Envelope, timeout_s: float) -> Envelope:
        """Send ``env`` and wait up to ``timeout_s`` for its reply (failing over between
        workers inside that time). The request carries what is left of ``timeout_s`` (or of
        its own deadline, if sooner) as its budget.

        Raises :class:`Unavailable` (no connection), :class:`DeadlineExceeded` (no reply in
        time), a :class:`WireError` (unreadable reply) or whatever error the worker answered.
        """
        return self.request_via(env, timeout_s)[0]

    def request_via(
        self, env: Envelope, timeout_s: float, prefer: int | None = None
    ) -> tuple[Envelope, int]:
        """:meth:`request`, sent first to endpoint ``prefer`` (an index into ``endpoints``)
        when it is connected — a worker that holds state for the caller, e.g. a speculative
        session; returns the reply and the index of the endpoint that gave it."""
        socks = self._checkout()
        try:
            return self._request(socks, env, timeout_s, prefer)
        finally:
            self._checkin(socks)

    def notify(self, env: Envelope, prefer: int = 0) -> bool:
        """Send ``env`` to endpoint ``prefer`` without waiting for the reply (it is dropped
        when it comes): a clean-up such as closing a speculative session. False if that
        endpoint is not connected or its queue is full."""
        socks = self._checkout()
        try:
            sock = socks[prefer]
            if not cast(int, sock.getsockopt(_EVENTS)) & _POLLOUT:
                return False
            if env.deadline is None:
                env.deadline = deadline_after(1.0)
            try:
                send_frames(sock, self.codec.encode(env), _DONTWAIT)
            except zmq.Again:
                return False
            return True
        finally:
            self._checkin(socks)

    def _request(
        self, socks: list[zmq.Socket], env: Envelope, timeout_s: float, prefer: int | None = None
    ) -> tuple[Envelope, int]:
        deadline = deadline_after(timeout_s)
        if env.deadline is None or env.deadline > deadline:
            env.deadline = deadline
        tried: set[int] = set()
        lost: TandemError | None = None
        for attempt in range(_MAX_ROUNDS * len(socks)):
            i = self._pick(socks, tried, deadline, first_try=attempt == 0, prefer=prefer)
            if i is None:
                break
            tried.add(i)
            if attempt:
                self.failovers += 1
            with self._lock:
                self._outstanding[i] += 1
            try:
                return self._exchange(socks[i], self.endpoints[i], env, deadline, timeout_s), i
            except _WorkerLost as e:
                lost = Unavailable(f"lost the connection to {self.endpoints[i]}: {e}")
                log.info("%s; failing over", lost.message)
            except _FAILOVER_ERRORS as e:
                if len(self.endpoints) == 1:
                    raise
                lost = e
                log.info("%s answered %s; failing over", self.endpoints[i], e.code)
            finally:
                with self._lock:
                    self._outstanding[i] -= 1
            if len(tried) == len(socks):
                if not isinstance(lost, Unavailable):
                    raise lost  # every worker answered Overloaded/ShuttingDown: say so
                tried.clear()  # every worker lost: retry whichever connects again in time
        assert lost is not None  # the loop ends early only after a try that failed over
        raise lost

    def _pick(
        self,
        socks: list[zmq.Socket],
        tried: set[int],
        deadline: float,
        first_try: bool,
        prefer: int | None = None,
    ) -> int | None:
        """The connected worker not tried yet with the fewest outstanding requests (``prefer``
        first, if it is connected and not tried), waiting for a connection until ``deadline``;
        None when time ran out after an earlier try."""
        if (
            prefer is not None
            and prefer not in tried
            and 0 <= prefer < len(socks)
            and cast(int, socks[prefer].getsockopt(_EVENTS)) & _POLLOUT
        ):
            return prefer
        while True:
            start = next(self._rotate)  # spreads ties
            best, best_load = None, 0
            for k in range(len(socks)):
                i = (start + k) % len(socks)
                if i in tried or not cast(int, socks[i].getsockopt(_EVENTS)) & _POLLOUT:
                    continue
                if best is None or self._outstanding[i] < best_load:
                    best, best_load = i, self._outstanding[i]
            if best is not None:
                return best
            # With IMMEDIATE set there is no queue toward an absent peer: wait for a
            # connection (a fresh socket may still be connecting) at most until the deadline.
            if first_try and time.monotonic() < self._down_until:
                raise Unavailable(f"no connection to {', '.join(self.endpoints)} (link down)")
            left = _ms_left(deadline)
            if left <= 0:
                if first_try:
                    self._down_until = time.monotonic() + self.down_backoff_s
                    raise Unavailable(
                        f"no connection to {', '.join(self.endpoints)} (no worker listening, "
                        "or a CurveZMQ handshake refused: check cloud.server_key/client_key "
                        "against the worker's curve settings)"
                    )
                return None
            zmq.zmq_poll([(s, _POLLOUT) for i, s in enumerate(socks) if i not in tried], left)

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
            left = _ms_left(deadline)
            if left <= 0:
                raise DeadlineExceeded(f"no reply from {endpoint} within {timeout_s * 1e3:.1f} ms")
            try:
                # a blocking receive (RCVTIMEO = _WATCH_MS) is one call; the last few ms before
                # the deadline are waited for exactly with a poll
                if not (left >= _WATCH_MS or zmq.zmq_poll([(sock, _POLLIN)], left)):
                    continue
                frames = recv_frames(sock, 1, self.codec.limits.max_frames)
            except zmq.Again:
                if not cast(int, sock.getsockopt(_EVENTS)) & _POLLOUT:
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
    ) -> GenerationCall:
        """Start streaming ``model``'s continuation of ``prompt`` on a worker; iterate the
        returned :class:`GenerationCall` for :class:`Chunk` s, then read its ``end``.

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
        from tandem.runtime.streaming import GenerationCall

        return GenerationCall(self, env, timeout_s, first_token_s)

    def health(self, timeout_s: float = 2.0) -> dict[str, Any]:
        return self.request(Envelope(kind=Kind.HEALTH), timeout_s).payload

    def echo(self, payload: Any, timeout_s: float = 2.0) -> Any:
        return self.request(Envelope(kind=Kind.ECHO, payload=payload), timeout_s).payload

    def close(self) -> None:
        """Close the client: new requests raise :class:`Unavailable`; requests in flight finish
        on their own sockets, which close as they return. Safe from any thread."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for socks in idle:
            for sock in socks:
                sock.close(linger=0)

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _error_of(env: Envelope) -> TandemError:
    try:
        env.raise_if_error()
    except TandemError as e:
        return e
    raise AssertionError("not an error envelope")


class _WorkerLost(Exception):
    """The connection a request went out on closed before its reply came."""


def _ms_left(deadline: float) -> int:
    return max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
