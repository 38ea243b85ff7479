"""PNG figures of a ``tandem bench run`` results dict (schema ``tandem-bench/1``): what each
figure shows. How they look and where their labels go is :mod:`tandem.bench.plot_layout`.
(Over 500 lines: one short function per figure, read one at a time; splitting them further
would only scatter the list of figures.)

matplotlib is imported inside the functions, so the CLI starts without it, and only through
``matplotlib.figure.Figure`` with an Agg canvas: no pyplot, no backend switch, no rcParams
changes, so figures can be drawn from any thread. Latencies are ms, rates per second.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem.bench.plot_layout import (
    ACCENT,
    DPI,
    LABEL_SIZE,
    SMALL,
    TIER_COLORS,
    label_box,
    line_label,
    log_ticks,
    new_figure,
    place_label,
    points_px,
    polyline_px,
    set_titles,
    style_axes,
    tex_safe,
)
from tandem.bench.report import fmt_ms, is_num
from tandem.bench.stats import TIERS

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.transforms import Bbox

# Up to this many levels the CDF figure has one panel per level; beyond, the first level only.
MAX_CDF_PANELS = 4


def write_plots(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write each figure whose data exists to ``out_dir`` and return ``{name: path}``.

    Names: ``latency_cdf``, ``accuracy_escalation``, ``latency_vs_rtt``, ``throughput_vs_p99``
    (file ``<name>.png``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawers: dict[str, Callable[[dict[str, Any]], Figure | None]] = {
        "latency_cdf": latency_cdf,
        "accuracy_escalation": accuracy_escalation,
        "latency_vs_rtt": latency_vs_rtt,
        "throughput_vs_p99": throughput_vs_p99,
    }
    written: dict[str, Path] = {}
    for name, draw in drawers.items():
        fig = draw(results)
        if fig is None:
            continue
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=DPI, facecolor="white")
        written[name] = path
    return written


def latency_cdf(results: dict[str, Any]) -> Figure | None:
    """Latency CDF per tier (and all answers), log-scale ms; a panel per level up to
    :data:`MAX_CDF_PANELS` levels, else the first level only. None without CDF data."""
    levels = [lv for lv in results.get("levels") or [] if _cdf_series(lv)]
    if not levels:
        return None
    shown = levels if len(levels) <= MAX_CDF_PANELS else levels[:1]
    n = len(shown)
    nrows, ncols = (1, n) if n <= 2 else (2, 2)
    fig, body = new_figure(8.6 if n == 1 else 5.9 * ncols, 5.8 if n == 1 else 6.2 * nrows)
    axes = body.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    all_x: list[float] = []
    for ax, level in zip(axes, shown, strict=False):
        for tier, stats in _cdf_series(level):
            xs, ys = _cdf_xy(stats)
            all_x += xs
            lat = stats.get("latency_ms") or {}
            color = TIER_COLORS.get(tier, "#777777")
            ax.plot(
                xs,
                ys,
                color=color,
                lw=2.4 if tier == "all" else 1.9,
                ls=(0, (4, 1.6)) if tier == "all" else "-",
                label=(
                    f"{tex_safe(tier)}  p50 {fmt_ms(lat.get('p50'))} · p99 {fmt_ms(lat.get('p99'))} ms"
                    f"  (n={stats.get('count', 0):,})"
                ),
                zorder=3,
            )
            for q, y in (("p50", 0.5), ("p99", 0.99)):
                if is_num(lat.get(q)) and lat[q] > 0:
                    ax.plot(lat[q], y, "o", ms=5, color=color, mec="white", mew=0.9, zorder=4)
        for y, name in ((0.5, "p50"), (0.99, "p99")):
            ax.axhline(y, color="0.55", lw=0.8, ls=":", zorder=1)
            ax.text(
                0.006,
                y - 0.012,
                name,
                transform=ax.get_yaxis_transform(),
                va="top",
                fontsize=SMALL - 0.5,
                color="0.4",
            )
        ax.set_title(_level_title(level), fontsize=LABEL_SIZE, loc="left")
        if level.get("stable") is False:
            ax.set_title(
                "not stable", fontsize=LABEL_SIZE, loc="right", color=ACCENT, weight="bold"
            )
        ax.legend(
            loc="upper center",
            bbox_to_anchor=(0.5, -0.13),
            ncol=2 if n == 1 else 1,
            fontsize=SMALL,
            frameon=False,
            handlelength=2.6,
            columnspacing=1.6,
        )
        style_axes(ax)
    for ax in axes[n:]:
        ax.set_visible(False)
    axes[0].set_xscale("log")
    if all_x:
        axes[0].set_xlim(min(all_x) / 1.3, max(all_x) * 1.3)
    axes[0].set_ylim(0, 1.02)
    if all_x:
        log_ticks(axes[0].xaxis, min(all_x), max(all_x))
    for ax in axes[:n]:
        ax.set_xlabel("latency (ms, log scale)", fontsize=LABEL_SIZE)
        ax.set_ylabel("fraction of answers", fontsize=LABEL_SIZE)
        ax.tick_params(labelbottom=True, labelleft=True)
    what = "Latency CDF by tier"
    if len(levels) > n:
        what += f" (level 1 of {len(levels)})"
    set_titles(fig, body, results, what)
    return fig


def accuracy_escalation(results: dict[str, Any]) -> Figure | None:
    """Accuracy against escalation rate over the threshold sweep: points coloured by p95,
    the Pareto front, the current and chosen thresholds, target and single-tier references.
    None without a sweep."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    sweep = results.get("threshold_sweep") or {}
    raw = sweep.get("points") or []
    idx = [
        i
        for i, p in enumerate(raw)
        if is_num(p.get("accuracy"))
        and is_num(p.get("escalation_rate"))
        and is_num(p.get("threshold"))
    ]
    if not idx:
        return None
    x = {i: raw[i]["escalation_rate"] * 100 for i in idx}
    y = {i: raw[i]["accuracy"] * 100 for i in idx}
    fig, body = new_figure(9.6, 6.6)
    ax = body.subplots()

    pareto = sorted((i for i in sweep.get("pareto") or [] if i in x), key=lambda i: x[i])
    if len(pareto) > 1:
        ax.plot([x[i] for i in pareto], [y[i] for i in pareto], color="0.2", lw=1.6, zorder=2)
    colored = [i for i in idx if is_num(raw[i].get("p95_ms"))]
    if colored:
        sc = ax.scatter(
            [x[i] for i in colored],
            [y[i] for i in colored],
            c=[raw[i]["p95_ms"] for i in colored],
            cmap="viridis",
            s=[70 if i in pareto else 32 for i in colored],
            edgecolors=["0.15" if i in pareto else "white" for i in colored],
            linewidths=[1.1 if i in pareto else 0.6 for i in colored],
            zorder=3,
        )
        cb = body.colorbar(sc, ax=ax, pad=0.015, aspect=32)
        cb.set_label("p95 latency (ms)", fontsize=LABEL_SIZE)
        cb.ax.tick_params(labelsize=SMALL)
        cb.outline.set_visible(False)
    grey = [i for i in idx if i not in colored]
    if grey:
        ax.scatter([x[i] for i in grey], [y[i] for i in grey], color="0.7", s=32, zorder=3)

    ys = list(y.values())
    line_labels = []
    for key, tier, side in (("edge_only", "edge", "right"), ("cloud_only", "cloud", "left")):
        ref = sweep.get(key) or {}
        if not is_num(ref.get("accuracy")):
            continue
        acc = ref["accuracy"] * 100
        ys.append(acc)
        label = f"{tier} only: {acc:.1f}%"
        if is_num(ref.get("p95_ms")):
            label += f", p95 {fmt_ms(ref['p95_ms'])} ms"
        ax.axhline(acc, color=TIER_COLORS[tier], lw=1.3, ls=":", zorder=1)
        line_labels.append(
            line_label(ax, acc, label, TIER_COLORS[tier], side, above=side == "left")
        )
    target = sweep.get("target") or {}
    if is_num(target.get("accuracy")):
        t = target["accuracy"] * 100
        ys.append(t)
        ax.axhline(t, color=ACCENT, lw=1.3, ls="--", zorder=1)
        line_labels.append(
            line_label(ax, t, f"target: accuracy ≥ {t:.4g}%", ACCENT, "right", False)
        )
    if is_num(target.get("escalation_rate")):
        t = target["escalation_rate"] * 100
        ax.axvline(t, color=ACCENT, lw=1.3, ls="--", zorder=1)
        line_labels.append(
            ax.text(
                t,
                0.02,
                f" target: escalation ≤ {t:.4g}% ",
                transform=ax.get_xaxis_transform(),
                ha="right",
                va="bottom",
                rotation=90,
                fontsize=SMALL,
                color=ACCENT,
                bbox={"fc": "white", "ec": "none", "alpha": 0.85, "pad": 1.0},
                zorder=5,
            )
        )

    current_i = None
    if is_num(sweep.get("current")):
        current_i = min(idx, key=lambda i: abs(raw[i]["threshold"] - sweep["current"]))
    chosen_i = sweep.get("chosen") if sweep.get("chosen") in x else None
    if current_i is not None:
        ax.scatter(x[current_i], y[current_i], s=240, fc="none", ec="black", lw=1.6, zorder=4)
    if chosen_i is not None:
        ax.scatter(
            x[chosen_i], y[chosen_i], s=360, marker="*", color=ACCENT, ec="black", lw=0.9, zorder=5
        )

    xs = list(x.values())
    span = max(xs) - min(xs) or 10.0
    ax.set_xlim(
        max(0.0, min(xs) - 0.08 * span) if min(xs) > 0 else -0.04 * span, max(xs) + 0.08 * span
    )
    lo, hi = min(ys), max(ys)
    pad = (hi - lo) * 0.08 or 1.0
    ax.set_ylim(lo - pad, hi + pad)
    ax.xaxis.set_major_formatter(PercentFormatter(100, decimals=0))
    ax.yaxis.set_major_locator(MaxNLocator(steps=[1, 2, 5, 10]))  # whole or half points
    ax.yaxis.set_major_formatter(PercentFormatter(100, decimals=0 if hi - lo > 8 else 1))
    ax.set_xlabel("escalation rate (share of inputs sent to the cloud)", fontsize=LABEL_SIZE)
    ax.set_ylabel("accuracy", fontsize=LABEL_SIZE)
    handles = [
        Line2D([], [], color="0.2", lw=1.6, marker="o", mfc="#3b8f8c", mec="0.15", ms=8),
        Line2D([], [], ls="", marker="o", mfc="#5b8fb0", mec="white", ms=6.5),
    ]
    labels = ["Pareto front", "dominated threshold"]
    if current_i is not None:
        handles.append(Line2D([], [], ls="", marker="o", mfc="none", mec="black", ms=13, mew=1.6))
        labels.append("current threshold")
    if chosen_i is not None:
        handles.append(Line2D([], [], ls="", marker="*", color=ACCENT, mec="black", ms=15))
        labels.append("chosen for the target")
    body.legend(
        handles,
        labels,
        loc="outside lower center",
        ncol=len(handles),
        fontsize=SMALL + 0.5,
        frameon=False,
    )
    style_axes(ax)
    metric = sweep.get("metric") or "confidence"
    set_titles(
        fig, body, results, f"Accuracy vs escalation, {tex_safe(str(metric))} threshold sweep"
    )

    # Annotations last, once the layout is final, where they cover the least.
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    avoid = [t.get_window_extent(renderer) for t in line_labels]
    avoid += points_px(ax, [(x[i], y[i]) for i in idx], 9)
    avoid += polyline_px(ax, [(x[i], y[i]) for i in pareto], 6)
    box = {"boxstyle": "round,pad=0.4", "fc": "white", "ec": "0.55", "lw": 0.8}
    arrow = {"arrowstyle": "-|>", "color": "0.25", "lw": 1.0, "shrinkB": 10, "shrinkA": 2}
    placed: list[Bbox] = []
    if chosen_i is not None:
        head = "chosen = current" if chosen_i == current_i else "chosen"
        text = f"{head}: τ = {_thr(raw[chosen_i]['threshold'])}\n{_point_text(raw[chosen_i])}"
        ann = place_label(ax, renderer, text, (x[chosen_i], y[chosen_i]), avoid, box, arrow)
        placed.append(label_box(ann, renderer))
    if current_i is not None and current_i != chosen_i:
        text = f"current: τ = {_thr(sweep['current'])}\n{_point_text(raw[current_i])}"
        ann = place_label(
            ax, renderer, text, (x[current_i], y[current_i]), avoid, box, arrow, hard=placed
        )
    return fig


