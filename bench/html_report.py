"""One self-contained HTML page for a ``tandem bench run`` results dict (schema tandem-bench/1).

Plots are embedded as ``data:`` URIs and the CSS is inline: the file can be mailed or attached
to an issue and opens offline. No JavaScript. Every string taken from the results is escaped
(the scenario description is user text).
"""

from __future__ import annotations

import base64
import math
import struct
from html import escape
from pathlib import Path
from typing import Any

from tandem.bench.plots import DPI as PLOT_DPI
from tandem.bench.plots import fmt_ms as _ms

TIERS = ("edge", "cloud", "edge-degraded")
PLOT_CAPTIONS = {
    "accuracy_escalation": "Accuracy against escalation rate over the confidence-threshold "
    "sweep (colour: p95 latency). The line is the Pareto front; the ring is the policy's "
    "current threshold, the star the threshold chosen for the target.",
    "latency_cdf": "Latency CDF per tier (log scale); dots mark p50 and p99.",
    "latency_vs_rtt": "p50 (solid) and p95 (dashed) per tier against the added network round trip.",
    "throughput_vs_p99": "p99 latency against throughput as the load grows; the ring marks the "
    "knee, the last point before p99 grows faster than throughput.",
}
PLOT_ORDER = ("accuracy_escalation", "latency_cdf", "latency_vs_rtt", "throughput_vs_p99")
SPLIT_STAGES = ("local", "gate", "network", "cloud_queue", "cloud_compute")

CSS = """
:root { --fg: #1f2328; --muted: #656d76; --line: #d8dee4; --zebra: #f6f8fa; --accent: #3a6ea5;
        --ok: #1a7f37; --bad: #cf222e; --warn-bg: #fff1f0; --ok-bg: #e6f4ea; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.45;
       font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 32px 60px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 8px; }
.sub { color: var(--muted); margin: 0 0 16px; }
.desc { white-space: pre-wrap; background: var(--zebra); border-left: 3px solid var(--accent);
        padding: 10px 14px; margin: 12px 0 18px; border-radius: 0 4px 4px 0; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 3px 18px; margin: 0; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; }
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 13.5px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: right;
         white-space: nowrap; }
th { background: var(--zebra); font-weight: 600; border-bottom: 2px solid var(--line); }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
td { font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fbfcfd; }
tr.total td { font-weight: 600; border-top: 2px solid var(--line); }
tr.unused td { color: #9aa1a9; }
tr.pareto td:first-child { font-weight: 600; }
tr.chosen { background: #fff4d6 !important; }
.scroll { overflow-x: auto; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12.5px;
         font-weight: 600; vertical-align: 1px; }
.badge.ok { background: var(--ok-bg); color: var(--ok); }
.badge.bad { background: var(--warn-bg); color: var(--bad); border: 1px solid #ffb3ad; }
.level { border: 1px solid var(--line); border-radius: 6px; padding: 4px 18px 8px; margin: 16px 0; }
.level.unstable { border-color: #ffb3ad; }
.facts { color: var(--muted); font-size: 13.5px; margin: 0 0 6px; }
.facts b { color: var(--fg); font-weight: 600; }
.cols { display: flex; flex-wrap: wrap; gap: 0 36px; align-items: flex-start; }
figure { margin: 18px 0 28px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13.5px; margin-top: 6px; max-width: 900px; }
.muted { color: var(--muted); }
.callout { background: var(--warn-bg); border: 1px solid #ffb3ad; border-radius: 6px;
           padding: 8px 14px; color: #82071e; font-size: 14px; }
.mark { font-weight: 600; }
.mark.chosen { color: #b26b00; }
.mark.pareto { color: var(--accent); }
footer { margin-top: 40px; color: var(--muted); font-size: 12.5px; }
"""


