"""Soak: steady escalated load on three workers while two of them are killed (SIGKILL) and
restarted in turn. Says whether anything was lost or answered twice, and whether a worker
grows.

``python -m benchmarks.serving.soak --minutes 10``

* Workers: three ``tandem cloud serve`` processes serving the CNN on fixed loopback ports.
  ``w0`` lives through the whole run (its RSS over minutes is the leak check); ``w1`` and
  ``w2`` are killed in turn every ``--kill-every`` seconds and restarted on the same port
  ``--down`` seconds later.
* Load: ``--threads`` client threads share one :class:`EdgeRuntime` (policy: the three
  endpoints, every request tagged ``critical`` so it escalates, escalation log on with
  retention), paced to ``--rate`` requests/s in all: ``tandem bench``'s closed loop
  (:func:`tandem.bench.load.closed_loop`), request ``i`` sent no sooner than ``i / rate`` s
  after the start.
* Every ``--window`` seconds a row: throughput, p50/p99, share answered by the cloud,
  errors by type, each worker's RSS.

Must hold: lost = 0 (every call returned one Result), duplicated = 0 (each request id seen
once), and each worker's RSS growth < 10% from the end of its first minute to its last sample.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml

from benchmarks.common import emit
from tandem.bench.load import Entry, closed_loop, item_counter
from tandem.bench.ports import free_ports
from tandem.cloud.config import WorkerConfig
from tandem.cloud.process import WorkerProcess
from tandem.edge import EdgeRuntime, Tier
from tandem.reference.digits import load_workload
from tandem.reference.models import CLOUD, EDGE, build_reference_models
from tandem.runtime.manifest import load_manifest

RSS_GROWTH_LIMIT = 0.10


class _Answer(NamedTuple):
    """One answered call: when it was sent (s after the start), its request id, how it was
    answered (``cloud``, or the reason it was not) and its latency."""

    t: float
    request_id: str
    kind: str
    ms: float


def _answers(entries: list[Entry]) -> list[_Answer]:
    """The answered calls among the driver's entries (the others raised: lost)."""
    return [o for _, o, _, _ in entries if isinstance(o, _Answer)]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class _Fleet:
    """Three workers on fixed ports; ``kill(i)`` and ``restart(i)``; RSS samples per life."""

    def __init__(self, models_dir: Path) -> None:
        self.endpoints = [f"tcp://127.0.0.1:{p}" for p in free_ports(3)]
        self.models_dir = models_dir
        self.procs: list[WorkerProcess | None] = [None] * 3
        self.lives: list[list[list[tuple[float, float]]]] = [[], [], []]  # (t, MB) per life

    def start(self, i: int) -> None:
        cfg = WorkerConfig.model_validate(
            {
                "bind": self.endpoints[i],
                "models_dir": str(self.models_dir),
                "models": [CLOUD],
                "threads": 1,
            }
        )
        self.procs[i] = WorkerProcess(cfg).start()
        self.lives[i].append([])

    def kill(self, i: int) -> None:
        p = self.procs[i]
        if p is not None:
            p.kill()
            self.procs[i] = None

    def sample(self, t: float) -> list[float]:
        out = []
        for i, p in enumerate(self.procs):
            mb = rss_mb(p.pid) if p is not None else float("nan")
            if p is not None:
                self.lives[i][-1].append((t, mb))
            out.append(mb)
        return out

    def stop(self) -> None:
        for p in self.procs:
            if p is not None:
                p.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=200.0, help="requests/s, all threads")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--kill-every", type=float, default=30.0, help="seconds between kills")
    ap.add_argument("--down", type=float, default=3.0, help="seconds a killed worker stays down")
    ap.add_argument("--window", type=float, default=30.0, help="seconds per report row")
    ap.add_argument("--deadline-ms", type=int, default=500)
    ap.add_argument("--models-dir", type=Path, default=None)
    ap.add_argument("--json", default=None, help="default bench-soak.json")
    args = ap.parse_args(argv)

    models = build_reference_models(args.models_dir)
    xs = load_workload().test.x
    fleet = _Fleet(models)
    for i in range(3):
        fleet.start(i)
    entries: list[Entry] = []  # every call: (t done, _Answer or failed Outcome, ms, 0)
    lock = threading.Lock()
    stop = threading.Event()
    duration = args.minutes * 60

    with tempfile.TemporaryDirectory() as tmp:
        policy = {
            "escalation_log": {
                "path": str(Path(tmp) / "esc.sqlite"),
                "synchronous": "normal",
                "max_rows": 20_000,
            },
            "tasks": {
                "digits": {
                    "local": {"path": str(models / load_manifest(models).get(EDGE).file)},
                    "cloud": {"endpoints": fleet.endpoints, "model": CLOUD},
                    "gate": {"metric": "max_prob", "threshold": 0.5},
                    "rules": [{"tag": "critical", "route": "cloud"}],
                    "deadline_ms": args.deadline_ms,
                }
            },
        }
        path = Path(tmp) / "policy.yaml"
        path.write_text(yaml.safe_dump(policy))
        with EdgeRuntime.from_policy(path) as rt:
            t_start = time.monotonic()

            def call(i: int) -> _Answer:
                """Request ``i``, sent at its turn of the pace (``--rate`` in all)."""
                time.sleep(max(0.0, t_start + i / args.rate - time.monotonic()))
                t0 = time.monotonic()
                r = rt.infer(xs[i % len(xs)], tags={"critical"})
                ms = (time.monotonic() - t0) * 1e3
                kind = "cloud" if r.tier is Tier.CLOUD else r.reason.rpartition("cloud-")[2]
                return _Answer(t0 - t_start, r.request_id or "", kind, ms)

            def put(entry: Entry) -> None:
                with lock:
                    entries.append(entry)

            threads = closed_loop(call, args.threads, item_counter(stop), put)
            for t in threads:
                t.start()
            rows, windows = [], []
            next_kill, victim, revive = args.kill_every, 1, None
            kills = 0
            w_start = 0.0
            while (now := time.monotonic() - t_start) < duration:
                time.sleep(0.2)
                now = time.monotonic() - t_start
                if revive is not None and now >= revive[1]:
                    fleet.start(revive[0])
                    revive = None
                if now >= next_kill and revive is None:
                    fleet.kill(victim)
                    kills += 1
                    revive = (victim, now + args.down)
                    victim = 3 - victim  # 1, 2, 1, 2...
                    next_kill += args.kill_every
                if now - w_start >= args.window:
                    rss = fleet.sample(now)
                    with lock:
                        win = [r for r in _answers(entries) if w_start <= r.t < now]
                    windows.append(_window(w_start, now, win, rss))
                    rows.append(_row(windows[-1]))
                    w = windows[-1]
                    print(
                        f"{w['t0']:5.0f}-{w['t1']:<5.0f} s  {w['rate']:6.0f} req/s  p50 "
                        f"{w['p50_ms']:.2f} ms  p99 {w['p99_ms']:.2f} ms  {w['kinds']}  RSS "
                        f"{rows[-1][6]} MB",
                        flush=True,
                    )
                    w_start = now
            stop.set()
            for t in threads:
                t.join(30)
            log_stats = rt.stats().get("escalation_log")
        fleet.stop()

    results = _answers(entries)
    ids = Counter(r.request_id for r in results)
    duplicated = sum(c - 1 for c in ids.values() if c > 1)
    lost = len(entries) - len(results)  # calls that raised
    growth = _rss_growth(fleet.lives)
    all_ms = np.array([r[3] for r in results])
    summary = {
        "minutes": args.minutes,
        "requests": len(results),
        "kills": kills,
        "lost": lost,
        "duplicated": duplicated,
        "p50_ms": float(np.percentile(all_ms, 50)),
        "p99_ms": float(np.percentile(all_ms, 99)),
        "by_kind": dict(Counter(r[2] for r in results)),
        "rss_growth": growth,
        "max_rss_growth": max((g for g in growth.values() if g == g), default=0.0),
        "escalation_log": log_stats,
    }
    ok = lost == 0 and duplicated == 0 and summary["max_rss_growth"] < RSS_GROWTH_LIMIT
    rows.append(
        [
            "all",
            round(len(results) / duration),
            summary["p50_ms"],
            summary["p99_ms"],
            f"{summary['by_kind'].get('cloud', 0) / max(1, len(results)):.1%}",
            str({k: v for k, v in summary["by_kind"].items() if k != "cloud"}),
            f"lost {lost} dup {duplicated} kills {kills}",
            f"max growth {summary['max_rss_growth']:.1%} ({'ok' if ok else 'FAIL'})",
        ]
    )
    emit(
        "soak",
        f"soak: {args.rate:.0f} req/s escalated to 3 workers, one killed every "
        f"{args.kill_every:.0f} s",
        ["window s", "req/s", "p50 ms", "p99 ms", "cloud", "other answers", "RSS MB w0/w1/w2", ""],
        rows,
        {"summary": summary, "windows": windows},
        args.json,
    )