def latency_vs_rtt(results: dict[str, Any]) -> Figure | None:
    """p50 (solid) and p95 (dashed) per tier against the network round trip, one point per
    profile. None without an RTT sweep."""
    from matplotlib.lines import Line2D

    entries = [e for e in results.get("rtt_sweep") or [] if is_num(e.get("rtt_ms"))]
    if not entries:
        return None
    entries.sort(key=lambda e: e["rtt_ms"])
    rtts = [e["rtt_ms"] for e in entries]
    tiers = [
        t
        for t in (*TIERS, "all")
        if any(is_num((e.get(q) or {}).get(t)) for e in entries for q in ("p50_ms", "p95_ms"))
    ]
    if not tiers:
        return None
    fig, body = new_figure(9.2, 5.6)
    ax = body.subplots()
    values: list[float] = []
    for tier in tiers:
        color = TIER_COLORS.get(tier, "#777777")
        for q, ls, marker in (("p50_ms", "-", "o"), ("p95_ms", "--", "s")):
            ys = [(e.get(q) or {}).get(tier) for e in entries]
            ys = [v if is_num(v) else math.nan for v in ys]
            values += [v for v in ys if not math.isnan(v)]
            ax.plot(
                rtts,
                ys,
                ls=ls,
                marker=marker,
                color=color,
                lw=2.3 if tier == "all" else 1.8,
                ms=6,
                mfc=color if q == "p50_ms" else "white",
                mew=1.4,
                zorder=3,
            )
    positive = [r for r in rtts if r > 0]
    wide = len(set(rtts)) > 1 and bool(positive) and max(rtts) / min(positive) > 20
    if wide and min(rtts) > 0:
        ax.set_xscale("log")
        ax.set_xlim(min(rtts) / 1.6, max(rtts) * 1.6)
    elif wide:
        ax.set_xscale("symlog", linthresh=min(positive), linscale=0.7)
        ax.set_xlim(-0.15 * min(positive), max(rtts) * 1.6)
    else:
        span = max(rtts) - min(rtts) or max(rtts) or 1.0
        ax.set_xlim(min(rtts) - 0.06 * span, max(rtts) + 0.06 * span)
    ax.set_xticks(
        rtts, [f"{tex_safe(str(e.get('profile', '?')))}\n{e['rtt_ms']:g} ms" for e in entries]
    )
    ax.minorticks_off()
    pos = [v for v in values if v > 0]
    if pos and max(pos) / min(pos) > 20:
        ax.set_yscale("log")
        log_ticks(ax.yaxis, min(pos), max(pos))
        ax.set_ylabel("latency (ms, log scale)", fontsize=LABEL_SIZE)
    else:
        ax.set_ylim(0, (max(values) if values else 1) * 1.12)
        ax.set_ylabel("latency (ms)", fontsize=LABEL_SIZE)
    scale = ", log scale" if wide else ""
    ax.set_xlabel(f"network profile and added round trip (ms{scale})", fontsize=LABEL_SIZE)
    handles = [Line2D([], [], color=TIER_COLORS.get(t, "#777777"), lw=2.5) for t in tiers]
    handles += [
        Line2D([], [], color="0.3", ls="-", marker="o", ms=6),
        Line2D([], [], color="0.3", ls="--", marker="s", mfc="white", ms=6, mew=1.4),
    ]
    labels = [*tiers, "p50", "p95"]
    body.legend(
        handles,
        labels,
        loc="outside lower center",
        ncol=len(labels),
        fontsize=SMALL + 0.5,
        frameon=False,
        handlelength=2.6,
    )
    style_axes(ax)
    set_titles(fig, body, results, "Latency vs network round trip")
    return fig


