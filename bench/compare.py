"""Compare two ``tandem bench run`` results (schema tandem-bench/1), level by level.

A change is flagged only beyond run-to-run noise. For throughput and latencies the noise of a
level is the larger relative range (max - min over mean) of throughput and of p99 across its
reported windows, in A or in B, and at least ``noise_pct``; a change is larger/smaller - 1, so
halving and doubling count alike. Accuracy and escalation rate are shares of answers whose
noise is sampling, not timing: they are flagged when the difference is over three standard
errors of a difference of two proportions over the level's answers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tandem.bench.report import fmt_ms, is_num
from tandem.runtime.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console

SCHEMA = "tandem-bench/1"
TIERS = ("all", "edge", "cloud", "edge-degraded")
# Standard errors a share must move to be flagged (about 0.3% two-sided by chance).
SHARE_SIGMAS = 3.0

Flag = Literal["better", "worse", "", "warning"]


@dataclass(frozen=True)
class Row:
    """One compared metric of one level, or a warning (``flag == "warning"``, text in
    ``note``). ``ratio`` is B/A; ``noise_pct`` the change needed to flag (for shares, in
    percentage points)."""

    level: str | None
    metric: str
    unit: str = ""
    a: float | None = None
    b: float | None = None
    ratio: float | None = None
    noise_pct: float | None = None
    flag: Flag = ""
    note: str = ""


def load_results(path: Path) -> dict[str, Any]:
    """Read a results JSON file; :class:`ConfigError` when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read a tandem bench results file: {e}") from e
    check_results(data, str(path))
    return data


def check_results(data: Any, source: str = "results") -> None:
    """Raise :class:`ConfigError` unless ``data`` looks like a tandem-bench/1 results dict."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object with schema {SCHEMA!r}")
    schema = data.get("schema")
    if schema != SCHEMA:
        hint = " (a per-benchmark JSON from bench/*.py?)" if "benchmark" in data else ""
        raise ConfigError(
            f"{source}: not a tandem bench results file: schema is {schema!r}, "
            f"expected {SCHEMA!r}{hint}; write one with `tandem bench run scenario.yaml`"
        )
    if not isinstance(data.get("levels"), list):
        raise ConfigError(f"{source}: 'levels' must be a list")


def compare(a: dict[str, Any], b: dict[str, Any], noise_pct: float = 10.0) -> list[Row]:
    """Rows comparing B against A: warnings first, then each level present in both."""
    check_results(a, "A")
    check_results(b, "B")
    rows = _warnings(a, b)
    levels_b = {str(lv.get("label")): lv for lv in b["levels"]}
    pairs = [
        (str(lv.get("label")), lv, levels_b[str(lv.get("label"))])
        for lv in a["levels"]
        if str(lv.get("label")) in levels_b
    ]
    if not pairs and len(a["levels"]) == len(b["levels"]):
        # e.g. one scenario over two links: no label in common, the same levels in order
        rows.append(_warn(None, "no level labels in common: levels compared in order"))
        pairs = [
            (f"{la.get('label')} → {lb.get('label')}", la, lb)
            for la, lb in zip(a["levels"], b["levels"], strict=True)
        ]
    for label, la, lb in pairs:
        rows += _compare_level(label, la, lb, noise_pct)
    return rows


def print_compare(rows: list[Row], console: Console) -> None:
    """Warnings, then a table per level: A, B, B/A, the noise band and the flag."""
    from rich.table import Table

    for row in rows:
        if row.flag == "warning":
            console.print(f"[yellow]warning:[/yellow] {_escape(row.note)}")
    table = Table(title="tandem bench compare (B against A)", title_justify="left")
    for name, justify in (
        ("level", "left"),
        ("metric", "left"),
        ("A", "right"),
        ("B", "right"),
        ("B/A", "right"),
        ("noise", "right"),
        ("", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    last = None
    for row in rows:
        if row.flag == "warning":
            continue
        if last is not None and row.level != last:
            table.add_section()
        style = {"better": "green", "worse": "bold red"}.get(row.flag, "")
        table.add_row(
            _escape(row.level or "") if row.level != last else "",
            _escape(row.metric),
            _value(row.a, row.unit),
            _value(row.b, row.unit),
            "–" if row.ratio is None else f"{row.ratio:.2f}",
            _noise(row),
            f"[{style}]{row.flag}[/{style}]" if style else _escape(row.note),
        )
        last = row.level
    console.print(table)


# -- levels --------------------------------------------------------------------------------


def _warnings(a: dict[str, Any], b: dict[str, Any]) -> list[Row]:
    out = []
    ma, mb = a.get("machine") or {}, b.get("machine") or {}
    if (ma.get("cpu"), ma.get("cores")) != (mb.get("cpu"), mb.get("cores")):
        out.append(_warn(None, f"machines differ: A {_machine(ma)}; B {_machine(mb)}"))
    sa, sb = a.get("scenario") or {}, b.get("scenario") or {}
    if sa.get("name") != sb.get("name"):
        out.append(_warn(None, f"scenarios differ: A {sa.get('name')!r}, B {sb.get('name')!r}"))
    elif sa.get("raw") != sb.get("raw"):
        out.append(_warn(None, f"scenarios differ: {sa.get('name')!r} has other settings in B"))
    labels_a = [str(lv.get("label")) for lv in a["levels"]]
    labels_b = [str(lv.get("label")) for lv in b["levels"]]
    out += [_warn(x, f"level {x!r} only in A") for x in labels_a if x not in labels_b]
    out += [_warn(x, f"level {x!r} only in B") for x in labels_b if x not in labels_a]
    return out


def _compare_level(label: str, la: dict[str, Any], lb: dict[str, Any], floor: float) -> list[Row]:
    noise = max(floor, _window_spread_pct(la), _window_spread_pct(lb))
    n = (la.get("requests"), lb.get("requests"))
    rows = [
        _timed(label, "throughput", "/s", la.get("throughput"), lb.get("throughput"), noise, True),
        _share(
            label,
            "escalation rate",
            la.get("escalation_rate"),
            lb.get("escalation_rate"),
            n,
            higher_is_better=False,
        ),
        _share(label, "accuracy", la.get("accuracy"), lb.get("accuracy"), n, higher_is_better=True),
    ]
    ta, tb = la.get("tiers") or {}, lb.get("tiers") or {}
    stats = {"all": (la.get("all"), lb.get("all"))}
    names = [t for t in TIERS[1:] if t in ta or t in tb]
    names += sorted(t for t in {*ta, *tb} if t not in TIERS)
    stats.update({t: (ta.get(t), tb.get(t)) for t in names})
    for tier, (sa, sb) in stats.items():
        if sa is None and sb is None:
            continue
        note = "" if sa and sb else f"tier only in {'A' if sa else 'B'}"
        for q in ("p50", "p95", "p99"):
            rows.append(
                _timed(label, f"{tier} {q}", "ms", _lat(sa, q), _lat(sb, q), noise, False, note)
            )
    llm_a, llm_b = la.get("llm"), lb.get("llm")
    if llm_a or llm_b:
        note = "" if llm_a and llm_b else f"llm only in {'A' if llm_a else 'B'}"
        for key, name in (("ttft_ms", "ttft"), ("itl_ms", "itl")):
            for q in ("p50", "p95"):
                va = ((llm_a or {}).get(key) or {}).get(q)
                vb = ((llm_b or {}).get(key) or {}).get(q)
                rows.append(_timed(label, f"llm {name} {q}", "ms", va, vb, noise, False, note))
        va, vb = (llm_a or {}).get("tokens_per_s"), (llm_b or {}).get("tokens_per_s")
        rows.append(_timed(label, "llm tokens/s", "/s", va, vb, noise, True, note))
    return rows


def _window_spread_pct(level: dict[str, Any]) -> float:
    """Largest relative range (%) of throughput and of p99 over the level's reported windows."""
    windows = level.get("windows") or []
    used = [windows[i] for i in level.get("used_windows") or [] if 0 <= i < len(windows)]
    spread = 0.0
    for key in ("throughput", "p99_ms"):
        values = [w.get(key) for w in used]
        values = [v for v in values if is_num(v)]
        if len(values) >= 2 and sum(values) > 0:
            spread = max(spread, (max(values) - min(values)) / (sum(values) / len(values)))
    return spread * 100


