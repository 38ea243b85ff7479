from __future__ import annotations

import numpy as np
import pytest

from tandem.cloud.batching import MicroBatcher, Pending
from tandem.cloud.config import QueueSpec
from tandem.cloud.idempotency import ReplyCache
from tandem.runtime.errors import OverloadedError
from tandem.runtime.wire import Envelope, Kind


def item(rows: int, t: float, nbytes: int = 100) -> Pending:
    return Pending(routes=[], env=None, inputs=np.zeros((rows, 2)), nbytes=nbytes, arrived=t)


def test_idle_model_runs_at_once_by_default() -> None:
    b = MicroBatcher(max_batch=64)
    b.admit("m", item(1, 5.0))
    assert b.next_due(now=5.0) == 5.0  # no queue delay
    [(_, batch)] = b.take_ready(now=5.0)
    assert len(batch) == 1 and b.depth == 0 and b.next_due(now=5.0) is None


def test_requests_that_arrive_while_busy_form_the_next_batch() -> None:
    b = MicroBatcher(max_batch=64)
    for _ in range(5):  # queued while the model was running
        b.admit("m", item(2, 0.0))
    [(_, batch)] = b.take_ready(now=0.0)
    assert len(batch) == 5


def test_opt_in_wait_releases_when_full_or_oldest_waited() -> None:
    b = MicroBatcher(max_batch=4, max_wait_s=0.5)
    b.admit("m", item(2, 10.0))
    b.admit("m", item(1, 10.3))
    assert b.next_due(now=10.3) == 10.5
    assert b.take_ready(now=10.49) == []
    [(_, batch)] = b.take_ready(now=10.5)
    assert len(batch) == 2
    b.admit("m", item(4, 11.0))  # full: runs without waiting
    assert len(b.take_ready(now=11.0)) == 1


def test_one_batch_per_model_per_turn_never_over_max_rows_big_requests_alone() -> None:
    b = MicroBatcher(max_batch=4)
    for rows in (3, 2, 9, 1):
        b.admit("m", item(rows, 0.0))
    turns = []
    while b.depth:
        turns.append([[len(p.inputs) for p in batch] for _, batch in b.take_ready(now=0.0)])
    assert turns == [[[3]], [[2]], [[9]], [[1]]]  # FIFO; 3+2 and 9+1 would exceed 4 rows
    for rows in (1, 2, 1):
        b.admit("m", item(rows, 0.0))
    assert [[len(p.inputs) for p in batch] for _, batch in b.take_ready(now=0.0)] == [[1, 2, 1]]


def test_models_are_batched_separately_and_flush_drains_each() -> None:
    b = MicroBatcher(max_batch=8, max_wait_s=10.0)
    b.admit("a", item(1, 0.0))
    b.admit("b", item(1, 0.0))
    b.admit("a", item(1, 0.0))
    assert b.depth == 3 and b.take_ready(now=0.0) == []
    out = dict(b.take_ready(now=0.0, flush=True))
    assert len(out["a"]) == 2 and len(out["b"]) == 1
    assert b.depth == 0 and b.nbytes == 0


@pytest.mark.parametrize(
    ("bounds", "admitted"),
    [
        (QueueSpec(max_requests_per_model=3), 3),
        (QueueSpec(max_bytes_per_model=2500), 2),
        (QueueSpec(max_requests=4), 4),
        (QueueSpec(max_bytes=3500), 3),
    ],
)
def test_admission_is_bounded_and_overload_carries_a_retry_hint(bounds, admitted) -> None:
    b = MicroBatcher(max_batch=64, bounds=bounds)
    b.record_run("a", rows=10, seconds=0.01)  # 1 ms per row measured
    got = 0
    with pytest.raises(OverloadedError) as e:
        for _ in range(10):
            b.admit("a", item(1, 0.0, nbytes=1000))
            got += 1
    assert got == admitted and b.depth == admitted and b.nbytes == 1000 * admitted
    assert e.value.retry_after_ms >= 1.0
    b.take_ready(now=0.0)
    assert b.depth == 0 and b.nbytes == 0
    b.admit("a", item(1, 0.0))  # room again


def _req(i: bytes) -> Envelope:
    return Envelope(kind=Kind.INFER, id=i * 16)


def test_reply_cache_bounds_entries_bytes_and_age() -> None:
    c = ReplyCache(max_entries=3, max_bytes=1000, ttl_s=10.0)
    for i in range(5):
        c.put(_req(bytes([i])), [b"x" * 100], now=float(i))
    assert len(c) == 3 and c.get(bytes([0]) * 16, now=5.0) is None
    frames, request = c.get(bytes([4]) * 16, now=5.0)
    assert frames == [b"x" * 100] and request.id == bytes([4]) * 16
    assert c.get(bytes([4]) * 16, now=14.0) is None  # expired
    c.put(_req(b"b"), [b"y" * 2000], now=5.0)  # bigger than the whole cache: not kept
    assert c.get(b"b" * 16, now=5.0) is None
    c.put(_req(b"c"), [b"z" * 900], now=6.0)  # evicts the oldest to fit in bytes
    assert c.nbytes <= 1000 and c.get(b"c" * 16, now=6.0) is not None
    c.expire(now=100.0)
    assert len(c) == 0 and c.nbytes == 0
