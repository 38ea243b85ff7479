"""Round trip through Tandem's client and worker vs raw pyzmq, same run.

``python -m benchmarks.serving.wire``

* **Tandem**: :class:`CloudClient.echo` → a real worker process (ROUTER socket, envelope
  decode, validation, re-encode) → back. The payload is a float32 array.
* **Reference**: a raw pyzmq REQ socket → a REP socket in another process that echoes the bytes
  back untouched — the least any ZeroMQ round trip can cost.
* **Decomposition**: raw pyzmq DEALER → ROUTER echo, no envelope: the socket pattern Tandem
  uses (many clients per worker, out-of-order replies) without Tandem's codec and checks. The
  gap between this column and REQ/REP is the pattern; the rest is Tandem's own work.
* **Curve**: the same Tandem echo through a second worker with CurveZMQ on (keys generated
  into a temporary folder): its cost is the ratio to the plain Tandem echo.

All over TCP loopback, sampled in alternating rounds. The goal: Tandem ≤ 1.3× REQ/REP at p50.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import zmq

from benchmarks.common import emit, interleaved_us, pct
from tandem.cloud.config import WorkerConfig
from tandem.cloud.process import WorkerProcess
from tandem.runtime.client import CloudClient
from tandem.runtime.curve import generate_keypair

GOAL = 1.3
# One echo server per process, each as lean as pyzmq allows (blocking recv, zero-copy frames).
_RAW_ECHO = textwrap.dedent(
    """
    import sys, zmq
    sock = zmq.Context().socket(getattr(zmq, sys.argv[1]))
    print(sock.bind_to_random_port("tcp://127.0.0.1"), flush=True)
    while True:
        sock.send_multipart(sock.recv_multipart(copy=False), copy=False)
    """
)


def _echo_server(kind: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _RAW_ECHO, kind], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=4000, help="round trips per size (1 MiB uses n/8)")
    ap.add_argument("--json", default=None, help="where to write results (default bench-wire.json)")
    args = ap.parse_args(argv)

    ctx = zmq.Context.instance()
    servers, raw = [], {}
    for kind, client_kind in (("REP", zmq.REQ), ("ROUTER", zmq.DEALER)):
        proc, port = _echo_server(kind)
        servers.append(proc)
        sock = ctx.socket(client_kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{port}")
        raw[kind] = sock

    def raw_round_trip(sock: zmq.Socket, b: bytes) -> None:
        sock.send(b, copy=len(b) < 65536)  # pyzmq copies small frames anyway
        sock.recv(copy=False)

    keys = tempfile.TemporaryDirectory(prefix="tandem-bench-keys-")
    kd = Path(keys.name)
    worker_public, worker_secret = generate_keypair(kd, "worker")
    (kd / "clients").mkdir()
    generate_keypair(kd / "clients", "bench")
    curve_cfg = WorkerConfig.model_validate(
        {
            "bind": "tcp://127.0.0.1:*",
            "curve": {"secret_key": str(worker_secret), "allowed_clients": str(kd / "clients")},
        }
    )
    rows, data = [], {}
    try:
        with (
            WorkerProcess(WorkerConfig(bind="tcp://127.0.0.1:*")) as worker,
            WorkerProcess(curve_cfg) as curve_worker,
        ):
            assert worker.endpoint is not None and curve_worker.endpoint is not None
            curve_keys = (kd / "clients" / "bench.key_secret", worker_public)
            with (
                CloudClient(worker.endpoint) as client,
                CloudClient(curve_worker.endpoint, curve=curve_keys) as curve_client,
            ):
                for label, n_floats, n in (
                    ("1 KiB", 256, args.n),
                    ("1 MiB", 262_144, max(50, args.n // 8)),
                ):
                    x = np.random.default_rng(0).normal(size=n_floats).astype(np.float32)
                    b = x.tobytes()
                    np.testing.assert_array_equal(client.echo(x), x)
                    np.testing.assert_array_equal(curve_client.echo(x), x)
                    s = interleaved_us(
                        {
                            "tandem": lambda x=x: client.echo(x),
                            "curve": lambda x=x: curve_client.echo(x),
                            "req_rep": lambda b=b: raw_round_trip(raw["REP"], b),
                            "dealer_router": lambda b=b: raw_round_trip(raw["ROUTER"], b),
                        },
                        n,
                    )
                    t, r, d = (pct(s[k]) for k in ("tandem", "req_rep", "dealer_router"))
                    c = pct(s["curve"])
                    ratio = t["p50"] / r["p50"]
                    curve_ratio = c["p50"] / t["p50"]
                    ok = "yes" if ratio <= GOAL else "NO"
                    rows.append(
                        [
                            label,
                            r["p50"],
                            r["p99"],
                            d["p50"],
                            t["p50"],
                            t["p99"],
                            f"{ratio:.2f}×",
                            ok,
                            c["p50"],
                            f"{curve_ratio:.2f}×",
                        ]
                    )
                    data[label] = {
                        "raw_req_rep_us": r,
                        "raw_dealer_router_us": d,
                        "tandem_us": t,
                        "ratio_p50": ratio,
                        "goal": GOAL,
                        "tandem_curve_us": c,
                        "curve_ratio_p50": curve_ratio,
                    }
    finally:
        for sock in raw.values():
            sock.close()
        for proc in servers:
            proc.kill()
            proc.wait()
        keys.cleanup()
    emit(
        "wire",
        "echo round trip over TCP loopback (µs): Tandem client+worker vs raw pyzmq",
        [
            "payload",
            "REQ/REP p50",
            "p99",
            "DEALER/ROUTER p50",
            "tandem p50",
            "p99",
            "ratio",
            f"≤{GOAL}×",
            "curve p50",
            "curve/tandem",
        ],
        rows,
        data,
        args.json,
    )


if __name__ == "__main__":
    main()