def write_html(results: dict[str, Any], pngs: dict[str, Path], path: Path) -> Path:
    """Write the report to ``path`` (parents made) and return it. ``pngs`` maps plot names
    (as :func:`tandem.bench.plots.write_plots` returns them) to PNG files to embed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(results, pngs), encoding="utf-8")
    return path


def render_html(results: dict[str, Any], pngs: dict[str, Path]) -> str:
    """The report as a string (see :func:`write_html`)."""
    scenario = results.get("scenario") or {}
    levels = results.get("levels") or []
    name = str(scenario.get("name") or "unnamed scenario")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>tandem bench: {_e(name)}</title>",
        f"<style>{CSS}</style></head><body><main>",
        f"<h1>tandem bench: {_e(name)}</h1>",
        f'<p class="sub">{_e(_subline(results))}</p>',
    ]
    if scenario.get("description"):
        parts.append(f'<div class="desc">{_e(scenario["description"])}</div>')
    parts.append(_machine(results))
    if levels:
        parts.append(_overview(levels))
    parts.append(_plots(pngs))
    if levels:
        parts.append("<h2>Levels</h2>")
        parts += [_level(i, lv) for i, lv in enumerate(levels)]
    if any(lv.get("llm") for lv in levels):
        parts.append(_llm(levels))
    if results.get("threshold_sweep"):
        parts.append(_threshold_sweep(results["threshold_sweep"]))
    if results.get("rtt_sweep"):
        parts.append(_rtt_sweep(results["rtt_sweep"], levels))
    if results.get("load_sweep"):
        parts.append(_load_sweep(results["load_sweep"]))
    parts.append(_packages(results))
    parts.append(
        f"<footer>schema {_e(results.get('schema'))} · generated by tandem bench</footer>"
        "</main></body></html>\n"
    )
    return "\n".join(parts)


# -- sections ------------------------------------------------------------------------------


def _subline(results: dict[str, Any]) -> str:
    s = results.get("scenario") or {}
    bits = [
        f"task {s['task']}" if s.get("task") else None,
        s.get("kind"),
        f"{s['load_mode']} loop" if s.get("load_mode") else None,
        f"started {results['started_at']}" if results.get("started_at") else None,
        f"{_num_text(results.get('duration_s'), '.0f')} s"
        if _num(results.get("duration_s"))
        else None,
        s.get("file"),
    ]
    return " · ".join(str(b) for b in bits if b)


def _machine(results: dict[str, Any]) -> str:
    m = results.get("machine") or {}
    pkgs = m.get("packages") or {}
    rows = [
        ("CPU", f"{m.get('cpu') or 'unknown'}, {m.get('cores') or '?'} cores"),
        ("GPU", m.get("gpu")),
        ("Python", m.get("python")),
        ("Platform", m.get("platform")),
        ("tandem-infer", pkgs.get("tandem-infer")),
        ("Git revision", m.get("git") or "unknown"),
    ]
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows if v)
    return f'<dl class="meta">{items}</dl>'


def _overview(levels: list[dict[str, Any]]) -> str:
    head = _head(
        [
            "level",
            "network",
            "load",
            "answers",
            "throughput /s",
            "escalated",
            "accuracy",
            "p50 ms",
            "p99 ms",
            "errors",
            "stability",
        ],
        left=3,
    )
    rows = []
    for lv in levels:
        lat = (lv.get("all") or {}).get("latency_ms") or {}
        rows.append(
            "<tr>"
            f"<td>{_e(lv.get('label'))}</td>"
            f'<td class="text">{_e(_network_text(lv.get("network")))}</td>'
            f'<td class="text">{_e(_load_text(lv.get("load")))}</td>'
            f"<td>{_int(lv.get('requests'))}</td>"
            f"<td>{_rate(lv.get('throughput'))}</td>"
            f"<td>{_pct(lv.get('escalation_rate'))}</td>"
            f"<td>{_pct(lv.get('accuracy'))}</td>"
            f"<td>{_ms(lat.get('p50'))}</td><td>{_ms(lat.get('p99'))}</td>"
            f"<td>{_int(sum((lv.get('errors') or {}).values()))}</td>"
            f"<td>{_stability_badge(lv)}</td>"
            "</tr>"
        )
    unstable = [str(lv.get("label")) for lv in levels if lv.get("stable") is False]
    note = ""
    if unstable:
        note = (
            '<p class="callout">⚠ Not stable: <b>'
            + _e(", ".join(unstable))
            + "</b>. Throughput or p99 kept moving between windows, so these figures average "
            "over a drifting system; rerun longer or on a quieter machine before comparing.</p>"
        )
    table = f"<table>{head}<tbody>{''.join(rows)}</tbody></table>"
    return f'<h2>Summary</h2><div class="scroll">{table}</div>{note}'


def _plots(pngs: dict[str, Path]) -> str:
    if not pngs:
        return ""
    names = [n for n in PLOT_ORDER if n in pngs] + sorted(n for n in pngs if n not in PLOT_ORDER)
    out = ["<h2>Plots</h2>"]
    for name in names:
        png = Path(pngs[name]).read_bytes()
        data = base64.b64encode(png).decode("ascii")
        caption = PLOT_CAPTIONS.get(name, name.replace("_", " "))
        size = _png_css_size(png)
        dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
        out.append(
            f'<figure><img alt="{_e(name)}"{dims} src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>"
        )
    return "\n".join(out)


def _png_css_size(png: bytes) -> tuple[int, int] | None:
    """CSS px of a PNG drawn at :data:`PLOT_DPI` (so figures keep their intended size)."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", png[16:24])
    return round(width * 96 / PLOT_DPI), round(height * 96 / PLOT_DPI)


