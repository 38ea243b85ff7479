"""Load generation for ``tandem bench``: closed and open loop, windows, the stability rule.

A *call* answers one item (its index) and says how: an :class:`~tandem.bench.stats.Outcome`.
:func:`run_level` drives calls at one load point and measures them in windows:

* **closed loop** — ``concurrency`` threads, each sending its next request when its answer
  arrives; latency from send to answer (:func:`closed_loop`, which the developer benchmarks
  drive for a fixed time through :func:`run_closed`).
* **open loop** — requests arrive as a Poisson process at ``rate`` per second (the intended
  send times are drawn ahead, from a seeded generator) and run on up to ``max_in_flight``
  threads; latency is counted from the **intended** send time, so time a request spent waiting
  for a free thread — queueing the system under test caused — is in its latency rather than
  hidden (no coordinated omission).

Windows are ``window_s`` long (by completion time). After at least ``min_windows``, the level
stops once the last ``stable_windows`` windows agree — each window's throughput and p99 within
``stability_pct`` percent of their mean (perf_analyzer's rule) — and reports those windows; at
``max_windows`` it stops and says it never stabilised (and reports every measured window).
Everything is bounded: windows, requests (``max_requests``), threads, the open loop's queue.
What a window holds is a :class:`~tandem.bench.stats.Stats`; the level's JSON is
:func:`tandem.bench.report.level_json`.
"""

from __future__ import annotations

import itertools
import math
import queue
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from tandem.bench.stats import Outcome, Stats, failed

_JOIN_S = 60.0  # how long in-flight calls may take to finish once a level stops

T = TypeVar("T")
Call = Callable[[int], Outcome]
Entry = tuple[float, Any, float, float]
"""What a driver records per answer: ``(time done, outcome, latency ms, queued ms)``
(``time.perf_counter`` seconds); an outcome None marks a request sent (open loop)."""
Tick = Callable[[dict[str, Any]], None]


def item_counter(
    stop: threading.Event, *, max_requests: int = sys.maxsize, n_items: int = sys.maxsize
) -> Callable[[], int | None]:
    """``take()`` for a driver's threads: the item each next request answers (0, 1, 2 ...
    cycled over ``n_items``; one shared counter, so no two threads send the same request),
    None once ``max_requests`` were taken or ``stop`` is set."""
    counter = itertools.count()

    def take() -> int | None:
        i = next(counter)
        return None if i >= max_requests or stop.is_set() else i % n_items

    return take


def closed_loop(
    call: Callable[[int], T],
    clients: int,
    take: Callable[[], int | None],
    put: Callable[[Entry], Any],
) -> list[threading.Thread]:
    """The closed loop: ``clients`` threads (returned unstarted), each sending its next request
    when its answer arrives — ``call(i)`` for each ``i`` that ``take()`` gives, until it gives
    None — and putting ``(time done, outcome, latency ms, 0.0)`` for each answer. A call that
    raises is an answer too, :func:`~tandem.bench.stats.failed`'s outcome: a failed request is a
    measurement, not a crash of the driver."""

    def client() -> None:
        clock, record, answer = time.perf_counter, put, call  # the hot loop: no lock, no lookups
        while (i := take()) is not None:
            t0 = clock()
            try:
                o: Any = answer(i)
            except Exception as e:
                o = failed(e)
            t1 = clock()
            record((t1, o, (t1 - t0) * 1e3, 0.0))

    return [threading.Thread(target=client, daemon=True) for _ in range(clients)]


def run_closed(call: Callable[[int], T], clients: int, seconds: float) -> tuple[list[Entry], float]:
    """The closed loop for a fixed time, as the developer benchmarks run it: ``clients``
    threads call ``call(0)``, ``call(1)`` ... (see :func:`closed_loop`) until ``seconds`` have
    passed; calls in flight then finish and count. Returns every answer's entry and the wall
    time (s) from the start until the last call returned."""
    stop = threading.Event()
    done: deque[Entry] = deque()
    threads = closed_loop(call, clients, item_counter(stop), done.append)
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    time.sleep(seconds)
    stop.set()
    for th in threads:
        th.join()
    return list(done), time.perf_counter() - t0


# ---------------------------------------------------------------------- one level
@dataclass
class Window:
    t_s: float  # end, seconds since measurement started
    stats: Stats


