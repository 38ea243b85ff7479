"""The sweep sections of ``tandem bench``'s HTML report: what :mod:`tandem.bench.sweeps` derived
from the measured levels — the threshold sweep (accuracy, escalation and p95 at each gate
threshold, its Pareto front and the chosen threshold), the RTT sweep and the load sweep."""

from __future__ import annotations

from typing import Any

from tandem.bench.html_format import (
    esc,
    num_text,
    pct_text,
    rate_text,
    table_head,
)
from tandem.bench.report import fmt_ms, is_num
from tandem.bench.stats import TIERS


def threshold_sweep_html(sweep: dict[str, Any]) -> str:
    points = sweep.get("points") or []
    pareto = set(sweep.get("pareto") or [])
    chosen = sweep.get("chosen")
    current = sweep.get("current")
    current_i = None
    if is_num(current) and points:
        current_i = min(
            range(len(points)), key=lambda i: abs((points[i].get("threshold") or 0) - current)
        )
    target = sweep.get("target") or {}
    if is_num(target.get("accuracy")):
        target_text = f"accuracy ≥ {pct_text(target['accuracy'])}"
    elif is_num(target.get("escalation_rate")):
        target_text = f"escalation ≤ {pct_text(target['escalation_rate'])}"
    else:
        target_text = "none"
    facts = [
        f"metric <b>{esc(sweep.get('metric'))}</b>",
        f"method <b>{esc(sweep.get('method'))}</b>",
        f"current threshold <b>{num_text(current, 'g')}</b>",
        f"target <b>{esc(target_text)}</b>",
    ]
    if isinstance(chosen, int) and 0 <= chosen < len(points):
        facts.append(f"chosen <b>{num_text(points[chosen].get('threshold'), 'g')}</b>")
    elif sweep.get("target"):
        facts.append('<span class="badge bad">no threshold meets the target</span>')
    for key, label in (("edge_only", "edge only"), ("cloud_only", "cloud only")):
        ref = sweep.get(key) or {}
        if ref:
            facts.append(
                f"{label}: <b>{pct_text(ref.get('accuracy'))}</b>, p95 <b>{fmt_ms(ref.get('p95_ms'))} ms</b>"
            )
    rows = []
    for i, p in enumerate(points):
        classes = [
            c
            for c, on in (
                ("pareto", i in pareto),
                ("chosen", i == chosen),
                ("current", i == current_i),
            )
            if on
        ]
        marks = []
        if i == chosen:
            marks.append('<span class="mark chosen">★ chosen</span>')
        if i in pareto:
            marks.append('<span class="mark pareto">● Pareto</span>')
        if i == current_i:
            marks.append('<span class="mark">◆ current</span>')
        rows.append(
            f'<tr class="{" ".join(classes)}"><td>{num_text(p.get("threshold"), "g")}</td>'
            f"<td>{pct_text(p.get('accuracy'))}</td><td>{pct_text(p.get('escalation_rate'))}</td>"
            f'<td>{fmt_ms(p.get("p95_ms"))}</td><td class="text">{" ".join(marks)}</td></tr>'
        )
    head = table_head(["threshold", "accuracy", "escalated", "p95 ms", ""])
    return (
        '<h2>Threshold sweep</h2><p class="facts">' + " · ".join(facts) + "</p>"
        '<p class="muted">Each item\'s edge and cloud outcome replayed at each threshold; p95 is '
        "the mixture of the first level's measured edge and cloud latencies at that escalation "
        "rate. "
        "● on the Pareto front (no other threshold is as accurate with fewer escalations and a "
        f"lower p95); ★ {esc(_chosen_rule(target))}; ◆ nearest the policy's current threshold.</p>"
        f"<table>{head}<tbody>{''.join(rows)}</tbody></table>"
    )


def _chosen_rule(target: dict[str, Any]) -> str:
    if is_num(target.get("escalation_rate")):
        return "the most accurate threshold within the escalation target"
    return "the threshold meeting the target with the fewest escalations"


def rtt_sweep_html(entries: list[dict[str, Any]], levels: list[dict[str, Any]]) -> str:
    tiers = [
        t
        for t in (*TIERS, "all")
        if any((e.get(q) or {}).get(t) is not None for e in entries for q in ("p50_ms", "p95_ms"))
    ]
    cols = ["profile", "level", "RTT ms"] + [f"{t} p50 / p95 ms" for t in tiers]
    rows = []
    for e in sorted(entries, key=lambda e: e.get("rtt_ms") or 0):
        li = e.get("level")
        label = levels[li].get("label") if isinstance(li, int) and 0 <= li < len(levels) else None
        cells = "".join(
            f"<td>{fmt_ms((e.get('p50_ms') or {}).get(t))} / {fmt_ms((e.get('p95_ms') or {}).get(t))}</td>"
            for t in tiers
        )
        rows.append(
            f"<tr><td>{esc(e.get('profile'))}</td>"
            f'<td class="text">{esc(label) if label else "–"}</td>'
            f"<td>{num_text(e.get('rtt_ms'), 'g')}</td>{cells}</tr>"
        )
    head = table_head(cols, left=2)
    return f"<h2>RTT sweep</h2><table>{head}<tbody>{''.join(rows)}</tbody></table>"


def load_sweep_html(sweep: dict[str, Any]) -> str:
    x = sweep.get("x") or ("rate" if sweep.get("mode") == "open" else "concurrency")
    knee = sweep.get("knee")
    rows = []
    for i, p in enumerate(sweep.get("points") or []):
        mark = '<span class="mark chosen">knee</span>' if i == knee else ""
        rows.append(
            f'<tr class="{"chosen" if i == knee else ""}"><td>{num_text(p.get("x"), "g")}</td>'
            f"<td>{rate_text(p.get('throughput'))}</td><td>{fmt_ms(p.get('p99_ms'))}</td>"
            f'<td class="text">{mark}</td></tr>'
        )
    head = table_head([str(x), "throughput /s", "p99 ms", ""])
    return f"<h2>Load sweep</h2><table>{head}<tbody>{''.join(rows)}</tbody></table>"