def _level(index: int, lv: dict[str, Any]) -> str:
    stable = lv.get("stable") is not False
    out = [
        f'<section class="level{"" if stable else " unstable"}">',
        f"<h3>{index + 1}. {_e(lv.get('label'))} {_stability_badge(lv)}</h3>",
        f'<p class="facts">network <b>{_e(_network_text(lv.get("network"), full=True))}</b>'
        f" · load <b>{_e(_load_text(lv.get('load'), full=True))}</b>"
        f" · <b>{_int(lv.get('requests'))}</b> answers in <b>{_num_text(lv.get('duration_s'), '.1f')} s</b>"
        f" · <b>{_rate(lv.get('throughput'))}</b>/s"
        f" · escalated <b>{_pct(lv.get('escalation_rate'))}</b>"
        f" · accuracy <b>{_pct(lv.get('accuracy'))}</b></p>",
        _tier_table(lv),
        '<div class="cols">',
        _windows(lv),
        _split(lv.get("split_ms")),
        _errors(lv.get("errors") or {}),
        "</div></section>",
    ]
    return "\n".join(out)


def _tier_table(lv: dict[str, Any]) -> str:
    head = _head(
        [
            "tier",
            "answers",
            "share",
            "p50 ms",
            "p90 ms",
            "p95 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "throughput /s",
            "accuracy",
        ]
    )
    tiers = lv.get("tiers") or {}
    names = [t for t in TIERS if t in tiers] + sorted(t for t in tiers if t not in TIERS)
    rows = [_tier_row(t, tiers[t] or {}, "") for t in names]
    if lv.get("all"):
        rows.append(_tier_row("all", lv["all"], "total"))
    return f'<div class="scroll"><table>{head}<tbody>{"".join(rows)}</tbody></table></div>'


def _tier_row(name: str, s: dict[str, Any], cls: str) -> str:
    lat = s.get("latency_ms") or {}
    cells = "".join(
        f"<td>{_ms(lat.get(q))}</td>" for q in ("p50", "p90", "p95", "p99", "p99.9", "max")
    )
    return (
        f'<tr class="{cls}"><td>{_e(name)}</td><td>{_int(s.get("count"))}</td>'
        f"<td>{_pct(s.get('share'))}</td>{cells}<td>{_rate(s.get('throughput'))}</td>"
        f"<td>{_pct(s.get('accuracy'))}</td></tr>"
    )


