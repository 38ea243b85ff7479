"""Several workers per task: one is killed with SIGKILL mid-run and the edge fails over inside
each request's deadline. Real worker processes, real sockets, a real kill."""

from __future__ import annotations

import gc
import threading
import time
from collections import Counter

import numpy as np
import pytest

from tandem.cloud.process import WorkerProcess
from tandem.edge import EdgeRuntime, Tier
from tandem.reference.models import CLOUD
from tandem.runtime.client import CloudClient

pytestmark = pytest.mark.integration


def test_kill_9_one_of_two_workers_mid_run_every_request_answered_once(
    make_worker_config, make_policy, digits_x
) -> None:
    n_threads, per_thread, rate = 4, 500, 250.0  # 2,000 requests at 250 req/s: 8 s
    w1 = WorkerProcess(make_worker_config(models=[CLOUD])).start()
    w2 = WorkerProcess(make_worker_config(models=[CLOUD])).start()
    try:
        policy = make_policy(
            None,
            log=False,
            deadline_ms=1000,
            cloud={"endpoints": [w1.endpoint, w2.endpoint], "model": CLOUD},
            rules=[{"tag": "critical", "route": "cloud"}],
        )
        results: list[tuple[float, str, Tier, float]] = []  # (sent at, id, tier, latency ms)
        lock = threading.Lock()
        t_start = time.monotonic()
        killed_at: list[float] = []

        with EdgeRuntime.from_policy(policy) as rt:

            def client(k: int) -> None:
                for j in range(per_thread):
                    due = t_start + (j * n_threads + k) / rate  # paced: 250 req/s in all
                    time.sleep(max(0.0, due - time.monotonic()))
                    t0 = time.monotonic()
                    r = rt.infer(digits_x[j % len(digits_x)], tags={"critical"})
                    with lock:
                        results.append(
                            (t0, r.request_id or "", r.tier, (time.monotonic() - t0) * 1e3)
                        )

            threads = [threading.Thread(target=client, args=(k,)) for k in range(n_threads)]
            for t in threads:
                t.start()
            time.sleep(0.4 * per_thread * n_threads / rate)
            w1.kill()  # SIGKILL: no drain, no goodbye
            killed_at.append(time.monotonic())
            for t in threads:
                t.join(60)
            failovers = next(iter(rt._clients)).failovers
        with CloudClient(w2.endpoint) as c:
            assert c.health()["state"] == "serving"
    finally:
        w1.kill()
        w2.stop()

    ids = Counter(rid for _, rid, _, _ in results)
    assert len(results) == n_threads * per_thread  # every call returned
    assert len(ids) == len(results) and max(ids.values()) == 1  # each id exactly once
    after = [r for r in results if r[0] >= killed_at[0]]
    cloud_after = sum(r[2] is Tier.CLOUD for r in after) / len(after)
    assert cloud_after >= 0.95, f"only {cloud_after:.1%} answered by the cloud after the kill"
    window = [ms for t0, _, _, ms in after if t0 < killed_at[0] + 1.0]
    p99 = float(np.percentile(window, 99))
    print(
        f"\nfailover: {failovers} requests failed over; after the kill {cloud_after:.1%} cloud; "
        f"p99 in the first second after the kill {p99:.1f} ms, overall p99 "
        f"{np.percentile([r[3] for r in results], 99):.1f} ms"
    )


def _open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


def test_a_thread_per_request_does_not_leak_sockets(worker) -> None:
    with CloudClient(worker.endpoint) as c:
        c.health()
        before = _open_fds()
        for _ in range(300):
            t = threading.Thread(target=c.health)
            t.start()
            t.join()
        assert _open_fds() - before < 20  # one socket set reused, not one per thread
        assert len(c.pool._idle) == 1 and c.pool._in_use == 0


def test_a_stream_collected_inside_a_pool_call_of_its_thread_does_not_deadlock(worker) -> None:
    """The garbage collector may finalise a stream while its thread is inside a call that holds
    the pool's (non-reentrant) lock; the finaliser must not take it."""
    done = threading.Event()
    with CloudClient(worker.endpoint) as c:

        def run() -> None:
            call = c.generate("no-such-model", "x")  # out and open: its finaliser cancels it
            with c.pool._lock:  # as if the collector ran inside checkout() of this thread
                del call
                gc.collect()
            done.set()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(10)
        assert done.is_set(), "the stream's finaliser deadlocked on the pool's lock"
        c.health()  # the next checkout settles what the finaliser gave back
        assert c.pool._in_use == 0 and c.pool._outstanding == [0]
        assert len(c.pool._idle) == 1


def test_closing_the_runtime_while_threads_are_in_infer_is_safe(make_policy, worker, digits_x):
    rt = EdgeRuntime.from_policy(make_policy(worker.endpoint, threshold=1.0, log=False))
    outcomes: Counter[str] = Counter()
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            r = rt.infer(digits_x[0], tags={"critical"})
            with lock:
                outcomes[r.tier.value] += 1

    lock = threading.Lock()
    threads = [threading.Thread(target=loop) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    rt.close()  # in-flight requests finish; later ones answer on the edge, marked degraded
    give_up = time.monotonic() + 10  # a loaded machine may not run the threads for a while
    while not outcomes["edge-degraded"] and time.monotonic() < give_up:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert outcomes["cloud"] > 0 and outcomes["edge-degraded"] > 0
