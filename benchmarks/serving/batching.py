"""Dynamic batching vs no batching (``max_batch: 1``), same worker, same run.

``python -m benchmarks.serving.batching``

For each model — the CNN (``digits-cloud``: a message costs about as much as its one-row
compute) and the MoE classifier (``digits-moe``: one row's compute dominates a message) — a
worker process is started twice: with the default batching (``max_batch: 64``, no queue delay)
and with ``max_batch: 1``. Both workers run side by side and the two configurations alternate at each load, three
times (the median run is kept), so drift in machine load hits both alike. Load comes from
``--procs`` client **processes**, each a DEALER
socket keeping ``depth`` one-row ``infer`` requests in flight (closed loop: a reply sends the
next request), so the offered concurrency is ``procs × depth``. Per load: rows/s and p50/p99
latency; worker and clients share the machine's cores, as they would on one host.

The idle round trip: one request at a time, ``infer`` of one row vs ``echo`` of the same
bytes on the same worker; the model's own compute is the ``run_ms`` the worker reports for
those same requests (the backend call alone, timed inside the worker), and, for reference, the
same backend called in a warm loop in this process. ``overhead = infer − echo − compute``.

Goals (issue 6): batching never worse than ``max_batch: 1`` at any load (rows/s within noise,
5%); idle overhead ≤ 50 µs; ≥ 3× rows/s at saturation on the compute-heavy model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import emit, interleaved_us, pct
from tandem.cloud.config import WorkerConfig
from tandem.cloud.process import WorkerProcess
from tandem.reference.models import CLOUD, MOE, build_reference_models
from tandem.runtime.client import CloudClient
from tandem.runtime.manifest import load_manifest

GOAL_SATURATION = 3.0
GOAL_IDLE_OVERHEAD_US = 50.0
NOISE = 0.05


def load_client(endpoint: str, model: str, depth: int, seconds: float) -> dict[str, Any]:
    """One client process's loop: ``depth`` requests in flight for ``seconds``."""
    import zmq

    from tandem.runtime.wire import Envelope, Kind, WireCodec, recv_frames, send_frames

    codec = WireCodec()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    x = np.random.default_rng(0).uniform(0, 1, (1, 64)).astype(np.float32)
    sent: dict[bytes, float] = {}
    lat: list[float] = []
    errors = 0

    def send() -> None:
        env = Envelope(kind=Kind.INFER, payload={"model": model, "inputs": x})
        sent[env.id] = time.perf_counter()
        send_frames(sock, codec.encode(env))

    end = time.perf_counter() + seconds
    for _ in range(depth):
        send()
    while sent:
        if not sock.poll(10_000):
            raise SystemExit("worker stopped answering")
        r = codec.decode(recv_frames(sock, n_copied=1))
        t = time.perf_counter()
        lat.append(t - sent.pop(r.id))
        errors += r.kind is Kind.ERROR
        if t < end:
            send()
    sock.close()
    return {"latencies_s": lat, "errors": errors, "seconds": seconds}