def _windows(lv: dict[str, Any]) -> str:
    windows = lv.get("windows") or []
    if not windows:
        return '<div><h4>Stability</h4><p class="muted">no windows reported</p></div>'
    used = set(lv.get("used_windows") or [])
    rows = []
    for i, w in enumerate(windows):
        cls = "" if i in used else "unused"
        rows.append(
            f'<tr class="{cls}"><td>{i + 1}</td><td>{_num_text(w.get("t_s"), ".1f")}</td>'
            f"<td>{_int(w.get('n'))}</td><td>{_rate(w.get('throughput'))}</td>"
            f"<td>{_ms(w.get('p99_ms'))}</td><td>{'✓' if i in used else ''}</td></tr>"
        )
    head = _head(["window", "end s", "answers", "throughput /s", "p99 ms", "used"])
    note = f'<p class="muted" style="font-size:13px;margin:0">{_e(_stability_text(lv))}</p>'
    return f"<div><h4>Stability windows</h4>{note}<table>{head}<tbody>{''.join(rows)}</tbody></table></div>"


def _split(split: dict[str, Any] | None) -> str:
    if not split:
        return ""
    stages = [s for s in SPLIT_STAGES if s in split] + sorted(
        s for s in split if s not in SPLIT_STAGES
    )
    rows = "".join(
        f"<tr><td>{_e(s.replace('_', ' '))}</td>"
        + "".join(f"<td>{_ms((split[s] or {}).get(q))}</td>" for q in ("mean", "p50", "p99"))
        + "</tr>"
        for s in stages
    )
    head = _head(["stage", "mean ms", "p50 ms", "p99 ms"])
    return (
        "<div><h4>Escalation split</h4>"
        '<p class="muted" style="font-size:13px;margin:0">escalated answers that the cloud answered</p>'
        f"<table>{head}<tbody>{rows}</tbody></table></div>"
    )


def _errors(errors: dict[str, Any]) -> str:
    if not errors:
        return '<div><h4>Errors</h4><p class="muted">none</p></div>'
    rows = "".join(
        f"<tr><td>{_e(k)}</td><td>{_int(v)}</td></tr>"
        for k, v in sorted(errors.items(), key=lambda kv: -(kv[1] or 0))
    )
    return (
        f"<div><h4>Errors</h4><table>{_head(['type', 'count'])}<tbody>{rows}</tbody></table></div>"
    )


def _llm(levels: list[dict[str, Any]]) -> str:
    with_llm = [lv for lv in levels if lv.get("llm")]
    lat_rows, tok_rows = [], []
    for lv in with_llm:
        llm = lv["llm"]
        label = f"<td>{_e(lv.get('label'))}</td>"
        ttft, itl = llm.get("ttft_ms") or {}, llm.get("itl_ms") or {}
        cells = "".join(
            f"<td>{_ms(d.get(q))}</td>" for d in (ttft, itl) for q in ("p50", "p95", "p99", "max")
        )
        lat_rows.append(f"<tr>{label}{cells}</tr>")
        by_tier = llm.get("tokens_by_tier") or {}
        tier_cells = "".join(f"<td>{_int(by_tier.get(t))}</td>" for t in TIERS)
        tok_rows.append(
            f"<tr>{label}<td>{_rate(llm.get('tokens_per_s'))}</td>"
            f"<td>{_rate(llm.get('tokens_per_s_per_stream'))}</td>"
            f"<td>{_int(llm.get('output_tokens'))}</td>{tier_cells}"
            f"<td>{_int(llm.get('drafted'))}</td><td>{_int(llm.get('accepted'))}</td>"
            f"<td>{_pct(llm.get('acceptance'))}</td></tr>"
        )
    lat_head = _head(
        ["level"] + [f"{m} {q}" for m in ("TTFT", "ITL") for q in ("p50", "p95", "p99", "max")]
    )
    tok_head = _head(
        ["level", "tokens/s", "per stream", "output tokens"]
        + [f"by {t}" for t in TIERS]
        + ["drafted", "accepted", "acceptance"]
    )
    return (
        '<h2>LLM generation</h2><p class="muted">TTFT: time to first token, ITL: inter-token '
        "latency, both ms. tokens/s: output tokens per second over all streams; per stream: "
        "the mean of each answer's tokens over its time. Drafted and accepted: speculative "
        "tokens.</p>"
        f'<div class="scroll"><table>{lat_head}<tbody>{"".join(lat_rows)}</tbody></table></div>'
        f'<div class="scroll"><table>{tok_head}<tbody>{"".join(tok_rows)}</tbody></table></div>'
    )


