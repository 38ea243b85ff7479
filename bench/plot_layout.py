"""How ``tandem bench``'s figures look and where their labels go, apart from what each figure
shows (:mod:`tandem.bench.plots`): a figure on an Agg canvas with the machine under its title,
one axes style, plain-number log ticks, and annotations placed where they cover the fewest
points, lines and other labels (:func:`place_label`).

matplotlib is imported inside the functions, and only through ``matplotlib.figure.Figure``:
no pyplot, no backend switch, no rcParams changes, so figures can be drawn from any thread.
Sizes are points, positions display pixels.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure, SubFigure
    from matplotlib.text import Annotation
    from matplotlib.transforms import Bbox

DPI = 130
TIER_COLORS = {
    "edge": "#2a9d8f",
    "cloud": "#3a6ea5",
    "edge-degraded": "#e07a2f",
    "all": "#3d3d3d",
}
ACCENT = "#d62839"
TITLE_SIZE = 13.5
LABEL_SIZE = 10.5
SMALL = 9.0


def new_figure(width: float, height: float) -> tuple[Figure, SubFigure]:
    """A figure on an Agg canvas and the sub-figure to draw in (its title: the machine)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subfigures(1, 1)


def set_titles(fig: Figure, body: SubFigure, results: dict[str, Any], what: str) -> None:
    scenario = (results.get("scenario") or {}).get("name") or "unnamed scenario"
    fig.suptitle(f"{what}: {tex_safe(str(scenario))}", fontsize=TITLE_SIZE, weight="bold")
    body.suptitle(tex_safe(machine_line(results)), fontsize=SMALL + 1, color="0.35")


def machine_line(results: dict[str, Any]) -> str:
    """``"<cpu>, <cores> cores[, <gpu>]"`` from the results' machine block."""
    m = results.get("machine") or {}
    text = f"{m.get('cpu') or 'unknown cpu'}, {m.get('cores') or '?'} cores"
    if m.get("gpu"):
        text += f", {m['gpu']}"
    return text


def style_axes(ax: Axes) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.spines[["left", "bottom"]].set_color("0.35")
    ax.grid(True, which="major", color="0.9", lw=0.8, zorder=0)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=SMALL, color="0.35")


def log_ticks(axis: Any, lo: float, hi: float) -> None:
    """Plain-number ticks on a log axis: 1-2-5 steps, denser when the data spans little."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 0.0
    subs = (1.0, 2.0, 5.0) if decades > 1.5 else (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))


def line_label(ax: Axes, y: float, text: str, color: str, side: str, above: bool) -> Any:
    return ax.text(
        0.995 if side == "right" else 0.005,
        y,
        text,
        transform=ax.get_yaxis_transform(),
        ha=side,
        va="bottom" if above else "top",
        fontsize=SMALL,
        color=color,
        bbox={"fc": "white", "ec": "none", "alpha": 0.85, "pad": 1.5},
        zorder=5,
    )


def points_px(ax: Axes, points: Sequence[tuple[float, float]], radius: float) -> list[Bbox]:
    """Display-space boxes of ``radius`` px around data points."""
    if not points:
        return []
    return _boxes(ax.transData.transform(points), radius)


def polyline_px(ax: Axes, points: Sequence[tuple[float, float]], radius: float) -> list[Bbox]:
    """Small boxes every few px along a polyline in data space, to keep labels off it."""
    if len(points) < 2:
        return []
    px = ax.transData.transform(points)
    samples = []
    for (x0, y0), (x1, y1) in itertools.pairwise(px):
        steps = max(1, int(math.hypot(x1 - x0, y1 - y0) / (radius * 1.5)))
        samples += [(x0 + (x1 - x0) * k / steps, y0 + (y1 - y0) * k / steps) for k in range(steps)]
    return _boxes(samples, radius)


def _boxes(points_px: Any, radius: float) -> list[Bbox]:
    from matplotlib.transforms import Bbox

    return [Bbox([[x - radius, y - radius], [x + radius, y + radius]]) for x, y in points_px]


def place_label(
    ax: Axes,
    renderer: Any,
    text: str,
    xy: tuple[float, float],
    avoid: list[Bbox],
    bbox: dict[str, Any] | None,
    arrow: dict[str, Any] | None,
    distances: Sequence[float] = (40, 70, 105, 145),
    fontsize: float = SMALL + 0.5,
    hard: Sequence[Bbox] = (),
    **kw: Any,
) -> Annotation:
    """Annotate ``xy`` (data) with ``text`` where its box stays inside the axes and overlaps
    the fewest ``avoid`` boxes (display px) and none of the ``hard`` ones (other labels) if it
    can; nearer and diagonal positions win ties."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    ann = ax.annotate(
        text,
        xy,
        xytext=(0, 0),
        textcoords="offset pixels",
        ha="center",
        va="center",
        fontsize=fontsize,
        multialignment="left",
        bbox=bbox,
        arrowprops=arrow,
        zorder=6,
        **kw,
    )
    ann.set_in_layout(False)
    size = Text.get_window_extent(ann, renderer)  # the text alone, not the arrow
    pad = fontsize * 0.6 * DPI / 72 if bbox else 2.0
    w, h = size.width / 2 + pad, size.height / 2 + pad
    px, py = ax.transData.transform(xy)
    frame = ax.get_window_extent(renderer)
    angles = (135, 315, 45, 225, 90, 270, 180, 0, 160, 200, 20, 340, 110, 250, 70, 290)
    best: tuple[float, float, float] | None = None
    for rank, angle in enumerate(angles):
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        for d in distances:
            cx, cy = px + c * (d + w), py + s * (d + h)
            box = Bbox([[cx - w, cy - h], [cx + w, cy + h]])
            outside = max(
                frame.x0 - box.x0, box.x1 - frame.x1, frame.y0 - box.y0, box.y1 - frame.y1, 0
            )
            hits = sum(box.overlaps(b) for b in avoid)
            clash = sum(box.overlaps(b) for b in hard)
            cost = outside * 100 + clash * 1000 + hits * 10 + d / 40 + rank * 0.02
            if best is None or cost < best[0]:
                best = (cost, cx - px, cy - py)
    assert best is not None
    ann.xyann = (best[1], best[2])
    return ann


def label_box(ann: Annotation, renderer: Any) -> Bbox:
    """Where an annotation's text box landed (display px; its patch's own extent is in unit
    coordinates until drawn), padded as the box is."""
    return ann.get_window_extent(renderer).padded(6)


def tex_safe(s: str) -> str:
    """User text for matplotlib: a ``$`` would start mathtext."""
    return s.replace("$", r"\$")