def _timed(
    level: str,
    metric: str,
    unit: str,
    a: Any,
    b: Any,
    noise: float,
    higher_is_better: bool,
    note: str = "",
) -> Row:
    a, b = (a if is_num(a) else None), (b if is_num(b) else None)
    ratio = b / a if a is not None and b is not None and a > 0 else None
    flag: Flag = ""
    if ratio is not None and ratio > 0:
        change = (max(ratio, 1 / ratio) - 1) * 100
        if change > noise:
            flag = "better" if (ratio > 1) == higher_is_better else "worse"
    return Row(level, metric, unit, a, b, ratio, noise, flag, note)


def _share(
    level: str, metric: str, a: Any, b: Any, n: tuple[Any, Any], higher_is_better: bool
) -> Row:
    a, b = (a if is_num(a) else None), (b if is_num(b) else None)
    ratio = b / a if a is not None and b is not None and a > 0 else None
    if a is None or b is None:
        return Row(level, metric, "%", a, b, ratio)
    na, nb = (max(1, int(x)) if is_num(x) else 1 for x in n)
    se = math.sqrt(a * (1 - a) / na + b * (1 - b) / nb)
    band = max(SHARE_SIGMAS * se, 1e-9)
    flag: Flag = ""
    if abs(b - a) > band:
        flag = "better" if (b > a) == higher_is_better else "worse"
    return Row(level, metric, "%", a, b, ratio, band * 100, flag)


# -- formatting ----------------------------------------------------------------------------


def _warn(level: str | None, note: str) -> Row:
    return Row(level, "", flag="warning", note=note)


def _lat(stats: dict[str, Any] | None, q: str) -> Any:
    return ((stats or {}).get("latency_ms") or {}).get(q)


def _machine(m: dict[str, Any]) -> str:
    return f"{m.get('cpu') or 'unknown cpu'}, {m.get('cores') or '?'} cores"


def _value(v: float | None, unit: str) -> str:
    if v is None:
        return "–"
    if unit == "%":
        return f"{v * 100:.1f}%"
    if unit == "ms":
        return f"{fmt_ms(v)} ms"
    return f"{v:,.0f}{unit}" if abs(v) >= 100 else f"{v:.1f}{unit}"


def _noise(row: Row) -> str:
    if row.noise_pct is None:
        return "–"
    if row.unit == "%":
        return f"±{row.noise_pct:.1f} pp"
    return f"±{row.noise_pct:.0f}%"


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