def _threshold_sweep(sweep: dict[str, Any]) -> str:
    points = sweep.get("points") or []
    pareto = set(sweep.get("pareto") or [])
    chosen = sweep.get("chosen")
    current = sweep.get("current")
    current_i = None
    if _num(current) and points:
        current_i = min(
            range(len(points)), key=lambda i: abs((points[i].get("threshold") or 0) - current)
        )
    target = sweep.get("target") or {}
    if _num(target.get("accuracy")):
        target_text = f"accuracy ≥ {_pct(target['accuracy'])}"
    elif _num(target.get("escalation_rate")):
        target_text = f"escalation ≤ {_pct(target['escalation_rate'])}"
    else:
        target_text = "none"
    facts = [
        f"metric <b>{_e(sweep.get('metric'))}</b>",
        f"method <b>{_e(sweep.get('method'))}</b>",
        f"current threshold <b>{_num_text(current, 'g')}</b>",
        f"target <b>{_e(target_text)}</b>",
    ]
    if isinstance(chosen, int) and 0 <= chosen < len(points):
        facts.append(f"chosen <b>{_num_text(points[chosen].get('threshold'), 'g')}</b>")
    elif sweep.get("target"):
        facts.append('<span class="badge bad">no threshold meets the target</span>')
    for key, label in (("edge_only", "edge only"), ("cloud_only", "cloud only")):
        ref = sweep.get(key) or {}
        if ref:
            facts.append(
                f"{label}: <b>{_pct(ref.get('accuracy'))}</b>, p95 <b>{_ms(ref.get('p95_ms'))} ms</b>"
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
            f'<tr class="{" ".join(classes)}"><td>{_num_text(p.get("threshold"), "g")}</td>'
            f"<td>{_pct(p.get('accuracy'))}</td><td>{_pct(p.get('escalation_rate'))}</td>"
            f'<td>{_ms(p.get("p95_ms"))}</td><td class="text">{" ".join(marks)}</td></tr>'
        )
    head = _head(["threshold", "accuracy", "escalated", "p95 ms", ""])
    return (
        '<h2>Threshold sweep</h2><p class="facts">' + " · ".join(facts) + "</p>"
        '<p class="muted">Each item\'s edge and cloud outcome replayed at each threshold; p95 is '
        "the mixture of the first level's measured edge and cloud latencies at that escalation "
        "rate. "
        "● on the Pareto front (no other threshold is as accurate with fewer escalations and a "
        f"lower p95); ★ {_e(_chosen_rule(target))}; ◆ nearest the policy's current threshold.</p>"
        f"<table>{head}<tbody>{''.join(rows)}</tbody></table>"
    )


def _chosen_rule(target: dict[str, Any]) -> str:
    if _num(target.get("escalation_rate")):
        return "the most accurate threshold within the escalation target"
    return "the threshold meeting the target with the fewest escalations"


def _rtt_sweep(entries: list[dict[str, Any]], levels: list[dict[str, Any]]) -> str:
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
            f"<td>{_ms((e.get('p50_ms') or {}).get(t))} / {_ms((e.get('p95_ms') or {}).get(t))}</td>"
            for t in tiers
        )
        rows.append(
            f"<tr><td>{_e(e.get('profile'))}</td>"
            f'<td class="text">{_e(label) if label else "–"}</td>'
            f"<td>{_num_text(e.get('rtt_ms'), 'g')}</td>{cells}</tr>"
        )
    head = _head(cols, left=2)
    return f"<h2>RTT sweep</h2><table>{head}<tbody>{''.join(rows)}</tbody></table>"


