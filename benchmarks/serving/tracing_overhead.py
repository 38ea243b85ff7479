"""What OpenTelemetry tracing costs on an escalated ``EdgeRuntime.infer``, off and on, same run.

``python -m benchmarks.serving.tracing_overhead``

One row at a time on the reference models, every request escalated (``threshold: 1.0``) to a
real worker process on loopback:

* **Reference — off**: tracing not configured anywhere (``tandem.runtime.tracing.TRACER`` is
  None): the edge runs the class's ``infer``, the client, worker and batch hooks each make one
  check of that global;
* **on**: the edge's ``tandem.infer`` and ``tandem.cloud.request`` spans (to a no-op exporter
  behind the batch processor, so no network is measured on the edge), the trace context in the
  envelope, and a worker with tracing configured (its spans go by OTLP/HTTP to a sink on
  loopback, off its request path).

Both runtimes live in this process and are sampled in alternating rounds; between rounds the
tracer is switched off and on again (the global is set), so each side runs as it would alone.
The off path's own cost is also timed directly: the guard (``if tracing.TRACER is not None``)
against an empty statement, with ``timeit``, times the number of guards one escalated request
passes (client 1, worker 2, batch 1).
"""

from __future__ import annotations

import argparse
import http.server
import tempfile
import threading
import timeit
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import emit, pct, sample_us
from tandem.cloud.config import WorkerConfig
from tandem.cloud.process import WorkerProcess
from tandem.edge import EdgeRuntime
from tandem.reference.digits import load_workload
from tandem.reference.models import CLOUD, EDGE, build_reference_models
from tandem.router.policy import policy_from_dict
from tandem.runtime import tracing

GUARDS_PER_REQUEST = 4  # client 1, worker _on_message 2, batch 1 (tracing off)


class _Sink(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that takes everything and keeps nothing."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class _NoExport:
    """A span exporter that drops spans (the edge's cost without a network)."""

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def guard_ns(number: int = 2_000_000) -> tuple[float, float]:
    """ns per ``if tracing.TRACER is not None`` (off) and per ``pass``, best of 5."""
    g = {"tracing": tracing}
    guard = min(timeit.repeat("if tracing.TRACER is not None: pass", globals=g, number=number))
    empty = min(timeit.repeat("pass", globals=g, number=number))
    return guard / number * 1e9, empty / number * 1e9


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models-dir", type=Path, default=None)
    ap.add_argument("-n", type=int, default=4000, help="samples per side")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    models = build_reference_models(args.models_dir)
    x = load_workload().test.x[0]
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{sink.server_address[1]}/v1/traces"
    base = {"bind": "tcp://127.0.0.1:*", "models_dir": str(models), "models": [EDGE, CLOUD]}
    base["threads"] = 1
    with (
        tempfile.TemporaryDirectory() as tmp,
        WorkerProcess(WorkerConfig.model_validate(base)) as w_off,
        WorkerProcess(
            WorkerConfig.model_validate({**base, "tracing": {"otlp_endpoint": url}})
        ) as w_on,
    ):

        def policy(endpoint: str) -> Any:
            task = {
                "local": {"path": str(models / "edge-int8.onnx")},
                "gate": {"metric": "max_prob", "threshold": 1.0},
                "cloud": {"endpoint": endpoint, "model": CLOUD},
                "deadline_ms": 5000,
            }
            return policy_from_dict({"tasks": {"digits": task}}, base_dir=tmp)

        off = EdgeRuntime(policy(w_off.endpoint))  # made while tracing is off: no wrapper
        tracing.configure(None, "bench-edge", exporter=_NoExport())
        on = EdgeRuntime(policy(w_on.endpoint))  # the tandem.infer wrapper
        tracer = tracing.TRACER
        parts: dict[str, list[np.ndarray]] = {"off": [], "on": []}
        try:
            for _ in range(args.rounds):
                tracing.TRACER = None
                parts["off"].append(sample_us(lambda: off.infer(x), args.n // args.rounds))
                tracing.TRACER = tracer
                parts["on"].append(sample_us(lambda: on.infer(x), args.n // args.rounds))
            assert off.infer(x).tier.value == "cloud" and on.infer(x).tier.value == "cloud"
        finally:
            tracing.TRACER = tracer
            on.close()
            off.close()
            tracing.shutdown()  # the last user: flushes
    sink.shutdown()
    g_ns, e_ns = guard_ns()
    res = {k: pct(np.concatenate(v)) for k, v in parts.items()}
    extra = res["on"]["p50"] - res["off"]["p50"]
    rows = [
        ["off (reference)", res["off"]["p50"], res["off"]["p99"], 0.0],
        ["on", res["on"]["p50"], res["on"]["p99"], extra],
    ]
    off_ns = (g_ns - e_ns) * GUARDS_PER_REQUEST
    data = {
        **res,
        "on_minus_off_p50_us": extra,
        "guard_ns": g_ns,
        "empty_ns": e_ns,
        "off_hooks_ns_per_request": off_ns,
        "guards_per_request": GUARDS_PER_REQUEST,
    }
    emit(
        "tracing_overhead",
        f"escalated infer, µs (tracing off: {GUARDS_PER_REQUEST} guards = {off_ns:.0f} ns; "
        f"one guard {g_ns:.1f} ns vs pass {e_ns:.1f} ns)",
        ["tracing", "p50 µs", "p99 µs", "p50 - off µs"],
        rows,
        data,
        args.json,
    )


if __name__ == "__main__":
    main()
