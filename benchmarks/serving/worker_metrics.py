"""Worker throughput with metrics on against off, in the same run.

``python -m benchmarks.serving.worker_metrics [--seconds S] [--repeats R] [--json PATH]``

Two worker processes serve the reference CNN (``digits-cloud``, one row per request: the
cheapest request, where per-request overhead shows most): one with an ``http`` section
(metrics recorded, ``/metrics`` scraped every ``--scrape-s`` during its runs, as Prometheus
would, only more often), one without (the reference: no metric object on its path). Closed-loop
clients (``--procs`` processes, ``--depth`` requests in flight each; the load generator of
:mod:`benchmarks.serving.batching`) drive one worker at a time, alternating on, off, on, off…
(``--repeats`` runs each, the order swapped every pair), so drift on a shared machine hits both alike; the medians are
compared, and the median of the pairs' ratios.

Goal (issue 19): requests/s with metrics on ≥ 97% of off.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.common import emit
from benchmarks.serving.batching import run_load
from tandem.bench.ports import free_ports
from tandem.cloud.config import WorkerConfig
from tandem.cloud.process import WorkerProcess
from tandem.reference.models import CLOUD, build_reference_models

GOAL_RATIO = 0.97


class Scraper:
    """Scrapes ``url`` every ``interval_s`` on a thread while it is on (a context manager)."""

    def __init__(self, url: str, interval_s: float) -> None:
        self.url, self.interval_s = url, interval_s
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with urllib.request.urlopen(self.url, timeout=5) as r:
                r.read()
            self.scrapes += 1

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=3.0, help="per run")
    ap.add_argument("--repeats", type=int, default=5, help="runs per variant (ABAB…; median)")
    ap.add_argument("--procs", type=int, default=2, help="client processes")
    ap.add_argument("--depth", type=int, default=4, help="requests in flight per process")
    ap.add_argument("--scrape-s", type=float, default=1.0, help="scrape interval, metrics on")
    ap.add_argument("--models-dir", type=Path, default=None)
    ap.add_argument("--json", default=None, help="default bench-worker_metrics.json")
    args = ap.parse_args(argv)

    models_dir = build_reference_models(args.models_dir)
    base = {
        "bind": "tcp://127.0.0.1:*",
        "models_dir": str(models_dir),
        "models": [CLOUD],
        "threads": 1,
    }
    (port,) = free_ports(1)
    configs = {
        "off": WorkerConfig.model_validate(base),
        "on": WorkerConfig.model_validate({**base, "http": {"bind": f"127.0.0.1:{port}"}}),
    }
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    load = os.getloadavg()[0]
    workers = {label: WorkerProcess(cfg).start() for label, cfg in configs.items()}
    try:
        for w in workers.values():  # warm both: first batches, page faults
            assert w.endpoint is not None
            run_load(w.endpoint, CLOUD, args.procs, args.depth, 1.0)
        for i in range(args.repeats):
            for label in ("on", "off") if i % 2 == 0 else ("off", "on"):
                endpoint = workers[label].endpoint
                assert endpoint is not None
                if label == "on":
                    url = f"http://127.0.0.1:{port}/metrics"
                    with Scraper(url, args.scrape_s) as s:
                        r = run_load(endpoint, CLOUD, args.procs, args.depth, args.seconds)
                    r["scrapes"] = s.scrapes
                else:
                    r = run_load(endpoint, CLOUD, args.procs, args.depth, args.seconds)
                runs[label].append(r)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            excerpt = [
                line
                for line in resp.read().decode().splitlines()
                if line.startswith("tandem_worker_requests_total")
            ]
    finally:
        for w in workers.values():
            w.stop()
    median = {k: statistics.median(r["rows_per_s"] for r in v) for k, v in runs.items()}
    p50 = {k: statistics.median(r["p50_ms"] for r in v) for k, v in runs.items()}
    ratio = median["on"] / median["off"]
    pair_ratio = statistics.median(
        a["rows_per_s"] / b["rows_per_s"] for a, b in zip(runs["on"], runs["off"], strict=True)
    )
    rows = [
        [label, median[label], p50[label], " ".join(f"{r['rows_per_s']:.0f}" for r in runs[label])]
        for label in ("off", "on")
    ]
    rows.append(["on / off", ratio, p50["on"] / p50["off"], f"goal ≥ {GOAL_RATIO:.2f}"])
    rows.append(["on / off, median of pairs", pair_ratio, "", ""])
    emit(
        "worker_metrics",
        f"worker throughput, metrics on vs off ({CLOUD}, 1 row/request, {args.procs} procs × "
        f"depth {args.depth}, {args.repeats} alternating runs of {args.seconds:g} s; "
        f"load average at start {load:.1f})",
        ["variant", "requests/s (median)", "p50 ms (median)", "runs (requests/s)"],
        rows,
        {
            "runs": runs,
            "median_requests_per_s": median,
            "ratio_on_off": ratio,
            "median_pair_ratio_on_off": pair_ratio,
            "goal_ratio": GOAL_RATIO,
            "met": ratio >= GOAL_RATIO,
            "load_average_1min_start": load,
            "load_average_1min_end": os.getloadavg()[0],
            "metrics_excerpt": excerpt,
            "settings": vars(args) | {"models_dir": str(models_dir)},
        },
        args.json,
    )


if __name__ == "__main__":
    main()
