"""The worker's Prometheus metrics, served on ``/metrics`` by :mod:`tandem.runtime.ops_http`.

Made only when the worker's config has an ``http`` section; without it the worker holds no
metric object at all and its hot path pays one ``is None`` check per batch.

Two kinds of numbers, both exported by one custom collector (``prometheus_client``'s
``Collector``: families built at scrape time, in a registry per worker, never the global one):

- **Read at scrape time** — what the worker already counts for ``health``: its event counters
  (``tandem_worker_events_total{event}``), queue depth and bytes, streams and speculative
  sessions, the engines, the models and their readiness. Nothing is counted twice.
- **Recorded on the loop** — requests by outcome, batch sizes, time in queue and compute, time
  to first token, inter-token latency, tokens. The worker loop's thread is their only writer
  (batches, replies, stream ends all happen on it), so they are plain ints and bucket lists
  (:class:`LoopHistogram`) updated without a lock; a scrape copies them. A
  ``prometheus_client.Histogram`` takes a lock per ``observe``: 2.0 µs here against 0.35 µs
  (``benchmarks/serving/worker_metrics.py`` measures the worker with metrics on and off).

Label values are bounded: ``model`` is a model this worker serves (anything else a client
names is counted under ``model=""``), ``kind`` a wire kind, ``outcome`` ``ok`` or an error
code of :mod:`tandem.runtime.errors` (for streams also ``cancelled`` and ``peer_gone``).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

PREFIX = "tandem_worker_"
# seconds; like vLLM's request-latency buckets, with sub-millisecond ones for small models
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# vLLM's time_to_first_token_seconds buckets
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
# vLLM's inter_token_latency_seconds buckets
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5,
)  # fmt: skip
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 65536)

# WorkerStreams.counters: how a stream ended (its "started" and "overloaded" are not ends)
_STREAM_ENDS = ("completed", "cancelled", "expired", "stalled", "failed", "peer_gone", "shut_down")


class LoopHistogram:
    """A histogram with one writer (the worker loop) and no lock: ``observe(value, n)`` counts
    ``n`` observations of ``value`` (a batch's requests that waited the same time)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n

    def cumulative(self) -> tuple[list[tuple[str, int]], float]:
        """``[(le, cumulative count)...]`` ending with ``+Inf``, and the sum: a consistent
        enough snapshot (a scrape may miss the observation being made)."""
        counts, total = list(self.counts), self.sum
        out, running = [], 0
        for bound, c in zip((*self.bounds, float("inf")), counts, strict=True):
            running += c
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out, total


class ModelStats:
    """What the loop records for one model."""

    __slots__ = (
        "batch_rows",
        "compute",
        "generated_tokens",
        "itl",
        "prompt_tokens",
        "queue",
        "ttft",
    )

    def __init__(self) -> None:
        self.queue = LoopHistogram(LATENCY_BUCKETS)
        self.compute = LoopHistogram(LATENCY_BUCKETS)
        self.batch_rows = LoopHistogram(ROW_BUCKETS)
        self.ttft = LoopHistogram(TTFT_BUCKETS)
        self.itl = LoopHistogram(ITL_BUCKETS)
        self.prompt_tokens = 0
        self.generated_tokens = 0


class WorkerMetrics:
    """A worker's metrics: ``registry`` for the HTTP server, the loop's recording methods, and
    (after :meth:`attach`) the worker's own counters read at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, memory, fds
        self.models: dict[str, ModelStats] = {}
        self.requests: dict[tuple[str, str, str], int] = {}  # (model, kind, outcome) → count
        self._serves: Callable[[str], bool] = lambda name: False

    def attach(self, worker: Any) -> None:
        """Export ``worker``'s state (a :class:`~tandem.cloud.worker.CloudWorker`; not imported
        here: it imports this module) too, read at each scrape; label requests with its models."""
        self._serves = lambda name: name in worker.backends
        self.registry.register(_WorkerCollector(worker, self))

    def _model(self, name: str) -> ModelStats:
        stats = self.models.get(name)
        if stats is None:
            stats = self.models[name] = ModelStats()
        return stats

    # ------------------------------------------------------------------ recorded on the loop
    def request(self, model: Any, kind: str, outcome: str, n: int = 1) -> None:
        """``n`` requests of ``kind`` for ``model`` were answered with ``outcome``."""
        name = model if isinstance(model, str) and self._serves(model) else ""
        key = (name, kind, outcome)
        self.requests[key] = self.requests.get(key, 0) + n

    def infer_batch(
        self,
        model: str,
        arrivals: Iterable[float],
        started: float,
        run_s: float,
        rows: int,
        ok: int,
    ) -> None:
        """One backend call of ``model``: its requests' arrival times, when it started, how
        long it ran (s), its rows, and how many of its requests were answered ``ok``."""
        stats = self._model(model)
        queue = stats.queue
        for arrived in arrivals:
            queue.observe(started - arrived)
        stats.compute.observe(run_s)
        stats.batch_rows.observe(rows)
        key = (model, "infer", "ok")
        self.requests[key] = self.requests.get(key, 0) + ok

    def stream_end(
        self,
        model: str,
        outcome: str,
        *,
        arrived: float,
        first_token_at: float | None,
        last_token_at: float | None,
        tokens: int,
        prompt_tokens: int | None,
    ) -> None:
        """A generation stream's final answer went out (or its reader left): ``tokens`` sent;
        TTFT from arrival to the first token; inter-token latency as the stream's mean gap,
        counted once per gap (so ``_sum / _count`` is the true mean over all tokens)."""
        self.request(model, "generate", outcome)
        if not self._serves(model):
            return
        stats = self._model(model)
        stats.generated_tokens += tokens
        stats.prompt_tokens += prompt_tokens or 0
        if first_token_at is not None:
            stats.ttft.observe(first_token_at - arrived)
            if last_token_at is not None and tokens > 1:
                stats.itl.observe((last_token_at - first_token_at) / (tokens - 1), tokens - 1)


class _WorkerCollector(Collector):
    """Builds the worker's families at scrape time (on the HTTP server's thread): reads only,
    and copies each container before iterating it (the loop keeps writing)."""

    def __init__(self, worker: Any, metrics: WorkerMetrics) -> None:
        self.worker = worker
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        w, m = self.worker, self.metrics
        yield from _models(w)
        yield from _requests(m)
        yield from _queues(w)
        yield from _per_model_recorded(m)
        if w.streams is not None:
            yield from _streams(w.streams.counters.copy(), w.streams.active)
        yield from _speculative(w.verifier.counters.copy(), len(w.verifier), w.verifier.nbytes)
        yield from _engines(w)
        events = CounterMetricFamily(
            PREFIX + "events",
            "The worker's event counters (those of the ZeroMQ health reply: wire_errors, "
            "overloaded, replies_dropped, unauthorized, backend_errors, messages by kind...)",
            labels=["event"],
        )
        for event, n in sorted(w.counters.copy().items()):
            events.add_metric([event], n)
        yield events
        idle = w.loop_idle_s()
        if idle is not None:
            yield GaugeMetricFamily(
                PREFIX + "loop_idle_seconds",
                "Seconds since the worker loop's last turn (under 0.05 when healthy; over "
                "http.stall_s: /health answers 503 stalled)",
                value=idle,
            )


def _models(w: Any) -> Iterator[Metric]:
    ok, body = w.readiness()
    ok = ok and w.stalled() is None  # as /ready: not ready while the loop is stalled
    info = GaugeMetricFamily(
        PREFIX + "model_info",
        "A model this worker serves (always 1)",
        labels=["model", "version", "kind"],
    )
    ready = GaugeMetricFamily(
        PREFIX + "model_ready", "1 when the model is loaded and warmed up", labels=["model"]
    )
    for name, model in sorted(body.get("models", {}).items()):
        if model.get("version") is not None:  # served (not a model still loading)
            info.add_metric([name, str(model["version"]), str(model.get("kind", ""))], 1)
        ready.add_metric([name], 1 if model.get("ready") else 0)
    yield info
    yield ready
    yield GaugeMetricFamily(
        PREFIX + "ready",
        "1 when /ready answers 200 (serving, every served model loaded and warmed up)",
        value=int(ok),
    )


def _requests(m: WorkerMetrics) -> Iterator[Metric]:
    family = CounterMetricFamily(
        PREFIX + "requests",
        "Work requests answered, by model, kind (infer, experts, verify, generate) and outcome "
        "(ok, or the error code; generate also cancelled, peer_gone)",
        labels=["model", "kind", "outcome"],
    )
    for (model, kind, outcome), n in sorted(m.requests.copy().items()):
        family.add_metric([model, kind, outcome], n)
    yield family


def _queues(w: Any) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        PREFIX + "queue_requests", "Infer requests queued (admitted, not running)", labels=["model"]
    )
    nbytes = GaugeMetricFamily(
        PREFIX + "queue_bytes", "Bytes of the queued infer requests", labels=["model"]
    )
    for model, q in sorted(w.batcher.queues().items()):
        depth.add_metric([model], q[0])
        nbytes.add_metric([model], q[1])
    yield depth
    yield nbytes
    yield GaugeMetricFamily(
        PREFIX + "offloaded_requests",
        "Experts and verify requests running off the loop (on a model's thread or engine)",
        value=w.requests.inflight,
    )


def _histogram(name: str, doc: str) -> HistogramMetricFamily:
    return HistogramMetricFamily(PREFIX + name, doc, labels=["model"])


def _per_model_recorded(m: WorkerMetrics) -> Iterator[Metric]:
    queue = _histogram("queue_seconds", "Time an infer request waited in the queue (s)")
    compute = _histogram("compute_seconds", "Time of one backend call on a batch (s)")
    rows = _histogram("batch_rows", "Rows per backend call (a batch of one shape)")
    ttft = _histogram("time_to_first_token_seconds", "Stream arrival to its first token (s)")
    itl = _histogram(
        "inter_token_latency_seconds", "Time between tokens of a stream (s; its mean, per gap)"
    )
    prompt = CounterMetricFamily(
        PREFIX + "prompt_tokens", "Prompt tokens of generation streams", labels=["model"]
    )
    generated = CounterMetricFamily(
        PREFIX + "generation_tokens", "Tokens sent by generation streams", labels=["model"]
    )
    for model, s in sorted(m.models.copy().items()):
        for family, hist in (
            (queue, s.queue),
            (compute, s.compute),
            (rows, s.batch_rows),
            (ttft, s.ttft),
            (itl, s.itl),
        ):
            buckets, total = hist.cumulative()
            if buckets[-1][1]:
                family.add_metric([model], buckets, total)
        if s.prompt_tokens or s.generated_tokens:
            prompt.add_metric([model], s.prompt_tokens)
            generated.add_metric([model], s.generated_tokens)
    yield from (queue, compute, rows, ttft, itl, prompt, generated)


def _streams(counters: dict[str, int], active: int) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        PREFIX + "streams_active", "Generation streams in the table (running or finishing)", active
    )
    yield CounterMetricFamily(
        PREFIX + "streams_started", "Generation streams started", value=counters.get("started", 0)
    )
    ended = CounterMetricFamily(
        PREFIX + "streams_ended",
        "Generation streams ended, by reason (completed, cancelled, expired, stalled: reader "
        "took nothing, failed, peer_gone, shut_down)",
        labels=["reason"],
    )
    for reason in _STREAM_ENDS:
        ended.add_metric([reason], counters.get(reason, 0))
    yield ended
    yield CounterMetricFamily(
        PREFIX + "streams_refused",
        "Generation streams refused: generation.max_streams were running",
        value=counters.get("overloaded", 0),
    )


def _speculative(counters: dict[str, int], sessions: int, nbytes: int) -> Iterator[Metric]:
    c = counters.get
    yield GaugeMetricFamily(
        PREFIX + "speculative_sessions", "Speculative-verification sessions held", sessions
    )
    yield GaugeMetricFamily(
        PREFIX + "speculative_session_bytes", "KV-cache bytes the sessions hold", nbytes
    )
    for name, key, doc in (
        ("speculative_sessions_opened", "verify_sessions", "Sessions opened"),
        ("speculative_sessions_evicted", "verify_evicted", "Sessions evicted to make room"),
        ("speculative_sessions_expired", "verify_expired", "Sessions dropped after ttl_s idle"),
        ("speculative_sessions_yielded", "verify_yielded", "Sessions evicted for a stream"),
        ("speculative_sessions_lost", "verify_lost", "Rounds for a session no longer held"),
        ("speculative_rounds", "verify_rounds", "Verify rounds run"),
        ("speculative_draft_tokens", "verify_drafted", "Draft tokens received for verifying"),
        ("speculative_accepted_tokens", "verify_accepted", "Draft tokens accepted"),
    ):
        yield CounterMetricFamily(PREFIX + name, doc, value=c(key, 0))


def _engines(w: Any) -> Iterator[Metric]:
    steps = CounterMetricFamily(PREFIX + "engine_steps", "Engine steps run", labels=["model"])
    rows = CounterMetricFamily(
        PREFIX + "engine_rows", "Sequence rows stepped (decode and verify)", labels=["model"]
    )
    jobs = GaugeMetricFamily(
        PREFIX + "engine_jobs", "Streams and sessions on the engine", labels=["model"]
    )
    prefill = GaugeMetricFamily(
        PREFIX + "engine_queued_prefill_tokens", "Prompt tokens waiting to run", labels=["model"]
    )
    for name, engine in sorted(w.engines.items()):
        h = engine.health()
        steps.add_metric([name], h["steps"])
        rows.add_metric([name], engine.rows)
        jobs.add_metric([name], h["jobs"])
        prefill.add_metric([name], h["queued_prefill_tokens"])
    yield from (steps, rows, jobs, prefill)
