"""Prometheus metrics of the edge runtime (``tandem_edge_…``), in the runtime's own
``CollectorRegistry`` (never prometheus-client's global one), for an exporter to scrape
(:meth:`EdgeRuntime.serve_metrics <tandem.edge.runtime.EdgeRuntime.serve_metrics>`, the
gateway's ``/metrics``, or the user's own through ``EdgeRuntime.metrics_registry``).

Two sources, one collector (:class:`EdgeCollector`):

* what the request path records here (:class:`RequestRecorder`), only while metrics are on:
  one answer's tier, stage, reason and timings, queued lock-free and folded into plain bucket
  counts at scrape time;
* what the runtime already counts, read at scrape time from ``EdgeRuntime.stats()``: the
  escalation log's queue and counters, the link state per endpoint, the model version each task
  serves, swaps, the drift alarm's window. Nothing is added to the request path for these.

**Why not** ``prometheus_client.Histogram`` **on the path**: an edge answer feeds a request
count and three histograms (its total, ``local``, ``route``). prometheus-client's pre-bound
children cost several µs for that (a lock per value, a linear scan of the bounds); even plain
bucket lists folded inline cost over 1 µs, and several on a loaded 2-core machine
(``benchmarks/serving/edge_metrics.py`` prints each per run). So the request path
only appends one tuple to a deque (lock-free: ``deque.append`` is atomic), and the folding
(``bisect`` into bucket lists) happens at scrape time, off the request thread. The exposition
is still prometheus-client's (:class:`~prometheus_client.core.HistogramMetricFamily`). With
metrics off the path has one ``is None`` test.

Label sets are bounded: ``tier`` (3 values), ``stage`` and ``step`` (fixed names and the
policy's ``tier:N``), ``reason`` (the router's reasons, the policy's ``rule:TAG``, and the
typed error codes of a degraded answer). A task with more than :data:`MAX_SERIES_PER_TASK`
(tier, stage, reason) sets counts the rest under reason ``other``.
"""

from __future__ import annotations

import collections
import threading
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tandem.runtime.types import GenerationResult, Result, Tier

# Seconds. The edge path runs in tens of µs to a few ms; the cloud's round trip in ms to s.
LATENCY_BUCKETS_S = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BOUNDS_MS = tuple(b * 1e3 for b in LATENCY_BUCKETS_S)  # the runtime's timings are ms
_LE = tuple(f"{b:g}" for b in LATENCY_BUCKETS_S)
_N = len(_BOUNDS_MS) + 2  # a histogram: one count per bound, the +Inf count, then the sum (ms)
MAX_SERIES_PER_TASK = 256  # (tier, stage, reason) sets, and steps, per task
# Answers queued for folding, at most (about 300 B each: ~2.5 MB): a scrape every 15 s folds
# them all below 550 answers/s; past it, each request that adds one folds FOLD_CHUNK.
MAX_PENDING = 8192
FOLD_CHUNK = 4
OTHER = "other"
BUDGET_REASON = "budget-exhausted"  # tandem.router.routing.OVER_BUDGET's reason

StatsFn = Callable[[], Mapping[str, Any]]


def _new_hist() -> list[float]:
    return [0] * _N  # type: ignore[list-item]


class _TaskSeries:
    """One task's recorded answers: a total-latency histogram per (tier, stage, reason) (its
    count is the request count), one per step, and a generation task's TTFT and tokens."""

    __slots__ = ("prompt_tokens", "requests", "steps", "tokens", "ttft")

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], list[float]] = {}
        self.steps: dict[str, list[float]] = {}
        self.ttft = _new_hist()
        self.tokens: Counter[str] = Counter()
        self.prompt_tokens = 0


