"""What ``tandem bench run`` derives from its levels: gate threshold → accuracy, escalation
rate and p95 (with the Pareto front and the threshold meeting a target); RTT → latency per
tier; load → throughput and p99, and the knee."""

from __future__ import annotations

from typing import Any

import numpy as np

from tandem.bench.load import LevelRun
from tandem.bench.scenario import Scenario
from tandem.bench.setup import Say, Setup, cloud_top1
from tandem.bench.stats import TIERS
from tandem.runtime.errors import TandemError


def _cdf(h: Any) -> tuple[np.ndarray, np.ndarray]:
    """(values ms, cumulative fraction) of an HDR histogram's recorded values."""
    n = 0 if h is None else h.get_total_count()
    if not n:
        return np.array([]), np.array([])
    # the iterator hands back one object, updated in place: read it as it goes
    steps = [(s.value_iterated_to, s.total_count_to_this_value) for s in h.get_recorded_iterator()]
    a = np.array(steps, float).reshape(-1, 2)
    return a[:, 0] / 1e3, a[:, 1] / n


def mixture_quantile(parts: list[tuple[float, Any]], q: float) -> float | None:
    """The ``q`` quantile of a mixture of HDR histograms with weights (weights sum to 1;
    a part with weight 0 may be empty or None). None when a weighted part has no data."""
    cdfs = [(w, *_cdf(h)) for w, h in parts if w > 0]
    if not cdfs or any(len(v) == 0 for _, v, _ in cdfs):
        return None
    grid = np.unique(np.concatenate([v for _, v, _ in cdfs]))
    total = np.zeros_like(grid)
    for w, v, c in cdfs:
        idx = np.searchsorted(v, grid, side="right") - 1
        total += w * np.where(idx >= 0, c[np.clip(idx, 0, None)], 0.0)
    k = int(np.searchsorted(total, q - 1e-12, side="left"))
    return float(grid[min(k, len(grid) - 1)])


def pareto(points: list[dict[str, Any]]) -> list[int]:
    """Indices of points no other point beats on all of: accuracy (higher), escalation rate
    and p95 (lower), being at least as good on each and better on one."""

    def key(p: dict[str, Any]) -> tuple[float, float, float]:
        p95 = p["p95_ms"] if p["p95_ms"] is not None else np.inf
        return (-p["accuracy"], p["escalation_rate"], p95)

    ks = [key(p) for p in points]
    front = []
    for i, a in enumerate(ks):
        dominated = any(all(bj <= aj for aj, bj in zip(a, b, strict=True)) and b != a for b in ks)
        if not dominated and a not in [ks[j] for j in front]:
            front.append(i)
    return front