def _load_sweep(sweep: dict[str, Any]) -> str:
    x = sweep.get("x") or ("rate" if sweep.get("mode") == "open" else "concurrency")
    knee = sweep.get("knee")
    rows = []
    for i, p in enumerate(sweep.get("points") or []):
        mark = '<span class="mark chosen">knee</span>' if i == knee else ""
        rows.append(
            f'<tr class="{"chosen" if i == knee else ""}"><td>{_num_text(p.get("x"), "g")}</td>'
            f"<td>{_rate(p.get('throughput'))}</td><td>{_ms(p.get('p99_ms'))}</td>"
            f'<td class="text">{mark}</td></tr>'
        )
    head = _head([str(x), "throughput /s", "p99 ms", ""])
    return f"<h2>Load sweep</h2><table>{head}<tbody>{''.join(rows)}</tbody></table>"


def _packages(results: dict[str, Any]) -> str:
    pkgs = (results.get("machine") or {}).get("packages") or {}
    if not pkgs:
        return ""
    rows = "".join(
        f'<tr><td>{_e(k)}</td><td class="text">{_e(v)}</td></tr>' for k, v in sorted(pkgs.items())
    )
    return f"<h2>Packages</h2><table>{_head(['package', 'version'], left=2)}<tbody>{rows}</tbody></table>"


# -- formatting ----------------------------------------------------------------------------


def _head(cols: list[str], left: int = 1) -> str:
    """A table head; the first ``left`` columns hold text and are left-aligned."""
    cells = "".join(
        f'<th class="text">{_e(c)}</th>' if i < left else f"<th>{_e(c)}</th>"
        for i, c in enumerate(cols)
    )
    return f"<thead><tr>{cells}</tr></thead>"


def _stability_badge(lv: dict[str, Any]) -> str:
    if lv.get("stable") is False:
        return '<span class="badge bad">⚠ not stable</span>'
    if lv.get("stable") is True:
        return '<span class="badge ok">stable</span>'
    return '<span class="muted">–</span>'


def _stability_text(lv: dict[str, Any]) -> str:
    pct = lv.get("stability_pct")
    rule = f"±{_num_text(pct, 'g')}%" if _num(pct) else "the rule"
    used = len(lv.get("used_windows") or [])
    if lv.get("stable") is False:
        return (
            f"not stable: windows never agreed within {rule}; all {used} measured windows reported"
        )
    return f"stable: the last {used} windows agree within {rule}"


def _network_text(net: dict[str, Any] | None, full: bool = False) -> str:
    if not net:
        return "–"
    text = str(net.get("profile") or "custom")
    if _num(net.get("rtt_ms")):
        text += f" (RTT {net['rtt_ms']:g} ms"
        if full and _num(net.get("jitter_ms")) and net["jitter_ms"]:
            text += f" ± {net['jitter_ms']:g}"
        text += ")"
    if full and net.get("bandwidth"):
        text += f", {net['bandwidth']}"
    if full and net.get("outages"):
        spans = ", ".join(f"{a:g}–{b:g} s" for a, b in net["outages"])
        text += f", outages {spans}"
    return text


def _load_text(load: dict[str, Any] | None, full: bool = False) -> str:
    if not load:
        return "–"
    if load.get("mode") == "open":
        text = f"open, {_num_text(load.get('rate'), 'g')}/s"
        if full and _num(load.get("achieved_rate")):
            text += f" (achieved {_rate(load['achieved_rate'])}/s)"
        return text
    return f"closed, concurrency {_num_text(load.get('concurrency'), 'g')}"


def _e(v: Any) -> str:
    return "" if v is None else escape(str(v))


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _num_text(v: Any, spec: str) -> str:
    return format(v, spec) if _num(v) else "–"


def _int(v: Any) -> str:
    return f"{int(v):,}" if _num(v) else "–"


def _pct(v: Any) -> str:
    return f"{v * 100:.1f}%" if _num(v) else "–"


def _rate(v: Any) -> str:
    if not _num(v):
        return "–"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