class RequestRecorder:
    """What the request path records while metrics are on. :meth:`observe` (a classification
    answer) only queues ``(task, tier, stage, reason, timings)`` on a deque, lock-free; the
    queue is folded into the histograms at scrape time (:meth:`snapshot`), or a few answers at
    a time by the request that finds more than :data:`MAX_PENDING` queued (nobody scrapes:
    each answer is then folded once, as it would be inline). :meth:`observe_generation` folds
    at once (a generation costs milliseconds). Histograms are only touched under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held by whoever folds or reads the histograms
        self._tasks: dict[str, _TaskSeries] = {}
        self._pending: collections.deque[tuple[str, str, str, str, Mapping[str, float]]] = (
            collections.deque()
        )
        self._queue = self._pending.append

    def observe(self, task: str, r: Result) -> None:
        """One classification answer: its tier, stage and reason, and its timings (ms), read
        when folded: ``total`` into the request histogram, every other key into its step's."""
        self._queue((task, r.tier, r.stage, r.reason, r.timings))
        if len(self._pending) > MAX_PENDING and self._lock.acquire(blocking=False):
            try:  # another thread folding: it will get there
                self._fold(FOLD_CHUNK)
            finally:
                self._lock.release()

    def _fold(self, limit: int | None = None) -> None:
        """Fold up to ``limit`` queued answers (None: all); the caller holds the lock."""
        pending, tasks, n = self._pending, self._tasks, 0
        while limit is None or n < limit:
            try:
                task, tier, stage, reason, timings = pending.popleft()
            except IndexError:
                return
            n += 1
            ts = tasks.get(task) or tasks.setdefault(task, _TaskSeries())
            total = ts.requests.get((tier, stage, reason)) or _series(ts, tier, stage, reason)
            for name, ms in timings.items():
                h = total if name == "total" else ts.steps.get(name) or _step(ts, name)
                if h is not None:
                    h[bisect_left(_BOUNDS_MS, ms)] += 1
                    h[-1] += ms

    def observe_generation(self, task: str, r: GenerationResult) -> None:
        """One generation answer: as :meth:`observe` (tier ``edge-degraded`` when the cloud
        failed, else ``cloud`` if it took part), plus ``ttft`` and the tokens per tier."""
        tier = (
            Tier.EDGE_DEGRADED if r.degraded else Tier.CLOUD if Tier.CLOUD in r.tiers else Tier.EDGE
        )
        stage = "cloud" if Tier.CLOUD in r.tiers else "edge"
        tokens = Counter(str(t) for t in r.token_tiers)
        with self._lock:
            ts = self._tasks.get(task) or self._tasks.setdefault(task, _TaskSeries())
            total = ts.requests.get((tier, stage, r.reason)) or _series(ts, tier, stage, r.reason)
            for name, ms in r.timings.items():
                if name == "total":
                    h: list[float] | None = total
                elif name == "ttft":
                    h = ts.ttft
                else:
                    h = ts.steps.get(name) or _step(ts, name)
                if h is not None:
                    h[bisect_left(_BOUNDS_MS, ms)] += 1
                    h[-1] += ms
            ts.tokens.update(tokens)
            ts.prompt_tokens += r.prompt_tokens or 0

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Fold what is queued, then copy every task's series (under the lock: a request that
        finds the queue over its bound meanwhile skips its share of folding)."""
        with self._lock:
            self._fold()
            return {
                task: {
                    "requests": {k: list(h) for k, h in ts.requests.items()},
                    "steps": {k: list(h) for k, h in ts.steps.items()},
                    "ttft": list(ts.ttft),
                    "tokens": dict(ts.tokens),
                    "prompt_tokens": ts.prompt_tokens,
                }
                for task, ts in self._tasks.items()
            }


def _series(ts: _TaskSeries, tier: str, stage: str, reason: str) -> list[float]:
    key = (tier, stage, reason)
    if key not in ts.requests and len(ts.requests) >= MAX_SERIES_PER_TASK:
        key = (tier, stage, OTHER)
    return ts.requests.setdefault(key, _new_hist())


def _step(ts: _TaskSeries, name: str) -> list[float] | None:
    if name not in ts.steps and len(ts.steps) >= MAX_SERIES_PER_TASK:
        return None
    return ts.steps.setdefault(name, _new_hist())


def _merge(hists: Iterator[list[float]]) -> list[float]:
    out = _new_hist()
    for h in hists:
        for i, v in enumerate(h):
            out[i] += v
    return out


def _buckets(h: list[float]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative ``(le, count)`` pairs and the sum in seconds."""
    out, cum = [], 0
    for le, n in zip(_LE, h, strict=False):
        cum += n
        out.append((le, cum))
    out.append(("+Inf", cum + h[len(_LE)]))
    return out, h[-1] / 1e3


