"""The relay of :mod:`tandem.bench.netem`: its event loop (:class:`Relay`), in this process;
:func:`tandem.bench.netem.start_relay` runs one in a child process.

Clients connect to the relay's ``listen`` endpoint instead of the worker's. The relay is a
ROUTER there and, for each client identity it sees, a DEALER connected to ``target``: the
worker sees one peer per client socket, routes its replies to it, and the relay hands them
back to that client. Messages are forwarded whole (every frame of a multipart message) and
untouched: nothing is decoded, so the relay works for any Tandem message kind (``infer``,
``generate`` streams, ``cancel``) and for bare ZeroMQ peers alike. When each message is
delivered is the link model's (:class:`~tandem.bench.link.LinkSchedule`).

**Outages** (``outages=[(t_start_s, t_end_s), ...]``, seconds after the relay bound its
socket, and the ``offline`` profile, which is one outage forever) model a dead link: a message
is lost when the link is down as it reaches the relay or when it would be delivered (it was on
the wire when the link died). Nothing is queued for later. ZMTP heartbeats are hop by hop, so
the client's heartbeats are still answered by the relay during an outage: the client sees
its requests time out (:class:`~tandem.runtime.errors.DeadlineExceeded`), not its connection
drop (no failover by heartbeat, no ``Unavailable``).

**Bounds.** Each direction's queue holds at most ``max_queue_messages`` messages and
``max_queue_bytes`` bytes; when one is full the relay stops reading that side, so the senders
meet ZeroMQ's high-water marks and TCP's window (backpressure, never unbounded memory).
Edge → cloud, a worker connection that cannot take a message holds its direction's queue
until it can (head of line, as on a TCP link). Cloud → edge, a reply to a client that left or
does not read is dropped and counted, which is what the worker itself does to such a client.
The table of client DEALERs is bounded (``max_clients``, least recently used closed first)
and a client silent both ways for ``idle_s`` has its DEALER closed.

**Plain text only.** The relay holds no keys, so it forwards plain-text ZMTP: a worker with
CurveZMQ on cannot be reached through it (a Curve client fails its handshake with the relay
and sees :class:`~tandem.runtime.errors.Unavailable`). Use it on loopback with curve off.

**Overhead.** The relay runs in its own process (:func:`~tandem.bench.netem.start_relay`),
so it shares no GIL with the process measured. It adds two ZeroMQ hops: on a 2-core AMD EPYC VM shared with other
work, the median echo round trip of a bare DEALER was 59 µs direct, 123 µs through a C
``zmq.proxy`` and 167 µs through this relay at 0 ms; ``CloudClient.echo`` to a worker,
~200 µs direct and +165 to +300 µs through the relay (load average 4). Benchmarks should
report the relay at 0 ms as their baseline (``test_zero_delay_overhead_is_small`` measures it).
Waits under a millisecond are slept with ``select`` (µs resolution; ``zmq_poll`` counts whole
ms) and the last 100 µs spun.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import select
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from tandem.bench.link import LinkProfile, LinkSchedule

log = logging.getLogger(__name__)

_POLLIN, _DONTWAIT, _EVENTS = int(zmq.POLLIN), int(zmq.DONTWAIT), int(zmq.EVENTS)
_MAX_WAIT_MS = 50  # longest poll: how soon stop() and housekeeping are noticed
_RETRY_S = 0.001  # a worker connection that could not take a message is tried again this soon
_READS_PER_TURN = 64  # messages read from one socket before the clock is looked at again
_HOUSEKEEPING_S = 1.0  # idle clients are looked for this often (or twice per idle_s)
# The last 100 µs before a release are spun: a sleep overshoots by the timer slack (50 µs).
_SPIN_S = 100e-6


def _wait_fds(items: list[tuple[zmq.Socket, int]], seconds: float) -> None:
    """Wait up to ``seconds`` (µs resolution, unlike zmq_poll's ms) or until one of the sockets
    may have news (their ZMQ_FDs signal; the caller's next zmq_poll says which)."""
    with contextlib.suppress(ValueError):  # a descriptor over FD_SETSIZE: spin instead
        select.select([s.getsockopt(zmq.FD) for s, _ in items], [], [], seconds)


class _Lane:
    """One direction: its schedule, its queue of ``(release, identity, frames, nbytes)`` in
    release order, and its counters."""

    __slots__ = ("bytes", "link", "messages", "queue", "queued_bytes", "retry_at")

    def __init__(self, link: LinkSchedule) -> None:
        self.link = link
        self.queue: deque[tuple[float, bytes, list[bytes], int]] = deque()
        self.queued_bytes = 0
        self.messages = 0
        self.bytes = 0
        self.retry_at = 0.0  # up only: a worker connection was full; not before this


class _Peer:
    __slots__ = ("ident", "last_seen", "sock")

    def __init__(self, ident: bytes, sock: zmq.Socket, now: float) -> None:
        self.ident = ident
        self.sock = sock
        self.last_seen = now


class Relay:
    """The relay's event loop, in this process: :meth:`serve` binds, calls ``ready(endpoint)``
    and forwards until :meth:`stop` (safe from any thread or a signal handler). Benchmarks want
    it in a process of its own: :func:`start_relay`.

    ``outages``: ``(t_start_s, t_end_s)`` windows, seconds after the bind, when the link is down.
    ``seed`` makes the jitter draws repeatable.
    """

    def __init__(
        self,
        target: str,
        link: LinkProfile,
        *,
        listen: str = "tcp://127.0.0.1:*",
        outages: Sequence[tuple[float, float]] = (),
        seed: int | None = None,
        max_clients: int = 256,
        idle_s: float = 120.0,
        max_queue_messages: int = 1024,
        max_queue_bytes: int = 64 * 1024 * 1024,
        stats_every_s: float = 0.0,
        context: zmq.Context | None = None,
    ) -> None:
        for a, b in outages:
            if not (0 <= a < b):
                raise ValueError(f"an outage is (t_start_s, t_end_s) with 0 <= start < end: {a, b}")
        if min(max_clients, max_queue_messages, max_queue_bytes) < 1 or not idle_s > 0:
            raise ValueError(
                "max_clients, max_queue_messages and max_queue_bytes must be >= 1, idle_s > 0"
            )
        self.target = target
        self.link = link
        self.listen = listen
        self.outages = sorted((float(a), float(b)) for a, b in outages)
        self.max_clients = max_clients
        self.idle_s = idle_s
        self.max_queue_messages = max_queue_messages
        self.max_queue_bytes = max_queue_bytes
        self.stats_every_s = stats_every_s
        self.endpoint = ""
        self._ctx = context or zmq.Context.instance()
        rng = random.Random(seed)
        self.up = _Lane(LinkSchedule(link, random.Random(rng.random())))  # edge -> cloud
        self.down = _Lane(LinkSchedule(link, random.Random(rng.random())))  # cloud -> edge
        self.dropped = {"outage": 0, "unroutable": 0}
        self.clients_opened = 0
        self.clients_closed = 0
        self._peers: OrderedDict[bytes, _Peer] = OrderedDict()  # least recently used first
        self._by_sock: dict[zmq.Socket, _Peer] = {}
        self._back_items: list[tuple[zmq.Socket, int]] = []
        self._front: zmq.Socket | None = None
        self._t0 = 0.0
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True

    def stats(self) -> dict[str, Any]:
        """Counters since the start: messages and bytes forwarded each way, drops, queue
        depths (messages, bytes) and client DEALERs."""
        return {
            "up_messages": self.up.messages,
            "up_bytes": self.up.bytes,
            "down_messages": self.down.messages,
            "down_bytes": self.down.bytes,
            "dropped_outage": self.dropped["outage"],
            "dropped_unroutable": self.dropped["unroutable"],
            "up_queue": len(self.up.queue),
            "up_queue_bytes": self.up.queued_bytes,
            "down_queue": len(self.down.queue),
            "down_queue_bytes": self.down.queued_bytes,
            "clients": len(self._peers),
            "clients_opened": self.clients_opened,
            "clients_closed": self.clients_closed,
        }

    # ------------------------------------------------------------------ the loop
    def serve(self, ready: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Bind, call ``ready(endpoint)``, forward until :meth:`stop`; returns :meth:`stats`.
        Messages still queued at the stop are dropped (the sockets close with linger 0)."""
        front = self._ctx.socket(zmq.ROUTER)
        front.setsockopt(zmq.LINGER, 0)
        front.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a client that left raises
        front.setsockopt(zmq.MAXMSGSIZE, self.max_queue_bytes)
        try:
            front.bind(self.listen)
        except BaseException:
            front.close()
            raise
        self._front = front
        self.endpoint = front.getsockopt_string(zmq.LAST_ENDPOINT)
        self._t0 = time.monotonic()
        log.info(
            "relay %s -> %s, %s, %d outages (plain-text ZMTP)",
            self.endpoint,
            self.target,
            self.link.describe(),
            len(self.outages),
        )
        if ready:
            ready(self.endpoint)
        try:
            self._loop(front)
        finally:
            for peer in list(self._peers.values()):
                self._close_peer(peer)
            front.close()
            self._front = None
        stats = self.stats()
        log.info("relay stopped: %s", stats)
        return stats

    def _loop(self, front: zmq.Socket) -> None:
        up, down = self.up, self.down
        front_items = [(front, _POLLIN)]
        every = min(_HOUSEKEEPING_S, self.idle_s / 2)
        housekeeping_at = self._t0 + every
        stats_at = self._t0 + self.stats_every_s if self.stats_every_s > 0 else math.inf
        last = self.stats()
        while not self._stopping:
            now = time.monotonic()
            if up.queue and up.queue[0][0] <= now and up.retry_at <= now:
                self._flush_up(now)
            if down.queue and down.queue[0][0] <= now:
                self._flush_down(now)
            if now >= housekeeping_at:
                self._close_idle(now)
                housekeeping_at = now + every
            if now >= stats_at:
                last = self._log_stats(last)
                stats_at = now + self.stats_every_s
            due = math.inf
            if up.queue:
                due = max(up.queue[0][0], up.retry_at)
            if down.queue:
                due = min(due, down.queue[0][0])
            wait = due - now
            items = front_items if self._has_room(up) else []
            if self._has_room(down) and self._back_items:
                items = items + self._back_items
            if not items:  # both sides full: nothing to read until a release
                time.sleep(max(0.0, min(wait, _MAX_WAIT_MS / 1e3)))
                continue
            if wait >= 1e-3:  # zmq_poll counts whole ms: the rest is waited below
                ready = zmq.zmq_poll(items, int(min(wait * 1e3, _MAX_WAIT_MS)))
            else:
                ready = zmq.zmq_poll(items, 0)
                if not ready and wait > _SPIN_S:
                    _wait_fds(items, wait - _SPIN_S)
                    continue
            for sock, _ in ready:
                if sock is front:
                    self._read_front(front)
                else:
                    self._read_back(sock)

    def _has_room(self, lane: _Lane) -> bool:
        return (
            len(lane.queue) < self.max_queue_messages and lane.queued_bytes < self.max_queue_bytes
        )

    def _link_down(self, t: float) -> bool:
        if self.link.down:
            return True
        rel = t - self._t0
        return any(a <= rel < b for a, b in self.outages)

    def _schedule(
        self, lane: _Lane, ident: bytes, body: list[bytes], nbytes: int, now: float
    ) -> bool:
        """Drop or queue a message that just arrived; True when it is due now with nothing
        queued ahead of it: the caller sends it at once (the zero-delay fast path)."""
        if self.outages or self.link.down:
            if self._link_down(now):
                self.dropped["outage"] += 1
                return False
            release = lane.link.release(now, nbytes)
            if self._link_down(release):  # on the wire when the link died
                self.dropped["outage"] += 1
                return False
        else:
            release = lane.link.release(now, nbytes)
        if release <= now and not lane.queue:
            return True
        self._enqueue(lane, release, ident, body, nbytes)
        return False

    @staticmethod
    def _enqueue(lane: _Lane, release: float, ident: bytes, body: list[bytes], n: int) -> None:
        lane.queue.append((release, ident, body, n))
        lane.queued_bytes += n

    def _read_front(self, front: zmq.Socket) -> None:
        up = self.up
        for _ in range(_READS_PER_TURN):
            if not self._has_room(up):
                return
            try:
                frames = front.recv_multipart(_DONTWAIT)
            except zmq.Again:
                return
            now = time.monotonic()
            ident, body = frames[0], frames[1:]
            nbytes = sum(map(len, body))
            if self._schedule(up, ident, body, nbytes, now) and not (
                up.retry_at <= now and self._send_up(ident, body, nbytes, now)
            ):
                up.retry_at = max(up.retry_at, now + _RETRY_S)
                self._enqueue(up, now, ident, body, nbytes)
            if not front.getsockopt(_EVENTS) & _POLLIN:  # cheaper than a recv raising Again
                return

    def _read_back(self, sock: zmq.Socket) -> None:
        peer = self._by_sock.get(sock)
        if peer is None:  # closed since the poll
            return
        down = self.down
        for _ in range(_READS_PER_TURN):
            if not self._has_room(down):
                return
            try:
                body = sock.recv_multipart(_DONTWAIT)
            except zmq.Again:
                return
            now = time.monotonic()
            peer.last_seen = now
            self._peers.move_to_end(peer.ident)
            nbytes = sum(map(len, body))
            if self._schedule(down, peer.ident, body, nbytes, now):
                self._send_down(peer.ident, body, nbytes)
            if not sock.getsockopt(_EVENTS) & _POLLIN:
                return

    def _flush_up(self, now: float) -> None:
        up = self.up
        q = up.queue
        while q and q[0][0] <= now:
            _, ident, body, nbytes = q[0]
            if not self._send_up(ident, body, nbytes, now):
                up.retry_at = now + _RETRY_S
                return
            q.popleft()
            up.queued_bytes -= nbytes

    def _flush_down(self, now: float) -> None:
        down = self.down
        q = down.queue
        while q and q[0][0] <= now:
            _, ident, body, nbytes = q.popleft()
            down.queued_bytes -= nbytes
            self._send_down(ident, body, nbytes)

    def _send_up(self, ident: bytes, body: list[bytes], nbytes: int, now: float) -> bool:
        """Forward to the worker on this client's DEALER; False when its pipe is full."""
        peer = self._peer(ident, now)
        try:
            peer.sock.send_multipart(body, _DONTWAIT)
        except zmq.Again:
            return False
        self.up.messages += 1
        self.up.bytes += nbytes
        return True

    def _send_down(self, ident: bytes, body: list[bytes], nbytes: int) -> None:
        """Forward to the client; a client that left or does not read loses the message."""
        assert self._front is not None
        try:
            self._front.send_multipart([ident, *body], _DONTWAIT)
        except zmq.ZMQError as e:  # EHOSTUNREACH (gone) or EAGAIN (its pipe is full)
            self.dropped["unroutable"] += 1
            log.debug("reply to client %s dropped: %s", ident.hex(), e)
            return
        self.down.messages += 1
        self.down.bytes += nbytes

    # ------------------------------------------------------------------ client DEALERs
    def _peer(self, ident: bytes, now: float) -> _Peer:
        peer = self._peers.get(ident)
        if peer is not None:
            peer.last_seen = now
            self._peers.move_to_end(ident)
            return peer
        while len(self._peers) >= self.max_clients:
            self._close_peer(next(iter(self._peers.values())))
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_queue_bytes)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.connect(self.target)  # not IMMEDIATE: the first message waits for the connection
        peer = self._peers[ident] = _Peer(ident, sock, now)
        self._by_sock[sock] = peer
        self._back_items.append((sock, _POLLIN))
        self.clients_opened += 1
        return peer

    def _close_peer(self, peer: _Peer) -> None:
        del self._peers[peer.ident]
        del self._by_sock[peer.sock]
        self._back_items = [it for it in self._back_items if it[0] is not peer.sock]
        peer.sock.close(linger=0)
        self.clients_closed += 1

    def _close_idle(self, now: float) -> None:
        limit = now - self.idle_s
        while self._peers:
            oldest = next(iter(self._peers.values()))
            if oldest.last_seen >= limit:
                return
            log.debug("closing idle client %s", oldest.ident.hex())
            self._close_peer(oldest)

    def _log_stats(self, last: dict[str, Any]) -> dict[str, Any]:
        s = self.stats()
        d = {k: s[k] - last[k] for k in ("up_messages", "up_bytes", "down_messages", "down_bytes")}
        log.info(
            "up %d msg %d B, down %d msg %d B; dropped %d outage %d unroutable; "
            "queues up %d (%d B) down %d (%d B); clients %d",
            d["up_messages"],
            d["up_bytes"],
            d["down_messages"],
            d["down_bytes"],
            s["dropped_outage"],
            s["dropped_unroutable"],
            s["up_queue"],
            s["up_queue_bytes"],
            s["down_queue"],
            s["down_queue_bytes"],
            s["clients"],
            extra={"relay": s},
        )
        return s
