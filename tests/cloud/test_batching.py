from __future__ import annotations

import numpy as np

from tandem.cloud.batching import MicroBatcher, Pending


def item(rows: int, t: float) -> Pending:
    return Pending(route=[], env=None, inputs=np.zeros((rows, 2)), arrived=t)


def test_batch_released_when_full() -> None:
    b = MicroBatcher(max_batch=4, max_wait_s=1.0)
    for _ in range(3):
        b.add("m", item(1, 0.0))
    assert b.take_ready(now=0.1) == []
    b.add("m", item(1, 0.0))
    [(model, batch)] = b.take_ready(now=0.1)
    assert model == "m" and len(batch) == 4 and b.depth == 0


def test_batch_released_when_oldest_waited_long_enough() -> None:
    b = MicroBatcher(max_batch=64, max_wait_s=0.5)
    b.add("m", item(2, 10.0))
    b.add("m", item(2, 10.3))
    assert b.next_due() == 10.5
    assert b.take_ready(now=10.49) == []
    [(_, batch)] = b.take_ready(now=10.5)
    assert len(batch) == 2
    assert b.next_due() is None


def test_batches_never_exceed_max_rows_but_big_requests_run_alone() -> None:
    b = MicroBatcher(max_batch=4, max_wait_s=0.0)
    for rows in (3, 2, 9, 1):
        b.add("m", item(rows, 0.0))
    batches = [[len(p.inputs) for p in batch] for _, batch in b.take_ready(now=0.0)]
    assert batches == [[3], [2], [9], [1]]  # FIFO; 3+2 and 9+1 would exceed 4 rows
    b.add("m", item(1, 0.0))
    b.add("m", item(2, 0.0))
    b.add("m", item(1, 0.0))
    assert [[len(p.inputs) for p in batch] for _, batch in b.take_ready(now=0.0)] == [[1, 2, 1]]


def test_models_are_batched_separately_and_flush_drains_all() -> None:
    b = MicroBatcher(max_batch=8, max_wait_s=10.0)
    b.add("a", item(1, 0.0))
    b.add("b", item(1, 0.0))
    b.add("a", item(1, 0.0))
    assert b.depth == 3
    out = dict(b.take_ready(now=0.0, flush=True))
    assert len(out["a"]) == 2 and len(out["b"]) == 1
    assert b.depth == 0