def throughput_vs_p99(results: dict[str, Any]) -> Figure | None:
    """p99 against throughput over the load sweep, each point labelled with its concurrency
    or offered rate, the knee highlighted. None without a load sweep."""
    sweep = results.get("load_sweep") or {}
    all_points = sweep.get("points") or []
    pts = [p for p in all_points if is_num(p.get("throughput")) and is_num(p.get("p99_ms"))]
    if not pts:
        return None
    open_mode = (sweep.get("x") or sweep.get("mode")) in ("rate", "open")
    fig, body = new_figure(9.0, 5.6)
    ax = body.subplots()
    xs = [p["throughput"] for p in pts]
    ys = [p["p99_ms"] for p in pts]
    ax.plot(xs, ys, "-o", color=TIER_COLORS["cloud"], lw=1.9, ms=7, mec="white", zorder=3)
    knee = sweep.get("knee")
    knee_p = all_points[knee] if isinstance(knee, int) and 0 <= knee < len(all_points) else None
    if knee_p is not None and knee_p in pts:
        ax.scatter(
            knee_p["throughput"], knee_p["p99_ms"], s=300, fc="none", ec=ACCENT, lw=2.0, zorder=5
        )
    if min(ys) > 0 and max(ys) / min(ys) > 10:
        ax.set_yscale("log")
        log_ticks(ax.yaxis, min(ys), max(ys))
        ax.set_ylabel("p99 latency (ms, log scale)", fontsize=LABEL_SIZE)
        ax.set_ylim(min(ys) / 1.35, max(ys) * 1.35)
    else:
        ax.set_ylim(0, max(ys) * 1.18)
        ax.set_ylabel("p99 latency (ms)", fontsize=LABEL_SIZE)
    span = max(xs) - min(xs) or max(xs) or 1.0
    ax.set_xlim(max(0.0, min(xs) - 0.12 * span), max(xs) + 0.1 * span)
    what = "offered rate" if open_mode else "concurrency"
    ax.set_xlabel(f"throughput (answers/s); point labels: {what}", fontsize=LABEL_SIZE)
    style_axes(ax)
    set_titles(fig, body, results, "Throughput vs p99 latency")

    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    avoid = points_px(ax, list(zip(xs, ys, strict=True)), 9)
    avoid += polyline_px(ax, list(zip(xs, ys, strict=True)), 4)
    if knee_p is not None and knee_p in pts:
        avoid += points_px(ax, [(knee_p["throughput"], knee_p["p99_ms"])], 18)
    for p in pts:
        if p is knee_p:
            continue  # the knee's box names it
        ann = place_label(
            ax,
            renderer,
            _load_label(p.get("x"), open_mode),
            (p["throughput"], p["p99_ms"]),
            avoid,
            None,
            None,
            distances=(5, 10),
            fontsize=SMALL + 0.5,
            color="0.2",
        )
        avoid.append(label_box(ann, renderer))
    if knee_p is not None and knee_p in pts:
        place_label(
            ax,
            renderer,
            f"knee at {_load_label(knee_p.get('x'), open_mode)}\n"
            f"{knee_p['throughput']:.4g} answers/s, p99 {fmt_ms(knee_p['p99_ms'])} ms",
            (knee_p["throughput"], knee_p["p99_ms"]),
            avoid,
            {"boxstyle": "round,pad=0.4", "fc": "white", "ec": ACCENT, "lw": 0.9},
            {"arrowstyle": "-|>", "color": ACCENT, "lw": 1.0, "shrinkB": 11},
            color="#9d0208",
        )
    return fig


