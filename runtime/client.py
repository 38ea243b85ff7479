"""A connection to a cloud worker: the edge's step 5 of the request path, and what an MoE
dispatcher uses to reach its expert shards.

ZeroMQ sockets are not thread-safe, so each calling thread gets its own DEALER socket, created on
first use and owned by that thread alone: no lock and no hand-off to an I/O thread on the hot
path. Replies are matched by request id; a reply that arrives after its caller gave up is
dropped by the next call on that socket, so a request is answered at most once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, cast

import numpy as np
import zmq

from tandem.runtime.errors import DeadlineExceeded, MalformedMessage, Unavailable, WireError
from tandem.runtime.wire import (
    Envelope,
    Kind,
    WireCodec,
    WireLimits,
    now_epoch_ms,
    recv_frames,
    send_frames,
)

log = logging.getLogger(__name__)


class CloudClient:
    """Requests to one worker endpoint. Safe to call from many threads.

    When a request finds no connection and none comes up before its deadline, the link is
    taken as down for ``down_backoff_s``: requests in that window that find no connection fail
    at once with :class:`Unavailable` instead of each waiting out its deadline. ZeroMQ keeps
    reconnecting meanwhile, and a request that finds the connection back goes through.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        limits: WireLimits | None = None,
        context: zmq.Context | None = None,
        down_backoff_s: float = 1.0,
    ) -> None:
        self.endpoint = endpoint
        self.down_backoff_s = down_backoff_s
        self._down_until = 0.0  # monotonic time until which the link is taken as down
        self.codec = WireCodec(limits)
        self._ctx = context or zmq.Context.instance()
        self._local = threading.local()
        self._sockets: list[zmq.Socket] = []
        self._lock = threading.Lock()
        self._closed = False

    def _socket(self) -> zmq.Socket:
        sock = getattr(self._local, "sock", None)
        if sock is None or sock.closed:
            with self._lock:
                if self._closed:
                    raise Unavailable("client is closed")
                sock = self._ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing toward a peer that is not there
                sock.setsockopt(zmq.MAXMSGSIZE, self.codec.limits.max_message_bytes)
                sock.connect(self.endpoint)
                self._sockets.append(sock)
            self._local.sock = sock
        return sock

    def request(self, env: Envelope, timeout_s: float) -> Envelope:
        """Send ``env`` and wait up to ``timeout_s`` for its reply.

        Raises :class:`Unavailable` (no connection), :class:`DeadlineExceeded` (no reply in
        time), a :class:`WireError` (unreadable reply) or whatever error the worker answered.
        """
        sock = self._socket()
        deadline = time.monotonic() + timeout_s
        frames = self.codec.encode(env)
        # With IMMEDIATE set there is no queue toward an absent peer: wait for a connection
        # (a fresh socket may still be connecting) at most until the deadline.
        if not cast(int, sock.getsockopt(_EVENTS)) & _POLLOUT:
            if time.monotonic() < self._down_until:
                raise Unavailable(f"no connection to {self.endpoint} (link down)")
            if not sock.poll(_ms_left(deadline), zmq.POLLOUT):
                self._down_until = time.monotonic() + self.down_backoff_s
                raise Unavailable(f"no connection to {self.endpoint}")
        send_frames(sock, frames)
        while True:
            left = _ms_left(deadline)
            if left <= 0 or not zmq.zmq_poll([(sock, _POLLIN)], left):
                raise DeadlineExceeded(
                    f"no reply from {self.endpoint} within {timeout_s * 1e3:.1f} ms"
                )
            try:
                reply = self.codec.decode(recv_frames(sock, n_copied=1))
            except WireError as e:
                if e.request_id == env.id:
                    raise
                log.warning("dropped an unreadable reply from %s: %s", self.endpoint, e)
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
    ) -> dict[str, Any]:
        """Run ``model`` on the worker; returns the reply payload (``outputs``, ``version``…)."""
        env = Envelope(
            kind=Kind.INFER,
            task=task,
            tags=tags,
            deadline_ms=now_epoch_ms() + max(1, int(timeout_s * 1000)),
            payload={"model": model, "inputs": inputs},
        )
        payload = self.request(env, timeout_s).payload
        if not isinstance(payload, dict) or not isinstance(payload.get("outputs"), np.ndarray):
            raise MalformedMessage("infer reply has no outputs array")
        return payload

    def health(self, timeout_s: float = 2.0) -> dict[str, Any]:
        return self.request(Envelope(kind=Kind.HEALTH), timeout_s).payload

    def echo(self, payload: Any, timeout_s: float = 2.0) -> Any:
        return self.request(Envelope(kind=Kind.ECHO, payload=payload), timeout_s).payload

    def close(self) -> None:
        """Close every thread's socket. Call when no request is in flight."""
        with self._lock:
            self._closed = True
            for s in self._sockets:
                s.close(linger=0)
            self._sockets.clear()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# plain ints: pyzmq's flag enums cost more than the calls they are passed to
_EVENTS, _POLLIN, _POLLOUT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT)


def _ms_left(deadline: float) -> int:
    return max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
