"""What ``tandem bench`` measures of each call, and how it adds up: an :class:`Outcome` per call,
:class:`Stats` over a span (one HDR histogram per tier and per split stage, counts, errors).

Latencies go into HDR histograms (``hdrhistogram``: 1 µs to 10 min, 3 significant digits), one
per tier; spans merge by adding histograms. How calls are driven and windows cut is
:mod:`tandem.bench.load`; the results schema is :mod:`tandem.bench.report`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

TIERS = ("edge", "cloud", "edge-degraded")
SPLIT = ("local", "gate", "network", "cloud_queue", "cloud_compute")
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p99.9": 99.9}
_HIGHEST_US = 600_000_000  # 10 min


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


def failed(e: Exception) -> Outcome:
    """The outcome of a call that raised ``e``: a failed request is a measurement, not a crash
    of the tool."""
    return Outcome(error=type(e).__name__, detail=str(e)[:300])
