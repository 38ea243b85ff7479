"""The closed loop that ``tandem bench`` and the developer benchmarks share
(:func:`tandem.bench.load.closed_loop`, :func:`~tandem.bench.load.run_closed`), and the free
ports they start servers on."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter

from tandem.bench.load import closed_loop, item_counter, run_closed
from tandem.bench.ports import free_ports
from tandem.bench.stats import Outcome


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(4)
    assert len(set(ports)) == 4
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_run_closed_keeps_each_client_busy_until_the_time_is_up() -> None:
    in_flight, most = [0], [0]
    lock = threading.Lock()

    def call(i: int) -> int:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.005)
        with lock:
            in_flight[0] -= 1
        return i

    entries, wall = run_closed(call, 3, 0.2)
    assert 0.2 <= wall < 2.0
    assert most[0] == 3  # three requests outstanding, never more
    items = [o for _, o, _, _ in entries]
    assert sorted(items) == list(range(len(items)))  # each request number once
    assert all(ms >= 5.0 * 0.9 and queued == 0.0 for _, _, ms, queued in entries)
    assert all(t <= time.perf_counter() for t, _, _, _ in entries)


def test_a_call_that_raises_is_a_failed_outcome_not_a_dead_client() -> None:
    def call(i: int) -> Outcome:
        if i % 2:
            raise TimeoutError(f"request {i} timed out")
        return Outcome(tier="edge")

    entries, _ = run_closed(call, 2, 0.05)
    kinds = Counter(o.tier or o.error for _, o, _, _ in entries)
    assert kinds["edge"] > 1 and kinds["TimeoutError"] > 1
    assert any(o.detail and "timed out" in o.detail for _, o, _, _ in entries)


def test_closed_loop_stops_at_max_requests_and_cycles_items() -> None:
    stop = threading.Event()
    got: list[int] = []
    threads = closed_loop(lambda i: i, 4, item_counter(stop, max_requests=10, n_items=3),
                          lambda e: got.append(e[1]))  # fmt: skip
    for th in threads:
        th.start()
    for th in threads:
        th.join(5)
    assert Counter(got) == Counter([i % 3 for i in range(10)])