def run_load(endpoint: str, model: str, procs: int, depth: int, seconds: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.serving.batching", "--client", endpoint, model]
    children = [
        subprocess.Popen([*cmd, str(depth), str(seconds)], stdout=subprocess.PIPE, text=True)
        for _ in range(procs)
    ]
    outs = [json.loads(c.communicate()[0]) for c in children]
    lat = np.concatenate([np.array(o["latencies_s"][len(o["latencies_s"]) // 10 :]) for o in outs])
    total = sum(len(o["latencies_s"]) for o in outs)
    return {
        "rows_per_s": total / seconds,
        "p50_ms": float(np.percentile(lat, 50) * 1e3),
        "p99_ms": float(np.percentile(lat, 99) * 1e3),
        "errors": sum(o["errors"] for o in outs),
    }


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--client":
        endpoint, model, depth, seconds = sys.argv[2:6]
        print(json.dumps(load_client(endpoint, model, int(depth), float(seconds))))
        return
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=2.0, help="per load point and run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per load point (median kept)")
    ap.add_argument("--procs", type=int, default=2, help="client processes")
    ap.add_argument("--depths", default="1,4,16,64", help="requests in flight per process")
    ap.add_argument("--threads", type=int, default=1, help="worker intra-op threads")
    ap.add_argument("--models-dir", type=Path, default=None)
    ap.add_argument("--json", default=None, help="default bench-batching.json")
    args = ap.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]

    models_dir = build_reference_models(args.models_dir, moe=True)
    rows, data = [], {}
    for model in (CLOUD, MOE):
        idle = idle_round_trip(models_dir, model, args.threads)
        data[model] = {"idle": idle}
        configs = {"batching": 64, "max_batch 1": 1}
        workers = {
            label: WorkerProcess(
                WorkerConfig.model_validate(
                    {
                        "bind": "tcp://127.0.0.1:*",
                        "models_dir": str(models_dir),
                        "models": [model],
                        "threads": args.threads,
                        "batching": {"max_batch": max_batch},
                    }
                )
            ).start()
            for label, max_batch in configs.items()
        }
        try:
            for w in workers.values():
                run_load(w.endpoint or "", model, 1, 1, 0.5)  # warm-up
            # both configurations alternate at each load, --repeats times; the median run (by
            # rows/s) is reported, so drift in machine load hits both alike
            per_cfg: dict[str, list[dict[str, Any]]] = {label: [] for label in configs}
            for d in depths:
                runs: dict[str, list[dict[str, Any]]] = {label: [] for label in configs}
                for _ in range(args.repeats):
                    for label, w in workers.items():
                        runs[label].append(
                            run_load(w.endpoint or "", model, args.procs, d, args.seconds)
                        )
                for label, rs in runs.items():
                    per_cfg[label].append(sorted(rs, key=lambda r: r["rows_per_s"])[len(rs) // 2])
        finally:
            for w in workers.values():
                w.stop()
        data[model]["loads"] = per_cfg
        for d, b, u in zip(depths, per_cfg["batching"], per_cfg["max_batch 1"], strict=True):
            gain = b["rows_per_s"] / u["rows_per_s"]
            rows.append(
                [
                    model,
                    args.procs * d,
                    round(u["rows_per_s"]),
                    u["p50_ms"],
                    u["p99_ms"],
                    round(b["rows_per_s"]),
                    b["p50_ms"],
                    b["p99_ms"],
                    f"{gain:.2f}×",
                    "yes" if gain >= 1 - NOISE else "NO",
                ]
            )
        sat = per_cfg["batching"][-1]["rows_per_s"] / per_cfg["max_batch 1"][-1]["rows_per_s"]
        data[model]["saturation_gain"] = sat
    emit(
        "batching",
        f"one-row infer from {args.procs} client processes: max_batch 1 vs dynamic batching "
        f"(worker threads {args.threads})",
        [
            "model",
            "in flight (procs × depth)",
            "mb1 rows/s",
            "p50 ms",
            "p99 ms",
            "batched rows/s",
            "p50 ms",
            "p99 ms",
            "gain",
            "≥ mb1",
        ],
        rows,
        data,
        args.json,
    )
    from rich.console import Console

    con = Console()
    for model in (CLOUD, MOE):
        i = data[model]["idle"]
        con.print(
            f"{model}: idle infer p50 {i['infer_us']:.0f} µs = echo {i['echo_us']:.0f} + "
            f"compute {i['compute_us']:.0f} (in the worker; warm loop here "
            f"{i['warm_loop_compute_us']:.0f}) + overhead {i['overhead_us']:.0f} µs "
            f"(goal ≤ {GOAL_IDLE_OVERHEAD_US:.0f}: "
            f"{'yes' if i['overhead_us'] <= GOAL_IDLE_OVERHEAD_US else 'NO'}); "
            f"saturation gain {data[model]['saturation_gain']:.2f}× "
            f"(goal on the compute-heavy model ≥ {GOAL_SATURATION}×)"
        )


def idle_round_trip(models_dir: Path, model: str, threads: int, n: int = 2000) -> dict[str, float]:
    """One request at a time: infer (1 row) vs echo (same bytes) vs the model's compute."""
    from tandem.runtime.backends import open_backend

    entry = load_manifest(models_dir).get(model)
    backend = open_backend(entry.format, models_dir / entry.file, name=model, threads=threads)
    x = np.random.default_rng(0).uniform(0, 1, (1, 64)).astype(np.float32)
    cfg = WorkerConfig.model_validate(
        {
            "bind": "tcp://127.0.0.1:*",
            "models_dir": str(models_dir),
            "models": [model],
            "threads": threads,
        }
    )
    run_ms: list[float] = []
    with WorkerProcess(cfg) as w, CloudClient(w.endpoint or "") as c:
        s = interleaved_us(
            {
                "infer": lambda: run_ms.append(c.infer(model, x, timeout_s=5)["run_ms"]),
                "echo": lambda: c.echo({"model": model, "inputs": x}),
                "warm": lambda: backend.predict(x),
            },
            n,
        )
    infer, echo, warm = (pct(s[k])["p50"] for k in ("infer", "echo", "warm"))
    compute = float(np.percentile(run_ms, 50) * 1e3)
    return {
        "infer_us": infer,
        "echo_us": echo,
        "compute_us": compute,
        "warm_loop_compute_us": warm,
        "overhead_us": infer - echo - compute,
    }


if __name__ == "__main__":
    main()
