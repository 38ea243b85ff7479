"""An edge-tier answer through EdgeRuntime vs a bare ONNX Runtime call, same run.

``python -m benchmarks.serving.edge``

* **Reference**: the same ONNX Runtime call the SDK makes — the bound C++ session's ``run``
  (``InferenceSession._sess.run``, which skips the Python-side re-validation of the public
  ``InferenceSession.run``) — on the reference edge model (int8 MLP), one row, intra-op
  threads = 1 and inter-op threads = 1, as the SDK's session. The public
  ``InferenceSession.run`` is shown too: what a user without Tandem would call.
* **Tandem**: :meth:`EdgeRuntime.infer` on the same model and input with a full policy (gate,
  tag rules, budget, cloud target, escalation log) whose gate accepts the answer, so the call
  stays on the device: input checks, the model, the confidence kernel, the rules, the gate, the
  Result. ``route`` is the runtime's own timing of confidence + rules + gate.

Goals: Tandem p50 ≤ 1.5× the same call (``_sess.run``); routing overhead p99 < 20 µs.
Both sides run in this one thread of this one process.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import emit, interleaved_us, pct
from tandem.edge import EdgeRuntime, Tier
from tandem.reference.digits import load_workload
from tandem.reference.models import EDGE, build_reference_models
from tandem.runtime.manifest import load_manifest

GOAL_RATIO = 1.5
GOAL_ROUTE_P99_US = 20.0


def main(argv: list[str] | None = None) -> None:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=50_000, help="calls per side")
    ap.add_argument("--models-dir", type=Path, default=None)
    ap.add_argument("--json", default=None, help="default bench-edge.json")
    args = ap.parse_args(argv)

    models = build_reference_models(args.models_dir)
    model_path = models / load_manifest(models).get(EDGE).file
    x = load_workload().test.x[0]

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x[None]}
    out_names = [session.get_outputs()[0].name]
    bound = session._sess  # what OnnxBackend calls

    with tempfile.TemporaryDirectory() as tmp:
        policy = {
            "escalation_log": {"path": str(Path(tmp) / "esc.sqlite")},
            "tasks": {
                "digits": {
                    "local": {"path": str(model_path)},
                    "cloud": {"endpoint": "tcp://127.0.0.1:9", "model": "digits-cloud"},
                    "gate": {"metric": "max_prob", "threshold": 0.0},  # always accept
                    "rules": [
                        {"tag": "private", "route": "local"},
                        {"tag": "critical", "route": "cloud"},
                    ],
                    "budget": {"escalations_per_s": 100},
                    "deadline_ms": 50,
                }
            },
        }
        path = Path(tmp) / "policy.yaml"
        path.write_text(yaml.safe_dump(policy))
        with EdgeRuntime.from_policy(path) as rt:
            r = rt.infer(x, "digits")
            assert r.tier is Tier.EDGE
            np.testing.assert_allclose(r.output, session.run(None, feed)[0][0], rtol=1e-6)
            route_us = [rt.infer(x, "digits").timings["route"] * 1e3 for _ in range(args.n)]

            s = interleaved_us(
                {
                    "bound": lambda: bound.run(out_names, feed, None),
                    "public": lambda: session.run(out_names, feed),
                    "tandem": lambda: rt.infer(x, "digits"),
                },
                args.n,
            )
    bare, public, tandem = pct(s["bound"]), pct(s["public"]), pct(s["tandem"])
    route = pct(np.array(route_us))
    ratio = tandem["p50"] / bare["p50"]
    rows = [
        [
            "onnxruntime session._sess.run (the SDK's call)",
            bare["p50"],
            bare["p90"],
            bare["p99"],
            "",
            "",
        ],
        [
            "onnxruntime session.run (public)",
            public["p50"],
            public["p90"],
            public["p99"],
            f"{public['p50'] / bare['p50']:.2f}×",
            "",
        ],
        [
            "EdgeRuntime.infer (edge tier)",
            tandem["p50"],
            tandem["p90"],
            tandem["p99"],
            f"{ratio:.2f}×",
            "yes" if ratio <= GOAL_RATIO else "NO",
        ],
        [
            "  of which routing (confidence + rules + gate)",
            route["p50"],
            route["p90"],
            route["p99"],
            "",
            "yes" if route["p99"] < GOAL_ROUTE_P99_US else "NO",
        ],
    ]
    emit(
        "edge",
        f"edge-tier latency, one row, µs (goal: p50 ≤ {GOAL_RATIO}× the same ORT call; routing p99 < "
        f"{GOAL_ROUTE_P99_US:.0f} µs)",
        ["", "p50", "p90", "p99", "ratio p50", "goal"],
        rows,
        {
            "bound_run_us": bare,
            "public_run_us": public,
            "tandem_us": tandem,
            "route_us": route,
            "ratio_p50": ratio,
            "goal_ratio": GOAL_RATIO,
            "goal_route_p99_us": GOAL_ROUTE_P99_US,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