# -- small helpers -------------------------------------------------------------------------


def _level_title(level: dict[str, Any]) -> str:
    parts = [tex_safe(str(level.get("label") or "level"))]
    if is_num(level.get("throughput")):
        parts.append(f"{level['throughput']:.4g}/s")
    if is_num(level.get("escalation_rate")):
        parts.append(f"{level['escalation_rate'] * 100:.0f}% escalated")
    return "  ·  ".join(parts)


def _cdf_series(level: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(tier, stats)`` with CDF data, tiers in a fixed order; ``all`` only beside 2+ tiers."""
    tiers = level.get("tiers") or {}
    names = [t for t in TIERS if t in tiers] + sorted(t for t in tiers if t not in TIERS)
    out = [(t, tiers[t]) for t in names if _cdf_xy(tiers[t] or {})[0]]
    # "all" beside two or more tiers; alone when no tier has a CDF
    if len(out) != 1 and _cdf_xy(level.get("all") or {})[0]:
        out.append(("all", level["all"]))
    return out


def _cdf_xy(stats: dict[str, Any]) -> tuple[list[float], list[float]]:
    pairs = [
        (float(p[0]), float(p[1]))
        for p in stats.get("cdf") or []
        if len(p) == 2 and is_num(p[0]) and is_num(p[1]) and p[0] > 0
    ]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _point_text(p: dict[str, Any]) -> str:
    text = f"accuracy {p['accuracy'] * 100:.1f}%, escalated {p['escalation_rate'] * 100:.1f}%"
    if is_num(p.get("p95_ms")):
        text += f"\np95 {fmt_ms(p['p95_ms'])} ms"
    return text


def _load_label(x: Any, open_mode: bool) -> str:
    if not is_num(x):
        return "?"
    return f"{x:g}/s" if open_mode else f"c={x:g}"


def _thr(v: float) -> str:
    return f"{v:.3f}".rstrip("0").rstrip(".") if is_num(v) else "?"
