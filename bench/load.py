"""Load generation and measurement for ``tandem bench``: closed and open loop, windows, the
stability rule, HDR histograms per tier.

A *call* answers one item (its index) and says how: an :class:`Outcome`. :func:`run_level`
drives calls at one load point and measures them in windows:

* **closed loop** — ``concurrency`` threads, each sending its next request when its answer
  arrives; latency from send to answer.
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

Latencies go into HDR histograms (``hdrhistogram``: 1 µs to 10 min, 3 significant digits), one
per tier and one for all answers, per window; windows merge by adding histograms.
"""

from __future__ import annotations

import itertools
import math
import queue
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

TIERS = ("edge", "cloud", "edge-degraded")
SPLIT = ("local", "gate", "network", "cloud_queue", "cloud_compute")
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p99.9": 99.9}
_HIGHEST_US = 600_000_000  # 10 min
_JOIN_S = 60.0  # how long in-flight calls may take to finish once a level stops


def histogram() -> HdrHistogram:
    return HdrHistogram(1, _HIGHEST_US, 3)


def record_ms(h: HdrHistogram, ms: float) -> None:
    """Record ``ms`` (clamped into the histogram's 1 µs .. 10 min range)."""
    if math.isfinite(ms):
        h.record_value(min(max(round(ms * 1e3), 1), _HIGHEST_US))


@dataclass(slots=True)
class GenSample:
    """What one streamed answer did. Times in ms from when the call started."""

    ttft_ms: float | None
    itl_ms: list[float]
    tokens: int
    duration_ms: float
    drafted: int = 0
    accepted: int = 0
    by_tier: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Outcome:
    """One call's result. ``tier`` None: the call failed with ``error`` (an error type name);
    ``correct`` None: no label. ``split``: an escalated answer's parts in ms (local, gate,
    network, cloud_queue, cloud_compute)."""

    tier: str | None = None
    error: str | None = None
    detail: str | None = None  # the error's message
    correct: bool | None = None
    escalated: bool = False
    split: dict[str, float] | None = None
    gen: GenSample | None = None


Call = Callable[[int], Outcome]


