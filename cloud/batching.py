"""Dynamic batching with bounded queues. Pure bookkeeping (no sockets, no clock of its own), so
the worker's event loop stays the only owner of time and I/O.

Per model, a FIFO of admitted requests. A queue is *ready* when its model may run now:

* ``max_wait_s == 0`` (the default): as soon as it holds anything. An idle model therefore
  runs a request the moment it arrives, and requests that arrive while the model is busy wait
  in the queue and run together as the next batch (Triton's dynamic batcher with a queue delay
  of 0).
* ``max_wait_s > 0``: when ``max_batch`` rows are waiting or the oldest has waited that long.

Admission is bounded in requests and bytes, per model and in total; a request that would cross
a bound raises :class:`OverloadedError` with a retry-after estimate from the model's measured
cost per row, and is not queued.

A batch is whole requests in arrival order, whatever their row shapes: a model with a dynamic
axis (a sequence length) gets requests of several shapes in one batch, and the worker runs
each shape as its own backend call (``WorkerRequests.run_batch``; the groups run in the order of
their first request), so the bounds above hold for the batch as a whole.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tandem.cloud.config import QueueSpec
from tandem.runtime.errors import OverloadedError

_DEFAULT_S_PER_ROW = 1e-4  # the retry-after estimate before a model has run once
_EWMA = 0.2  # weight of the newest batch in the cost-per-row estimate


@dataclass(slots=True)
class Pending:
    """One admitted infer request."""

    routes: list[list[Any]]  # ZeroMQ routing frames to answer on (more: retries of the same id)
    env: Any  # the request Envelope
    inputs: Any  # (rows, ...) array; None for a request that runs off the loop (verify, experts)
    nbytes: int  # bytes held while queued (the message's frames)
    arrived: float  # time.monotonic() at arrival


@dataclass(slots=True)
class _Queue:
    items: deque[Pending] = field(default_factory=deque)
    rows: int = 0
    nbytes: int = 0
    s_per_row: float = _DEFAULT_S_PER_ROW


class MicroBatcher:
    """Per-model FIFO queues with a row budget per batch and bounded admission."""

    def __init__(
        self, max_batch: int, max_wait_s: float = 0.0, bounds: QueueSpec | None = None
    ) -> None:
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.bounds = bounds or QueueSpec()
        self._queues: dict[str, _Queue] = {}
        self.depth = 0  # requests queued, all models together
        self.nbytes = 0  # bytes queued, all models together

    def admit(self, model: str, item: Pending) -> None:
        """Queue ``item``, or raise :class:`OverloadedError` if a bound would be crossed."""
        q = self._queues.get(model)
        if q is None:
            q = self._queues[model] = _Queue()
        b = self.bounds
        if (
            len(q.items) >= b.max_requests_per_model
            or q.nbytes + item.nbytes > b.max_bytes_per_model
            or self.depth >= b.max_requests
            or self.nbytes + item.nbytes > b.max_bytes
        ):
            wait_ms = max(1.0, q.rows * q.s_per_row * 1e3)
            raise OverloadedError(
                f"worker queue full ({self.depth} requests, {self.nbytes} bytes queued; "
                f"{len(q.items)} for {model!r}); retry in {wait_ms:.0f} ms or elsewhere",
                retry_after_ms=round(wait_ms, 1),
            )
        q.items.append(item)
        q.rows += len(item.inputs)
        q.nbytes += item.nbytes
        self.depth += 1
        self.nbytes += item.nbytes

    def record_run(self, model: str, rows: int, seconds: float) -> None:
        """Feed a batch's measured run time into the model's cost-per-row estimate."""
        q = self._queues.get(model)
        if q is not None and rows > 0:
            q.s_per_row += _EWMA * (seconds / rows - q.s_per_row)

    def queues(self) -> dict[str, tuple[int, int]]:
        """Per model: requests and bytes queued (for metrics; safe from another thread)."""
        return {model: (len(q.items), q.nbytes) for model, q in list(self._queues.items())}

    def _ready(self, q: _Queue, now: float) -> bool:
        return bool(q.items) and (
            self.max_wait_s <= 0
            or q.rows >= self.max_batch
            or now >= q.items[0].arrived + self.max_wait_s
        )

    def next_due(self, now: float) -> float | None:
        """When a queue next becomes ready (``now`` if one is ready), or None when all are
        empty."""
        due = None
        for q in self._queues.values():
            if q.items:
                t = now if self._ready(q, now) else q.items[0].arrived + self.max_wait_s
                due = t if due is None else min(due, t)
        return due

    def take_ready(self, now: float, flush: bool = False) -> list[tuple[str, list[Pending]]]:
        """At most one batch per model whose queue is ready (every non-empty queue if
        ``flush``). A batch holds whole requests, at most ``max_batch`` rows unless its first
        request alone is bigger (it then runs alone: never more rows than it brought)."""
        out = []
        for model, q in self._queues.items():
            if q.items and (flush or self._ready(q, now)):
                out.append((model, self._take(q)))
        return out

    def take_all(self, model: str) -> list[list[Pending]]:
        """Every request queued for ``model``, as batches (each as :meth:`take_ready` makes
        them), and its queue forgotten: the worker runs them on the version they were admitted
        for before it replaces or unloads the model."""
        q = self._queues.pop(model, None)
        batches = []
        while q is not None and q.items:
            batches.append(self._take(q))
        return batches

    def _take(self, q: _Queue) -> list[Pending]:
        first = q.items.popleft()
        batch, rows, nbytes = [first], len(first.inputs), first.nbytes
        while q.items and rows + len(q.items[0].inputs) <= self.max_batch:
            item = q.items.popleft()
            batch.append(item)
            rows += len(item.inputs)
            nbytes += item.nbytes
        q.rows -= rows
        q.nbytes -= nbytes
        self.depth -= len(batch)
        self.nbytes -= nbytes
        return batch
