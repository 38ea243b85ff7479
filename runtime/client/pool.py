"""What every call to the workers shares: the socket pool, the choice of worker, and the one
failover loop (:class:`Failover`) that requests and streams both run.

ZeroMQ sockets are not thread-safe, so a call checks out a set of DEALER sockets (one per
endpoint) for its duration and returns it after: no socket is ever used by two threads at
once, none is closed under a call in flight, and the number of sockets follows the number of
concurrent calls, not of threads ever seen (a thread per request would otherwise leak a socket
and a file descriptor per thread).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from typing import cast

import zmq

from tandem.runtime.curve import ClientKeys
from tandem.runtime.errors import OverloadedError, ShuttingDown, TandemError, Unavailable
from tandem.runtime.wire import Envelope, WireCodec

log = logging.getLogger(__name__)

# plain ints: pyzmq's flag enums cost more than the calls they are passed to
EVENTS, POLLIN, POLLOUT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT)
DONTWAIT = int(zmq.DONTWAIT)
# While waiting for a reply, the connection is checked this often (ms): how soon a dead
# worker is noticed once ZeroMQ has dropped its connection.
WATCH_MS = 10
FAILOVER_ERRORS = (OverloadedError, ShuttingDown)
MAX_ROUNDS = 2  # tries per call: at most this many rounds over the endpoints
_MAX_IDLE_SETS = 64  # socket sets kept for reuse; more concurrent calls make (and close) more

Sockets = list[zmq.Socket]


class WorkerPool:
    """The endpoints of one :class:`~tandem.runtime.client.CloudClient`: a pool of socket sets,
    the calls outstanding per endpoint (all threads), and whether the link is taken as down."""

    def __init__(
        self,
        endpoints: Sequence[str],
        codec: WireCodec,
        context: zmq.Context,
        *,
        down_backoff_s: float,
        heartbeat: tuple[int, int],
        curve: ClientKeys | None,
    ) -> None:
        self.endpoints = list(endpoints)
        self.codec = codec
        self.down_backoff_s = down_backoff_s
        self.heartbeat = heartbeat
        self.curve = curve
        self.failovers = 0  # tries sent after a first one, all calls
        # per endpoint: False once a call found it unreachable, True again when one reaches
        # it (plain list stores, atomic: no lock on the path); read by links()
        self.link_up = [True] * len(self.endpoints)
        self._ctx = context
        self._down_until = 0.0  # monotonic time until which the link is taken as down
        self._idle: list[Sockets] = []  # socket sets not in use (LIFO: warm first)
        self._in_use = 0
        self._outstanding = [0] * len(self.endpoints)
        self._rotate = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        # what a garbage-collected stream gave back: it may run inside a call that holds
        # _lock, so it takes no lock (deque appends are atomic); settled at the next checkout
        self._orphans: collections.deque[tuple[Sockets | None, int | None]] = collections.deque()

    # ------------------------------------------------------------------ socket sets
    def checkout(self) -> Sockets:
        """A socket set for one call; :class:`Unavailable` once the pool is closed."""
        self._settle_orphans()
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

    def checkin(self, socks: Sockets) -> None:
        with self._lock:
            self._in_use -= 1
            if not self._closed and len(self._idle) < _MAX_IDLE_SETS:
                self._idle.append(socks)
                return
        for sock in socks:
            sock.close(linger=0)

    def give_back_later(self, socks: Sockets | None, outstanding: int | None) -> None:
        """:meth:`checkin` and :meth:`done` without a lock, for a finaliser (``__del__``),
        which may run inside any call of this thread, that one holding the lock included."""
        self._orphans.append((socks, outstanding))

    def _settle_orphans(self) -> None:
        while True:
            try:
                socks, i = self._orphans.popleft()
            except IndexError:
                return
            if i is not None:
                self.done(i)
            if socks is not None:
                self.checkin(socks)

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
        sock.setsockopt(zmq.RCVTIMEO, WATCH_MS)  # how often a waiting call checks its link
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self.curve is not None:
            self.curve.apply(sock)
        sock.connect(endpoint)
        return sock

    def close(self) -> None:
        """New calls raise :class:`Unavailable`; calls in flight finish on their own sockets,
        which close as they return. Safe from any thread."""
        self._settle_orphans()
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for socks in idle:
            for sock in socks:
                sock.close(linger=0)

    # ------------------------------------------------------------------ load per endpoint
    def started(self, i: int) -> None:
        with self._lock:
            self._outstanding[i] += 1

    def done(self, i: int) -> None:
        with self._lock:
            self._outstanding[i] -= 1

    def pick(
        self, socks: Sockets, tried: set[int], deadline: float, first_try: bool, prefer: int | None
    ) -> int | None:
        """The connected worker not tried yet with the fewest outstanding calls (``prefer``
        first, if it is connected and not tried), waiting for a connection until ``deadline``;
        None when time ran out after an earlier try."""
        if (
            prefer is not None
            and prefer not in tried
            and 0 <= prefer < len(socks)
            and cast(int, socks[prefer].getsockopt(EVENTS)) & POLLOUT
        ):
            self.link_up[prefer] = True
            return prefer
        while True:
            start = next(self._rotate)  # spreads ties
            best, best_load = None, 0
            for k in range(len(socks)):
                i = (start + k) % len(socks)
                if i in tried or not cast(int, socks[i].getsockopt(EVENTS)) & POLLOUT:
                    continue
                if best is None or self._outstanding[i] < best_load:
                    best, best_load = i, self._outstanding[i]
            if best is not None:
                self.link_up[best] = True
                return best
            # With IMMEDIATE set there is no queue toward an absent peer: wait for a
            # connection (a fresh socket may still be connecting) at most until the deadline.
            if first_try and time.monotonic() < self._down_until:
                self._all_down()
                raise Unavailable(f"no connection to {', '.join(self.endpoints)} (link down)")
            left = ms_left(deadline)
            if left <= 0:
                if first_try:
                    self._down_until = time.monotonic() + self.down_backoff_s
                    self._all_down()
                    raise Unavailable(
                        f"no connection to {', '.join(self.endpoints)} (no worker listening, "
                        "or a CurveZMQ handshake refused: check cloud.server_key/client_key "
                        "against the worker's curve settings)"
                    )
                return None
            zmq.zmq_poll([(s, POLLOUT) for i, s in enumerate(socks) if i not in tried], left)

    def _all_down(self) -> None:
        for i in range(len(self.link_up)):
            self.link_up[i] = False

    def links(self) -> dict[str, bool]:
        """Endpoint -> whether it is taken as reachable: False once a call found no
        connection to it (or lost it mid-call), True again when a call finds it connected.
        No call yet: True (nothing says otherwise)."""
        return dict(zip(self.endpoints, self.link_up, strict=True))


class Failover:
    """One call's tries over the endpoints (zguide's "Freelance" pattern, client side) — the
    one failover loop, for requests and streams alike: :meth:`next_endpoint` picks where the
    next try goes, :meth:`failed` decides whether a failed try may go elsewhere.

    A lost worker (:class:`Unavailable`), ``Overloaded`` and ``ShuttingDown`` fail over, each
    endpoint once per round, at most :data:`MAX_ROUNDS` rounds. When every endpoint has
    answered ``Overloaded``/``ShuttingDown`` that answer is raised; when every endpoint was
    lost, whichever connects again before the deadline gets the next try."""

    def __init__(self, pool: WorkerPool, socks: Sockets, name: str, prefer: int | None = None):
        self.pool, self.socks, self.name, self.prefer = pool, socks, name, prefer
        self.tried: set[int] = set()
        self.tries = 0
        self.last = -1  # the endpoint of the latest try
        self.lost: TandemError | None = None

    def next_endpoint(self, deadline: float) -> int:
        """The endpoint for the next try, waiting for a connection until ``deadline``; raises
        :class:`Unavailable` on a first try that finds none, else the last failure once the
        tries or the time are spent."""
        if self.tries >= MAX_ROUNDS * len(self.socks):
            assert self.lost is not None
            raise self.lost
        first = self.tries == 0
        i = self.pool.pick(self.socks, self.tried, deadline, first, self.prefer)
        if i is None:  # only after an earlier try: pick raises on the first
            assert self.lost is not None
            raise self.lost
        if not first:
            self.pool.failovers += 1
        self.tries += 1
        self.tried.add(i)
        self.last = i
        return i

    def failed(self, err: TandemError) -> None:
        """A try failed with ``err``: return if the call may go on elsewhere, raise ``err``
        if not."""
        self.lost = err
        lost = isinstance(err, Unavailable)
        if lost and self.last >= 0:
            self.pool.link_up[self.last] = False
        if len(self.socks) == 1 and not lost:
            raise err
        if len(self.tried) == len(self.socks):
            if not lost:
                raise err  # every worker answered Overloaded/ShuttingDown: say so
            self.tried.clear()  # every worker lost: retry whichever connects again in time
        log.info("%s: %s; failing over", self.name, err.message)


def error_of(env: Envelope) -> TandemError:
    """The error an ``error`` envelope carries."""
    try:
        env.raise_if_error()
    except TandemError as e:
        return e
    raise AssertionError("not an error envelope")


def ms_left(deadline: float) -> int:
    return max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