class Stats:
    """Everything measured over some span: histograms per tier, counts, errors."""

    def __init__(self) -> None:
        self.lat: dict[str, HdrHistogram] = {}  # per tier; all answers: all_latency()
        self._all: HdrHistogram | None = None  # all_latency()'s cache, until the next add
        self.count: Counter[str] = Counter()
        self.correct: Counter[str] = Counter()  # per tier, answers with a label that were right
        self.labelled: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.error_examples: dict[str, str] = {}  # one message per error type
        self.escalated = 0
        self.sent = 0  # requests started (open loop: arrivals)
        self.lag: HdrHistogram | None = None  # open loop: intended send time -> call started
        self.split: dict[str, HdrHistogram] = {}
        self.split_sum: Counter[str] = Counter()
        self.gen_ttft: HdrHistogram | None = None
        self.gen_itl: HdrHistogram | None = None
        self.gen: Counter[str] = Counter()  # tokens, drafted, accepted, tier:<t>
        self.gen_rate_sum = 0.0  # sum of per-answer tokens/s
        self.span_s = 0.0  # wall time this covers

    def add(self, o: Outcome, latency_ms: float, queued_ms: float) -> None:
        if queued_ms > 0:
            if self.lag is None:
                self.lag = histogram()
            record_ms(self.lag, queued_ms)
        tier = o.tier
        if tier is None:
            kind = o.error or "error"
            self.errors[kind] += 1
            if o.detail and len(self.error_examples) < 32:
                self.error_examples.setdefault(kind, o.detail)
            return
        lat = self.lat
        h = lat.get(tier)
        if h is None:
            h = lat[tier] = histogram()
        record_ms(h, latency_ms)
        self._all = None
        self.count[tier] += 1
        if o.escalated:
            self.escalated += 1
        if o.correct is not None:
            self.labelled[tier] += 1
            self.correct[tier] += o.correct
        if o.split:
            for k, v in o.split.items():
                h = self.split.get(k)
                if h is None:
                    h = self.split[k] = histogram()
                record_ms(h, v)
                self.split_sum[k] += v
        g = o.gen
        if g is not None:
            if self.gen_ttft is None:
                self.gen_ttft, self.gen_itl = histogram(), histogram()
            assert self.gen_itl is not None
            if g.ttft_ms is not None:
                record_ms(self.gen_ttft, g.ttft_ms + queued_ms)
            for v in g.itl_ms:
                record_ms(self.gen_itl, v)
            self.gen.update(
                {"answers": 1, "tokens": g.tokens, "drafted": g.drafted, "accepted": g.accepted}
            )
            self.gen.update({f"tier:{t}": n for t, n in g.by_tier.items()})
            if g.duration_ms > 0:
                self.gen_rate_sum += g.tokens / (g.duration_ms / 1e3)

    def merge(self, other: Stats) -> None:
        for k, h in other.lat.items():
            self.lat.setdefault(k, histogram()).add(h)
        self._all = None
        for k, h in other.split.items():
            self.split.setdefault(k, histogram()).add(h)
        for name in ("count", "correct", "labelled", "errors", "split_sum", "gen"):
            getattr(self, name).update(getattr(other, name))
        for k, v in other.error_examples.items():
            self.error_examples.setdefault(k, v)
        self.escalated += other.escalated
        self.sent += other.sent
        self.gen_rate_sum += other.gen_rate_sum
        self.span_s += other.span_s
        for name in ("lag", "gen_ttft", "gen_itl"):  # the histograms a run may not have
            theirs = getattr(other, name)
            if theirs is not None:
                if getattr(self, name) is None:
                    setattr(self, name, histogram())
                getattr(self, name).add(theirs)

    @property
    def answers(self) -> int:
        return sum(self.count.values())

    def p99_ms(self) -> float | None:
        h = self.all_latency()
        return h.get_value_at_percentile(99.0) / 1e3 if h.get_total_count() else None

    def all_latency(self) -> HdrHistogram:
        """Every answer's latency: the tiers' histograms added (recording each answer once
        per tier, not twice, keeps the per-request cost down)."""
        if self._all is None:
            self._all = histogram()
            for h in self.lat.values():
                self._all.add(h)
        return self._all

    def throughput(self) -> float:
        return self.answers / self.span_s if self.span_s > 0 else 0.0


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


def failed(e: Exception) -> Outcome:
    return Outcome(error=type(e).__name__, detail=str(e)[:300])


Tick = Callable[[dict[str, Any]], None]


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
    counter = itertools.count()
    threads: list[threading.Thread] = []

    def take() -> int | None:
        i = next(counter)
        return None if i >= max_requests or stop.is_set() else i

    if mode == "closed":

        def client() -> None:
            clock, put = time.perf_counter, box.q.append  # the hot loop: no lock, no lookups
            while (i := take()) is not None:
                t0 = clock()
                try:
                    o = call(i % n_items)
                except Exception as e:  # as _safe
                    o = failed(e)
                t1 = clock()
                put((t1, o, (t1 - t0) * 1e3, 0.0))

        threads = [threading.Thread(target=client, daemon=True) for _ in range(int(point))]
    else:
        pending: queue.Queue[tuple[int, float] | None] = queue.Queue(maxsize=100_000)

        def runner() -> None:
            while (job := pending.get()) is not None:
                if stop.is_set():  # the level is over: the backlog is not run
                    box.q.append((math.inf, Outcome(error="NotRun"), 0.0, 0.0))
                    continue
                i, intended = job
                t0 = time.perf_counter()
                o = _safe(call, i % n_items)
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


# ---------------------------------------------------------------------- results
_CDF_FRACTIONS = [i / 50 for i in range(1, 50)] + [0.99, 0.995, 0.999, 0.9999, 1.0]