def _window(t0: float, t1: float, win: list, rss: list[float]) -> dict[str, Any]:
    ms = np.array([r[3] for r in win]) if win else np.array([np.nan])
    kinds = Counter(r[2] for r in win)
    return {
        "t0": round(t0, 1),
        "t1": round(t1, 1),
        "requests": len(win),
        "rate": len(win) / max(t1 - t0, 1e-9),
        "p50_ms": float(np.nanpercentile(ms, 50)),
        "p99_ms": float(np.nanpercentile(ms, 99)),
        "kinds": dict(kinds),
        "rss_mb": rss,
    }


def _row(w: dict[str, Any]) -> list[Any]:
    n = max(1, w["requests"])
    return [
        f"{w['t0']:.0f}-{w['t1']:.0f}",
        round(w["rate"]),
        w["p50_ms"],
        w["p99_ms"],
        f"{w['kinds'].get('cloud', 0) / n:.1%}",
        str({k: v for k, v in w["kinds"].items() if k != "cloud"}) or "-",
        "/".join("down" if v != v else f"{v:.0f}" for v in w["rss_mb"]),
        "",
    ]


def _rss_growth(lives: list[list[list[tuple[float, float]]]]) -> dict[str, float]:
    """Per worker life that lasted over a minute: last RSS sample vs the first sample taken
    after its first minute (warm-up)."""
    out = {}
    for i, worker_lives in enumerate(lives):
        for n, life in enumerate(worker_lives):
            if not life or life[-1][0] - life[0][0] < 60:
                continue
            warm = next(mb for t, mb in life if t - life[0][0] >= 60 - 1e-9)
            out[f"w{i}.{n}"] = life[-1][1] / warm - 1
    return out


if __name__ == "__main__":
    main()
