"""Results files of ``tandem bench``: JSON-safe values, how a value from them is written (the
terminal, the figures and the HTML page alike), and one measured level in the results schema
(``tandem-bench/1``; the machine comes from :func:`tandem.runtime.machine.machine`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram

from tandem.bench.load import LevelRun
from tandem.bench.stats import PERCENTILES, SPLIT, TIERS


def json_safe(obj: Any) -> Any:
    """JSON-safe: NaN and ±inf become None, numpy scalars Python ones."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


def is_num(v: Any) -> bool:
    """A finite number from a results file (not a bool, not null)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def fmt_ms(v: Any) -> str:
    """A latency in ms with sensible digits: 0.412, 3.21, 12.3, 145, 2,300; "–" for null."""
    if not is_num(v):
        return "–"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


# ---------------------------------------------------------------------- a level
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
