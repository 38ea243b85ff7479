"""Request ids as idempotency keys: the replies a worker sent recently, so that a retry of the
same id (a client failing over, a reconnect) is answered from memory instead of running again.

Bounded three ways: entries, bytes and age. Oldest entries go first (insertion order is age
order because every entry lives the same ``ttl_s``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


def frames_nbytes(frames: list[Any]) -> int:
    return sum(f.nbytes if hasattr(f, "nbytes") else len(f) for f in frames)


class ReplyCache:
    """request id → the encoded reply frames, for ``ttl_s`` seconds."""

    def __init__(self, max_entries: int, max_bytes: int, ttl_s: float) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._entries: OrderedDict[bytes, tuple[float, int, list[Any]]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, request_id: bytes, now: float) -> list[Any] | None:
        hit = self._entries.get(request_id)
        if hit is None or hit[0] <= now:
            return None
        return hit[2]

    def put(self, request_id: bytes, frames: list[Any], now: float) -> None:
        size = frames_nbytes(frames)
        if self.max_entries == 0 or size > self.max_bytes:
            return
        old = self._entries.pop(request_id, None)
        if old is not None:
            self.nbytes -= old[1]
        self._entries[request_id] = (now + self.ttl_s, size, frames)
        self.nbytes += size
        self.expire(now)

    def expire(self, now: float) -> None:
        """Drop expired entries and the oldest ones over the bounds."""
        e = self._entries
        while e:
            expires, size, _ = next(iter(e.values()))
            if expires > now and len(e) <= self.max_entries and self.nbytes <= self.max_bytes:
                break
            e.popitem(last=False)
            self.nbytes -= size
