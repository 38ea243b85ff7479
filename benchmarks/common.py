"""What every developer benchmark shares: timing loops, latency percentiles, a table (captioned
with the machine: CPU model, cores, GPU if any), a JSON file."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tandem.bench.report import json_safe
from tandem.runtime.machine import machine


def sample_us(fn: Callable[[], Any], n: int, warmup: int = 50) -> np.ndarray:
    """Per-call wall time of ``fn`` in microseconds, ``n`` samples after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = np.empty(n)
    clock = time.perf_counter_ns
    for i in range(n):
        t = clock()
        fn()
        out[i] = clock() - t
    return out / 1e3


def interleaved_us(
    fns: dict[str, Callable[[], Any]], n: int, rounds: int = 5
) -> dict[str, np.ndarray]:
    """Sample each function in alternating rounds, so drift in machine load hits all alike."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            parts[k].append(sample_us(fn, max(1, n // rounds)))
    return {k: np.concatenate(v) for k, v in parts.items()}


def interleaved_median_s(
    fns: dict[str, Callable[[], Any]], repeat: int, round_s: float
) -> dict[str, float]:
    """Median seconds per call of each function, timed in ``repeat`` alternating rounds (so
    drift in machine load hits all alike), each round running a function enough times to last
    about ``round_s``."""
    inner = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        inner[name] = max(1, int(round_s / max(time.perf_counter() - t0, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner[name])
    return {name: float(np.median(v)) for name, v in samples.items()}


def pct(samples: np.ndarray) -> dict[str, float]:
    p50, p90, p99 = np.percentile(samples, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "n": len(samples)}


def best_of_ms(fn: Callable[[], Any], repeat: int, min_time_s: float = 0.2) -> float:
    """Median ms per call of ``fn`` over ``repeat`` timed runs (each long enough to time)."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    inner = max(1, int(min_time_s / repeat / max(once, 1e-9)))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return float(np.median(times) * 1e3)


def emit(
    name: str,
    title: str,
    columns: list[str],
    rows: list[list[Any]],
    data: dict[str, Any],
    json_path: str | None,
) -> None:
    """Print a table and write ``{machine, results}`` as JSON (default ``bench-<name>.json``)."""
    from rich.console import Console
    from rich.table import Table

    m = machine()
    table = Table(
        title=title,
        caption=f"{m['cpu']}, {m['cores']} cores" + (f", {m['gpu']}" if "gpu" in m else ""),
    )
    for c in columns:
        table.add_column(c, justify="left" if c == columns[0] else "right")
    for r in rows:
        table.add_row(*(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r))
    console = Console(width=None if sys.stdout.isatty() else 160)  # piped: don't cut columns
    console.print(table)
    path = Path(json_path or f"bench-{name}.json")
    path.write_text(json.dumps({"benchmark": name, "machine": m, "results": data}, indent=2) + "\n")
    Console().print(f"results written to {path}")


def print_table(title: str, columns: list[str], rows: list[list[Any]], note: str) -> None:
    from rich.console import Console
    from rich.table import Table

    m = machine()
    where = f"{m['cpu']}, {m['cores']} cores" + (f", {m['gpu']}" if "gpu" in m else "")
    table = Table(title=title, caption=f"{where}; {note}")
    for c in columns:
        table.add_column(c, justify="left" if c == columns[0] else "right")
    for r in rows:
        table.add_row(*(str(v) for v in r))
    Console(width=None if sys.stdout.isatty() else 170).print(table)


def write_results(
    path: Path,
    benchmark: str,
    settings: dict[str, Any],
    results: Any,
    load_average: tuple[float, float],
) -> None:
    """Write ``{benchmark, machine, load_average_1min, settings, results}`` to ``path`` as JSON
    (NaN and ±inf as null) and say where. ``load_average``: the 1-minute load average at the
    start and at the end of the run."""
    from rich.console import Console

    doc = {
        "benchmark": benchmark,
        "machine": machine(),
        "load_average_1min": {"start": load_average[0], "end": load_average[1]},
        "settings": settings,
        "results": results,
    }
    path.write_text(json.dumps(json_safe(doc), indent=2) + "\n")
    Console().print(f"results written to {path}")
