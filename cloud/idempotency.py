"""Request ids as idempotency keys: the replies a worker sent recently, so that a retry of the
same id (a client failing over, a reconnect) is answered from memory instead of running again.
Each entry keeps the request it answered: a "retry" that asks for something else under a known
id is not answered from here (the worker refuses it), so an id alone never fetches a reply.

Bounded three ways: entries, bytes and age. Oldest entries go first (insertion order is age
order because every entry lives the same ``ttl_s``).

A retry of a request that is still queued is not in this cache: it joins the queued request
(:class:`~tandem.cloud.requests.WorkerRequests`), which then answers every route it came on, at
most :data:`MAX_JOINED_ROUTES` of them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from tandem.runtime.wire import Envelope, frames_nbytes

# Routes a queued request is answered on: the one it came on and retries of its id that joined
# it (a client failing over or reconnecting). A retry past them is refused at once, so resending
# an id while it waits cannot grow the worker: this bounds each queued request's route list.
MAX_JOINED_ROUTES = 16


class ReplyCache:
    """request id → (the encoded reply frames, the request), for ``ttl_s`` seconds."""

    def __init__(self, max_entries: int, max_bytes: int, ttl_s: float) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._entries: OrderedDict[bytes, tuple[float, int, list[Any], Envelope]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, request_id: bytes, now: float) -> tuple[list[Any], Envelope] | None:
        """The reply frames and the request they answered, or None."""
        hit = self._entries.get(request_id)
        if hit is None or hit[0] <= now:
            return None
        return hit[2], hit[3]

    def put(self, request: Envelope, frames: list[Any], now: float) -> None:
        request_id = request.id
        size = frames_nbytes(frames) + frames_nbytes(request.body)
        if self.max_entries == 0 or size > self.max_bytes:
            return
        old = self._entries.pop(request_id, None)
        if old is not None:
            self.nbytes -= old[1]
        self._entries[request_id] = (now + self.ttl_s, size, frames, request)
        self.nbytes += size
        self.expire(now)

    def expire(self, now: float) -> None:
        """Drop expired entries and the oldest ones over the bounds."""
        e = self._entries
        while e:
            expires, size, _, _ = next(iter(e.values()))
            if expires > now and len(e) <= self.max_entries and self.nbytes <= self.max_bytes:
                break
            e.popitem(last=False)
            self.nbytes -= size