class EdgeCollector(Collector):
    """The ``tandem_edge_…`` metrics: the recorder's series and, read at scrape time,
    ``stats()`` (:meth:`tandem.edge.runtime.EdgeRuntime.stats`)."""

    def __init__(self, recorder: RequestRecorder, stats: StatsFn) -> None:
        self.recorder = recorder
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        snap = self.recorder.snapshot()
        stats = self._stats()
        yield from self._requests(snap)
        yield from self._generation(snap)
        yield from self._tasks(stats.get("tasks", {}))
        yield from self._escalation_log(stats.get("escalation_log"))
        yield from self._policy(stats.get("policy"))
        links = GaugeMetricFamily(
            "tandem_edge_link_up",
            "1 while the endpoint is taken as reachable; 0 once a call found no connection to "
            "it (or lost it mid-call), 1 again when a call finds it connected",
            labels=["endpoint"],
        )
        for endpoint, up in sorted(stats.get("links", {}).items()):
            links.add_metric([endpoint], 1.0 if up else 0.0)
        yield links

    def _requests(self, snap: Mapping[str, Any]) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "tandem_edge_requests",
            "Answers by task, by who answered (tier: edge, cloud, edge-degraded), where the "
            "answer stopped (stage: edge, cloud, tier:N) and why (reason: the routing "
            "decision, e.g. confident, low-confidence, rule:TAG, budget-exhausted, audit; a "
            "degraded answer adds '; cloud-CODE')",
            labels=["task", "tier", "stage", "reason"],
        )
        escalations = CounterMetricFamily(
            "tandem_edge_escalations",
            "Answers the router sent toward the cloud (tier cloud or edge-degraded)",
            labels=["task"],
        )
        budget = CounterMetricFamily(
            "tandem_edge_budget_exhausted",
            "Answers kept on the edge because the task's escalation budget was spent",
            labels=["task"],
        )
        duration = HistogramMetricFamily(
            "tandem_edge_request_duration_seconds",
            "Time of one answer in the runtime (its timings' total), by task and tier",
            labels=["task", "tier"],
        )
        steps = HistogramMetricFamily(
            "tandem_edge_step_duration_seconds",
            "Time of each step of an answer: local (the edge model), route (confidence, "
            "rules, gate), cloud (the round trip to the workers), cloud_queue and "
            "cloud_compute (the worker's own measures), tier:N, log (queueing the "
            "escalation log's rows); generation: local and cloud",
            labels=["task", "step"],
        )
        for task, ts in sorted(snap.items()):
            by_tier: dict[str, list[list[float]]] = {}
            n_esc = n_budget = 0
            for (tier, stage, reason), h in sorted(ts["requests"].items()):
                n = sum(h[:-1])
                requests.add_metric([task, str(tier), stage, reason], n)
                by_tier.setdefault(str(tier), []).append(h)
                n_esc += n if tier != Tier.EDGE else 0
                n_budget += n if reason.startswith(BUDGET_REASON) else 0
            escalations.add_metric([task], n_esc)
            budget.add_metric([task], n_budget)
            for tier, hs in sorted(by_tier.items()):
                duration.add_metric([task, tier], *_buckets(_merge(iter(hs))))
            for step, h in sorted(ts["steps"].items()):
                steps.add_metric([task, step], *_buckets(h))
        yield from (requests, escalations, budget, duration, steps)

    def _generation(self, snap: Mapping[str, Any]) -> Iterator[Metric]:
        ttft = HistogramMetricFamily(
            "tandem_edge_time_to_first_token_seconds",
            "Generation: from the call to the answer's first token, whichever tier made it",
            labels=["task"],
        )
        tokens = CounterMetricFamily(
            "tandem_edge_generated_tokens",
            "Generation: answer tokens by the tier that produced them",
            labels=["task", "tier"],
        )
        prompt = CounterMetricFamily(
            "tandem_edge_prompt_tokens",
            "Generation: prompt tokens (in the edge model's tokens)",
            labels=["task"],
        )
        for task, ts in sorted(snap.items()):
            if not ts["tokens"] and not sum(ts["ttft"][:-1]):
                continue  # a classification task
            ttft.add_metric([task], *_buckets(ts["ttft"]))
            for tier, n in sorted(ts["tokens"].items()):
                tokens.add_metric([task, tier], n)
            prompt.add_metric([task], ts["prompt_tokens"])
        yield from (f for f in (ttft, tokens, prompt) if f.samples)  # none: no generation task

    def _tasks(self, tasks: Mapping[str, Any]) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "tandem_edge_model_info",
            "1 for the edge model version each task serves now (it changes on a hot swap)",
            labels=["task", "version"],
        )
        swaps = CounterMetricFamily(
            "tandem_edge_model_swaps",
            "Hot swaps of a task's edge model: done, or refused (the old version kept serving)",
            labels=["task", "outcome"],
        )
        rate = GaugeMetricFamily(
            "tandem_edge_drift_escalation_rate",
            "The drift alarm's last window: the share of requests its gate escalated",
            labels=["task"],
        )
        alarms = CounterMetricFamily(
            "tandem_edge_drift_alarms", "Drift alarms raised", labels=["task"]
        )
        for task, s in sorted(tasks.items()):
            info.add_metric([task, str(s.get("versions", {}).get("edge", ""))], 1.0)
            sw = s.get("swaps", {})
            swaps.add_metric([task, "done"], sw.get("done", 0))
            swaps.add_metric([task, "refused"], sw.get("refused", 0))
            drift = s.get("drift")
            if drift is not None:
                alarms.add_metric([task], drift.get("alarms", 0))
                if drift.get("escalation_rate") is not None:
                    rate.add_metric([task], drift["escalation_rate"])
        yield from (info, swaps)
        yield from (f for f in (rate, alarms) if f.samples)  # none: no drift alarm

    def _policy(self, s: Mapping[str, Any] | None) -> Iterator[Metric]:
        if s is None:
            return
        reloads = CounterMetricFamily(
            "tandem_edge_policy_reloads",
            "Policy reloads: applied, unchanged (same content), refused (the old policy kept "
            "serving; see the log for why)",
            labels=["outcome"],
        )
        for outcome, n in sorted(s.get("reloads", {}).items()):
            reloads.add_metric([outcome], n)
        yield reloads
        info = GaugeMetricFamily(
            "tandem_edge_policy_info",
            "1 for the policy serving now (its sha256)",
            labels=["digest"],
        )
        info.add_metric([str(s.get("digest") or "")], 1.0)
        yield info

    def _escalation_log(self, s: Mapping[str, Any] | None) -> Iterator[Metric]:
        if s is None:
            return
        p = "tandem_edge_escalation_log_"
        yield GaugeMetricFamily(p + "queued_rows", "Rows waiting for the writer", s["queued"])
        yield GaugeMetricFamily(
            p + "queued_bytes", "Bytes of arrays waiting for the writer", s["queued_bytes"]
        )
        for key, doc in (
            ("written", "Rows committed"),
            ("dropped", "Rows dropped: the queue was full, or the log closed"),
            ("failed_rows", "Rows whose batch failed to commit (rolled back)"),
            ("deleted", "Rows deleted by retention (max_rows, max_age_s)"),
        ):
            name = p + "rows_" + key.removesuffix("_rows")
            yield CounterMetricFamily(name, doc, s.get(key, 0))


class EdgeMetrics:
    """A runtime's metrics: the recorder the request path feeds and the registry an
    exporter scrapes. ``stats``: the runtime's ``stats()``."""

    def __init__(self, stats: StatsFn) -> None:
        self.recorder = RequestRecorder()
        self.collector = EdgeCollector(self.recorder, stats)
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        self.observe = self.recorder.observe  # bound once: the request path's one call
        self.observe_generation = self.recorder.observe_generation