def latency_json(h: HdrHistogram) -> dict[str, float | None]:
    """p50 .. p99.9, max and mean in ms (None when nothing was recorded)."""
    if not h.get_total_count():
        return {k: None for k in (*PERCENTILES, "max", "mean")}
    out: dict[str, float | None] = {
        k: h.get_value_at_percentile(p) / 1e3 for k, p in PERCENTILES.items()
    }
    out["max"] = h.get_max_value() / 1e3
    out["mean"] = h.get_mean_value() / 1e3
    return out


def cdf_json(h: HdrHistogram) -> list[list[float]]:
    """``[[ms, fraction], ...]`` ascending, from the histogram's percentiles."""
    if not h.get_total_count():
        return []
    pts: list[list[float]] = []
    for f in _CDF_FRACTIONS:
        v = h.get_value_at_percentile(f * 100) / 1e3
        if pts and v <= pts[-1][0]:
            pts[-1][1] = f
        else:
            pts.append([v, f])
    return pts


def _pcts(h: HdrHistogram, total: float) -> dict[str, float]:
    n = h.get_total_count()
    return {
        "mean": total / n if n else 0.0,
        "p50": h.get_value_at_percentile(50) / 1e3,
        "p99": h.get_value_at_percentile(99) / 1e3,
    }


def level_json(run: LevelRun, **head: Any) -> dict[str, Any]:
    """One level in the results schema (``head``: label, network, load, ...)."""
    s = run.stats
    n = s.answers
    span = s.span_s

    def tier(key: str) -> dict[str, Any]:
        h = s.all_latency() if key == "all" else s.lat[key]
        c = h.get_total_count()
        lab = sum(s.labelled.values()) if key == "all" else s.labelled[key]
        ok = sum(s.correct.values()) if key == "all" else s.correct[key]
        return {
            "count": c,
            "share": c / n if n else 0.0,
            "throughput": c / span if span > 0 else 0.0,
            "accuracy": ok / lab if lab else None,
            "latency_ms": latency_json(h),
            "cdf": cdf_json(h),
        }

    out = dict(head)
    out.update(
        stable=run.stable,
        windows=[
            {
                "t_s": w.t_s,
                "n": w.stats.answers,
                "throughput": w.stats.throughput(),
                "p99_ms": w.stats.p99_ms(),
            }
            for w in run.windows
        ],
        used_windows=run.used,
        duration_s=span,
        requests=n + sum(s.errors.values()),
        sent=s.sent or n + sum(s.errors.values()),  # closed loop: each request sent is answered
        throughput=s.throughput(),
        escalation_rate=s.escalated / n if n else None,
        accuracy=tier("all")["accuracy"],
        errors=dict(s.errors),
        error_examples=dict(s.error_examples),
        all=tier("all"),
        tiers={t: tier(t) for t in TIERS if s.count[t]},
        split_ms=(
            {k: _pcts(s.split[k], s.split_sum[k]) for k in SPLIT if k in s.split}
            if s.split
            else None
        ),
        # open loop: how late the tool started calls after their intended send time (its own
        # timer and thread hand-off; queueing behind busy calls counts here too)
        send_lag_ms=None if s.lag is None else latency_json(s.lag),
        warmup_answers=run.warmup_answers,
        drained=run.drained,
        llm=None,
    )
    if s.gen_ttft is not None and s.gen_itl is not None:
        g = s.gen
        out["llm"] = {
            "ttft_ms": latency_json(s.gen_ttft),
            "itl_ms": latency_json(s.gen_itl),
            "tokens_per_s": g["tokens"] / span if span > 0 else 0.0,
            "tokens_per_s_per_stream": s.gen_rate_sum / g["answers"] if g["answers"] else None,
            "output_tokens": g["tokens"],
            "drafted": g["drafted"],
            "accepted": g["accepted"],
            "acceptance": g["accepted"] / g["drafted"] if g["drafted"] else None,
            "tokens_by_tier": {t: g[f"tier:{t}"] for t in TIERS if g[f"tier:{t}"]},
        }
    return out