def threshold_sweep(sc: Scenario, st: Setup, first: LevelRun, say: Say) -> dict[str, Any] | None:
    """Classifiers with labels: accuracy, escalation rate and p95 at every threshold."""
    from tandem.router.policy import policy_from_dict
    from tandem.router.routing import make_gate
    from tandem.runtime.backends.onnx import OnnxBackend

    spec = sc.sweep
    if spec.threshold is None:
        return None
    if st.items.kind != "classify" or st.items.y is None or st.cloud_model is None:
        say("threshold sweep skipped: it needs a classify task with labels and a cloud")
        return None
    tp = policy_from_dict(st.policy).tasks[st.task]
    n = min(spec.items, len(st.items))
    x, y = st.items.x[:n], st.items.y[:n]  # type: ignore[index]
    say(f"threshold sweep: {n} items through the edge model and the cloud")
    backend = OnnxBackend(tp.local.path, threads=tp.local.threads)
    logits = np.concatenate([backend.predict(x[i : i + 256]) for i in range(0, n, 256)])
    if tp.local.output == "probabilities":
        with np.errstate(divide="ignore"):
            logits = np.log(logits)
    metric = getattr(tp.gate, "metric", tp.gate.type)
    metric = getattr(metric, "value", metric)
    top1, scores = make_gate(tp.gate).evaluate_batch(logits)  # the live gate's scores
    edge_ok = top1 == y
    try:
        cloud_ok = cloud_top1(st.endpoints, st.curve, st.cloud_model, x) == y
    except TandemError as e:
        say(f"threshold sweep skipped: the cloud did not answer ({e.message})")
        return None
    if isinstance(spec.threshold, list):
        grid = sorted(set(spec.threshold))
    else:
        r = spec.threshold
        grid = list(np.linspace(r.start, r.stop, r.steps))
    grid = sorted(set(grid) | {tp.gate.threshold})
    h_edge, h_cloud = first.stats.lat.get("edge"), first.stats.lat.get("cloud")
    points = []
    for t in grid:
        gate = make_gate(tp.gate.model_copy(update={"threshold": t}))
        esc = np.array([not gate.accepts(v) for v in scores])
        e = float(esc.mean())
        p95 = mixture_quantile([(1 - e, h_edge), (e, h_cloud)], 0.95)
        points.append(
            {
                "threshold": float(t),
                "accuracy": float(np.where(esc, cloud_ok, edge_ok).mean()),
                "escalation_rate": e,
                "p95_ms": p95,
            }
        )
    chosen = None
    tgt = spec.target
    if tgt is not None:
        if tgt.accuracy is not None:
            ok = [i for i, p in enumerate(points) if p["accuracy"] >= tgt.accuracy]
            best = min(ok, key=lambda i: (points[i]["escalation_rate"], points[i]["threshold"]),
                       default=None)  # fmt: skip
        else:
            ok = [i for i, p in enumerate(points) if p["escalation_rate"] <= tgt.escalation_rate]
            best = max(ok, key=lambda i: (points[i]["accuracy"], -points[i]["threshold"]),
                       default=None)  # fmt: skip
        chosen = best

    return {
        "metric": metric,
        "method": "trace",
        "items": n,
        "current": float(tp.gate.threshold),
        "points": points,
        "pareto": pareto(points),
        "target": None if tgt is None else tgt.model_dump(exclude_none=True),
        "chosen": chosen,
        "edge_only": {
            "accuracy": float(edge_ok.mean()),
            "p95_ms": mixture_quantile([(1.0, h_edge)], 0.95),
        },
        "cloud_only": {
            "accuracy": float(cloud_ok.mean()),
            "p95_ms": mixture_quantile([(1.0, h_cloud)], 0.95),
        },
    }


def rtt_sweep(levels: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Latency per tier against the link's round trip: the first load point of each profile."""
    seen: dict[str, int] = {}
    for i, lv in enumerate(levels):
        seen.setdefault(lv["network"]["profile"], i)
    if len(seen) < 2:
        return None
    out = []
    for prof, i in seen.items():
        lv = levels[i]
        p = {k: None for k in (*TIERS, "all")}
        p50, p95 = dict(p), dict(p)
        for k, t in [*lv["tiers"].items(), ("all", lv["all"])]:
            p50[k], p95[k] = t["latency_ms"]["p50"], t["latency_ms"]["p95"]
        out.append({"profile": prof, "rtt_ms": lv["network"]["rtt_ms"], "level": i,
                    "p50_ms": p50, "p95_ms": p95})  # fmt: skip
    return sorted(out, key=lambda r: r["rtt_ms"])


def knee(points: list[dict[str, Any]]) -> int | None:
    """The last point before the system saturates: after it, throughput grows by under 5% or
    p99 grows faster than throughput does (relative)."""
    for i in range(1, len(points)):
        a, b = points[i - 1], points[i]
        if not a["throughput"] or a["p99_ms"] is None or b["p99_ms"] is None:
            continue
        gain = b["throughput"] / a["throughput"] - 1
        worse = b["p99_ms"] / a["p99_ms"] - 1
        if gain < 0.05 or worse > gain:
            return i - 1
    return None


def load_sweep(sc: Scenario, levels: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Throughput and p99 per load point, on the first network profile."""
    n = len(sc.load.points)
    if n < 2:
        return None
    key = "concurrency" if sc.load.mode == "closed" else "rate"
    pts = [
        {"x": float(lv["load"][key]), "level": i, "throughput": lv["throughput"],
         "p99_ms": lv["all"]["latency_ms"]["p99"]}
        for i, lv in enumerate(levels[:n])
    ]  # fmt: skip
    return {"mode": sc.load.mode, "x": key, "points": pts, "knee": knee(pts)}
