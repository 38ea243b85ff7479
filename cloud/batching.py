"""Dynamic micro-batching: queue requests per model, release a batch when it is full or its
oldest request has waited long enough. Pure bookkeeping (no sockets, no clocks of its own), so
the worker's event loop stays the only owner of time and I/O."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class Pending:
    """One queued infer request."""

    route: list[Any]  # ZeroMQ routing frames to answer on
    env: Any  # the request Envelope
    inputs: np.ndarray  # (rows, ...)
    arrived: float  # time.monotonic() at arrival


@dataclass(slots=True)
class _Queue:
    items: deque[Pending] = field(default_factory=deque)
    rows: int = 0


class MicroBatcher:
    """Per-model FIFO queues with a row budget per batch."""

    def __init__(self, max_batch: int, max_wait_s: float) -> None:
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queues: dict[str, _Queue] = {}

    def add(self, model: str, item: Pending) -> None:
        q = self._queues.setdefault(model, _Queue())
        q.items.append(item)
        q.rows += len(item.inputs)

    @property
    def depth(self) -> int:
        """Requests waiting, all models together."""
        return sum(len(q.items) for q in self._queues.values())

    def next_due(self) -> float | None:
        """Monotonic time at which the oldest waiting request must run, or None if idle."""
        times = [q.items[0].arrived + self.max_wait_s for q in self._queues.values() if q.items]
        return min(times) if times else None

    def take_ready(self, now: float, flush: bool = False) -> list[tuple[str, list[Pending]]]:
        """Batches that must run now: full ones, overdue ones, or all of them if ``flush``.
        A batch holds whole requests, at most ``max_batch`` rows unless one request alone is
        bigger (it then runs alone)."""
        out = []
        for model, q in self._queues.items():
            while q.items and (
                flush or q.rows >= self.max_batch or now >= q.items[0].arrived + self.max_wait_s
            ):
                batch = [q.items.popleft()]
                rows = len(batch[0].inputs)
                while q.items and rows + len(q.items[0].inputs) <= self.max_batch:
                    item = q.items.popleft()
                    batch.append(item)
                    rows += len(item.inputs)
                q.rows -= rows
                out.append((model, batch))
        return out