@dataclass
class LevelRun:
    """One load point, measured."""

    windows: list[Window]
    used: list[int]
    stable: bool
    stats: Stats  # the used windows, merged
    warmup_answers: int
    drained: int  # answers that completed after the level stopped (not counted)


def stable(windows: list[Window], k: int, pct: float) -> bool:
    """perf_analyzer's rule: the last ``k`` windows' throughputs, and their p99s, each lie
    within ``pct`` percent of their mean."""
    if len(windows) < k:
        return False
    last = [w.stats for w in windows[-k:]]
    p99s = [s.p99_ms() for s in last]
    if any(p is None for p in p99s):
        return False

    def agree(vals: list[float]) -> bool:
        m = sum(vals) / len(vals)
        return m > 0 and all(abs(v - m) <= pct / 100 * m for v in vals)

    return agree([s.throughput() for s in last]) and agree(p99s)  # type: ignore[arg-type]


class _Box:
    """Where calls are recorded. The calling threads only append ``(time, outcome, latency,
    queued)`` to a deque (atomic, no lock: a lock shared by the clients cost more than the
    histograms); the measuring thread drains it every tick and sorts each entry into the open
    window, or counts it as warm-up (before the measurement started) or drained (after the
    level stopped). ``outcome`` None marks a request sent."""

    def __init__(self) -> None:
        self.q: deque[tuple[float, Outcome | None, float, float]] = deque()
        self.current: Stats | None = None  # the open window; None: warming up, or stopped
        self.measuring = False
        self.carry: list[tuple[float, Outcome | None, float, float]] = []
        self.warmup = 0
        self.drained = 0

    def drain(self, before: float = math.inf) -> None:
        """Sort what the threads have queued so far (no more: the callers may outpace this):
        entries from ``before`` on are set aside for the next window."""
        pop, cur = self.q.popleft, self.current
        for _ in range(len(self.q)):
            e = pop()
            if e[0] >= before:
                self.carry.append(e)
            elif cur is not None:
                if e[1] is None:
                    cur.sent += 1
                else:
                    cur.add(e[1], e[2], e[3])
            elif e[1] is not None:
                if self.measuring:
                    self.drained += 1
                else:
                    self.warmup += 1

    def _requeue(self) -> None:
        carry, self.carry = self.carry, []
        self.q.extendleft(reversed(carry))

    def open(self, at: float) -> None:
        """Start a window at ``at`` (the first one ends the warm-up)."""
        self._requeue()
        self.drain(before=at)  # what finished before ``at``: warm-up (or drained)
        self.measuring = True
        self.current = Stats()
        self._requeue()

    def close(self, at: float) -> Stats:
        """End the open window at ``at`` and return it."""
        self.drain(before=at)
        s, self.current = self.current, None
        assert s is not None
        return s

    def finish(self) -> None:
        """The level is over: whatever is left was answered too late to count."""
        self.current = None
        self._requeue()
        self.drain()


def _safe(call: Call, i: int) -> Outcome:
    try:
        return call(i)
    except Exception as e:  # a failed request is a measurement, not a crash of the tool
        return failed(e)


