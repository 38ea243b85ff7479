"""How values look in ``tandem bench``'s HTML report: its CSS, table heads, badges and cell
text. Every string taken from the results goes through :func:`esc`; a missing or non-finite
number is written "–"."""

from __future__ import annotations

from html import escape
from typing import Any

from tandem.bench.report import is_num

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


def table_head(cols: list[str], left: int = 1) -> str:
    """A table head; the first ``left`` columns hold text and are left-aligned."""
    cells = "".join(
        f'<th class="text">{esc(c)}</th>' if i < left else f"<th>{esc(c)}</th>"
        for i, c in enumerate(cols)
    )
    return f"<thead><tr>{cells}</tr></thead>"


def stability_badge(lv: dict[str, Any]) -> str:
    if lv.get("stable") is False:
        return '<span class="badge bad">⚠ not stable</span>'
    if lv.get("stable") is True:
        return '<span class="badge ok">stable</span>'
    return '<span class="muted">–</span>'


def stability_text(lv: dict[str, Any]) -> str:
    within = lv.get("stability_pct")
    rule = f"±{num_text(within, 'g')}%" if is_num(within) else "the rule"
    used = len(lv.get("used_windows") or [])
    if lv.get("stable") is False:
        return (
            f"not stable: windows never agreed within {rule}; all {used} measured windows reported"
        )
    return f"stable: the last {used} windows agree within {rule}"


def network_text(net: dict[str, Any] | None, full: bool = False) -> str:
    if not net:
        return "–"
    text = str(net.get("profile") or "custom")
    if is_num(net.get("rtt_ms")):
        text += f" (RTT {net['rtt_ms']:g} ms"
        if full and is_num(net.get("jitter_ms")) and net["jitter_ms"]:
            text += f" ± {net['jitter_ms']:g}"
        text += ")"
    if full and net.get("bandwidth"):
        text += f", {net['bandwidth']}"
    if full and net.get("outages"):
        spans = ", ".join(f"{a:g}–{b:g} s" for a, b in net["outages"])
        text += f", outages {spans}"
    return text


def load_text(load: dict[str, Any] | None, full: bool = False) -> str:
    if not load:
        return "–"
    if load.get("mode") == "open":
        text = f"open, {num_text(load.get('rate'), 'g')}/s"
        if full and is_num(load.get("achieved_rate")):
            text += f" (achieved {rate_text(load['achieved_rate'])}/s)"
        return text
    return f"closed, concurrency {num_text(load.get('concurrency'), 'g')}"


def esc(v: Any) -> str:
    return "" if v is None else escape(str(v))


def num_text(v: Any, spec: str) -> str:
    return format(v, spec) if is_num(v) else "–"


def int_text(v: Any) -> str:
    return f"{int(v):,}" if is_num(v) else "–"


def pct_text(v: Any) -> str:
    return f"{v * 100:.1f}%" if is_num(v) else "–"


def rate_text(v: Any) -> str:
    if not is_num(v):
        return "–"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
