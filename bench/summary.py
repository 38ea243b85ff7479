"""The terminal summary of a ``tandem bench`` results dict: a table per level, the escalated
request's split, the language metrics and the threshold sweep's answer."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tandem.bench.stats import PERCENTILES, SPLIT, TIERS


def _ms(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1%}"


def level_table(lv: dict[str, Any]) -> Table:
    stable = "stable" if lv["stable"] else "[bold red]NOT STABLE[/bold red]"
    n_used = len(lv["used_windows"])
    caption = (
        f"{stable} ({n_used} of {len(lv['windows'])} windows, ±{lv['stability_pct']:g}%) · "
        f"{lv['throughput']:.1f} answers/s · escalated {_pct(lv['escalation_rate'])} · "
        f"accuracy {_pct(lv['accuracy'])}"
    )
    if lv["load"]["mode"] == "open":
        caption += (
            f" · offered {lv['load']['rate']:g}/s, arrivals {lv['load']['achieved_rate']:.1f}/s"
        )
        lag = lv.get("send_lag_ms")
        if lag:
            caption += f" · sent late by p50 {_ms(lag['p50'])} / p99 {_ms(lag['p99'])} ms"
    if lv["errors"]:
        caption += " · errors " + escape(
            ", ".join(f"{k} {v}" for k, v in sorted(lv["errors"].items()))
        )
    t = Table(title=escape(str(lv["label"])), caption=caption, title_justify="left")
    for c in ("tier", "count", "share", *PERCENTILES, "max", "answers/s", "accuracy"):
        t.add_column(c, justify="left" if c == "tier" else "right")
    rows = [(k, lv["tiers"][k]) for k in TIERS if k in lv["tiers"]] + [("all", lv["all"])]
    for name, s in rows:
        lat = s["latency_ms"]
        t.add_row(
            name,
            str(s["count"]),
            _pct(s["share"]),
            *(_ms(lat[k]) for k in PERCENTILES),
            _ms(lat["max"]),
            f"{s['throughput']:.1f}",
            _pct(s["accuracy"]),
        )
    return t


def warnings(lv: dict[str, Any]) -> list[str]:
    """What in a level says the set-up, not the system, is what was measured."""
    out = []
    n = lv["all"]["count"]
    if not n and lv["errors"]:
        out.append("no answers at all: every request failed (see errors)")
    elif not n:
        out.append(
            f"no answers in the measured windows ({lv.get('warmup_answers', 0)} in the warm-up): "
            "max_requests ran out first, or the warm-up overran because the tool's threads "
            "kept its timer from running (fewer clients, or a larger max_requests)"
        )
    elif lv["escalation_rate"] and "cloud" not in lv["tiers"]:
        out.append(
            "escalations happened but the cloud answered none: every one came back "
            "edge-degraded (is the link down, the deadline too short for it, or the worker "
            "refusing?)"
        )
    for kind, msg in lv.get("error_examples", {}).items():
        out.append(f"{kind}: {msg}")
    return out


def print_summary(results: dict[str, Any], console: Console) -> None:
    sc, m = results["scenario"], results["machine"]
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    console.print(
        f"[bold]{escape(str(sc['name']))}[/bold] — {escape(sc['description'] or sc['task'])} "
        f"[dim]({escape(str(m['cpu']))}, {m['cores']} cores{gpu}; latency ms)[/dim]",
        highlight=False,
    )
    for lv in results["levels"]:
        console.print(level_table(lv))
        for w in warnings(lv):
            console.print(f"  [yellow]warning:[/yellow] {escape(w)}", highlight=False)
        if lv["split_ms"]:
            parts = "  ".join(
                f"{k} {_ms(lv['split_ms'][k]['p50'])}" for k in SPLIT if k in lv["split_ms"]
            )
            console.print(f"  escalated request, p50 ms: {parts}", highlight=False)
        g = lv.get("llm")
        if g:
            acc = (
                ""
                if g["acceptance"] is None
                else (
                    f" · drafted {g['drafted']}, accepted {g['accepted']} ({g['acceptance']:.0%})"
                )
            )
            by = ", ".join(f"{k} {v}" for k, v in g["tokens_by_tier"].items())
            console.print(
                f"  TTFT p50 {_ms(g['ttft_ms']['p50'])} p99 {_ms(g['ttft_ms']['p99'])} · "
                f"inter-token p50 {_ms(g['itl_ms']['p50'])} p99 {_ms(g['itl_ms']['p99'])} · "
                f"{g['tokens_per_s']:.0f} tokens/s · tokens by tier: {by}{acc}",
                highlight=False,
            )
    sw = results.get("threshold_sweep")
    if sw:
        cur = min(sw["points"], key=lambda p: abs(p["threshold"] - sw["current"]))
        console.print(
            f"threshold sweep ({sw['metric']}, {sw['items']} items): edge only "
            f"{_pct(sw['edge_only']['accuracy'])}, cloud only {_pct(sw['cloud_only']['accuracy'])}; "
            f"the policy's {sw['current']:.3g}: accuracy {_pct(cur['accuracy'])} at "
            f"{_pct(cur['escalation_rate'])} escalated, p95 {_ms(cur['p95_ms'])} ms",
            highlight=False,
        )
        if sw["target"]:
            tgt = ", ".join(f"{k} {v:g}" for k, v in sw["target"].items())
            if sw["chosen"] is None:
                console.print(f"  no threshold meets the target ({tgt})", highlight=False)
            else:
                p = sw["points"][sw["chosen"]]
                console.print(
                    f"  target {tgt}: threshold {p['threshold']:.3g} → accuracy "
                    f"{_pct(p['accuracy'])}, {_pct(p['escalation_rate'])} escalated, "
                    f"p95 {_ms(p['p95_ms'])} ms",
                    highlight=False,
                )
    ls = results.get("load_sweep")
    if ls and ls["knee"] is not None:
        k = ls["points"][ls["knee"]]
        console.print(
            f"load knee: {ls['x']} {k['x']:g} ({k['throughput']:.1f} answers/s, p99 "
            f"{_ms(k['p99_ms'])} ms); past it p99 grows faster than throughput",
            highlight=False,
        )