def run_level(
    call: Call,
    n_items: int,
    *,
    mode: str,
    point: float,
    warmup_s: float = 1.0,
    window_s: float = 2.0,
    min_windows: int = 3,
    max_windows: int = 10,
    stable_windows: int = 3,
    stability_pct: float = 10.0,
    max_requests: int = 1_000_000,
    max_in_flight: int = 64,
    min_window_answers: int = 100,
    seed: int = 0,
    on_tick: Tick | None = None,
    tick_s: float = 0.25,
) -> LevelRun:
    """Drive ``call`` over items ``0 .. n_items-1`` (cycled) at one load point: ``mode``
    ``closed`` with ``point`` clients, or ``open`` with ``point`` arrivals per second.
    A window lasts ``window_s``, longer (up to 5×) until it holds ``min_window_answers``.
    ``on_tick`` gets ``{"phase", "window", "requests", "rate", "p99_ms"}`` every ``tick_s``."""
    if n_items < 1:
        raise ValueError("no items to send")
    if not (math.isfinite(point) and 0 < point <= 1e6) or (mode == "closed" and point < 1):
        raise ValueError(f"load point must be a finite rate or client count, got {point}")
    if mode not in ("closed", "open"):
        raise ValueError(f"mode must be 'closed' or 'open', got {mode!r}")
    box = _Box()
    stop = threading.Event()
    take = item_counter(stop, max_requests=max_requests, n_items=n_items)
    threads: list[threading.Thread] = []
    if mode == "closed":
        threads = closed_loop(call, int(point), take, box.q.append)
    else:
        pending: queue.Queue[tuple[int, float] | None] = queue.Queue(maxsize=100_000)

        def runner() -> None:
            while (job := pending.get()) is not None:
                if stop.is_set():  # the level is over: the backlog is not run
                    box.q.append((math.inf, Outcome(error="NotRun"), 0.0, 0.0))
                    continue
                i, intended = job
                t0 = time.perf_counter()
                o = _safe(call, i)
                t1 = time.perf_counter()
                box.q.append((t1, o, (t1 - intended) * 1e3, (t0 - intended) * 1e3))

        def arrivals() -> None:
            rng = random.Random(seed)
            t = time.perf_counter()
            while (i := take()) is not None:
                t += rng.expovariate(point)
                if (wait := t - time.perf_counter()) > 0 and stop.wait(wait):
                    break
                now = time.perf_counter()
                box.q.append((now, None, 0.0, 0.0))
                try:
                    pending.put_nowait((i, t))
                except queue.Full:  # the tool cannot keep up: counted, never hidden
                    box.q.append((now, Outcome(error="BenchQueueFull"), 0.0, 0.0))
            for _ in range(max_in_flight):
                pending.put(None)

        threads = [threading.Thread(target=runner, daemon=True) for _ in range(max_in_flight)]
        threads.append(threading.Thread(target=arrivals, daemon=True))

    t_start = time.perf_counter()
    if warmup_s <= 0:
        box.open(t_start)
    for th in threads:
        th.start()
    windows: list[Window] = []
    is_stable = False
    try:

        def done() -> bool:
            return not any(th.is_alive() for th in threads)

        t_measure = t_start
        if warmup_s > 0:
            _sleep_ticking(t_start + warmup_s, "warm-up", box, None, t_start, on_tick, tick_s, done)
            t_measure = time.perf_counter()
            box.open(t_measure)
        t_win = t_measure
        while len(windows) < max_windows:
            end, longest = t_win + window_s, t_win + 5 * window_s
            phase = f"window {len(windows) + 1}"
            _sleep_ticking(end, phase, box, windows, t_win, on_tick, tick_s, done)
            # too few answers for a p99 to mean anything: the window grows (up to 5x)
            while (
                box.current is not None
                and box.current.answers < min_window_answers
                and time.perf_counter() < longest
                and not done()
            ):
                _sleep_ticking(
                    time.perf_counter() + tick_s, phase, box, windows, t_win, on_tick, tick_s, done
                )
            now = time.perf_counter()
            s = box.close(now)
            s.span_s = now - t_win
            windows.append(Window(now - t_measure, s))
            t_win = now
            if len(windows) >= min_windows and stable(windows, stable_windows, stability_pct):
                is_stable = True
                break
            if done():  # max_requests reached
                break
            box.open(now)
    finally:
        stop.set()
        deadline = time.perf_counter() + _JOIN_S
        for th in threads:
            th.join(max(0.0, deadline - time.perf_counter()))
        box.finish()
    used = (
        list(range(len(windows) - stable_windows, len(windows)))
        if is_stable
        else (list(range(len(windows))))
    )
    merged = Stats()
    for i in used:
        merged.merge(windows[i].stats)
    return LevelRun(windows, used, is_stable, merged, box.warmup, box.drained)


def _sleep_ticking(
    until: float,
    phase: str,
    box: _Box,
    windows: list[Window] | None,
    since: float,
    on_tick: Tick | None,
    tick_s: float,
    done: Callable[[], bool],
) -> None:
    while (left := until - time.perf_counter()) > 0 and not done():
        time.sleep(min(left, tick_s))
        box.drain()
        if on_tick is None:
            continue
        cur = box.current
        n = cur.answers if cur is not None else box.warmup
        p99 = cur.p99_ms() if cur is not None and n else None
        elapsed = max(time.perf_counter() - since, 1e-9)
        on_tick(
            {
                "phase": phase,
                "window": 0 if windows is None else len(windows) + 1,
                "requests": n,
                "rate": n / elapsed,
                "p99_ms": p99,
            }
        )
