"""What co-evolution's gates cost on the edge path: ``EdgeRuntime.infer`` per gate, same run.

``python -m benchmarks.serving.edge_gates``

One row at a time on the reference edge model (int8 MLP), every gate accepting (the request
stays on the device), one runtime per configuration, sampled in interleaved rounds:

* **Reference**: the plain ``max_prob`` gate (what a policy without issue 18's keys runs).
* ``max_prob`` with a calibrated temperature (``gate.temperature: 1.5``);
* a learned router (``gate: {type: learned}``), logistic regression trained here on the
  calibration split's logits;
* ``max_prob`` + a drift alarm (window 1000) + a shadow gate (margin) + ``audit_rate`` 0
  (what a monitored deployment runs).

Goals: routing (the runtime's own ``route`` timing: confidence, rules, gate, shadow, drift)
p99 < 20 µs for every gate; ``infer`` p50 within 2 µs of the reference. Both sides run in this
one thread of this one process.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import emit, interleaved_us, pct
from tandem.edge import EdgeRuntime, Tier
from tandem.reference.digits import load_workload
from tandem.reference.models import CLOUD, EDGE, build_reference_models
from tandem.router.policy import policy_from_dict
from tandem.runtime.manifest import load_manifest

GOAL_ROUTE_P99_US = 20.0
GOAL_EXTRA_P50_US = 2.0


def learned_router(edge: Path, cloud: Path, out: Path) -> Path:
    """A logistic-regression router trained on the calibration split (benefit: the edge is
    wrong and the cloud right)."""
    from tandem.router.learned import FeatureSpec, classify_features, export_router, fit_router
    from tandem.runtime.backends.onnx import OnnxBackend

    calib = load_workload().calib
    logits = OnnxBackend(edge).predict(calib.x)
    cloud_right = OnnxBackend(cloud).predict(calib.x).argmax(1) == calib.y
    benefit = (logits.argmax(1) != calib.y) & cloud_right
    spec = FeatureSpec(n_classes=logits.shape[1])
    fitted = fit_router(classify_features(logits, spec), benefit, model="logistic")
    export_router(fitted, spec, out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=40_000, help="calls per configuration")
    ap.add_argument("--models-dir", type=Path, default=None)
    ap.add_argument("--json", default=None, help="default bench-edge-gates.json")
    args = ap.parse_args(argv)

    models = build_reference_models(args.models_dir)
    manifest = load_manifest(models)
    edge, cloud = models / manifest.get(EDGE).file, models / manifest.get(CLOUD).file
    x = load_workload().test.x[0]
    with tempfile.TemporaryDirectory() as tmp:
        router = learned_router(edge, cloud, Path(tmp) / "router.onnx")
        accept = {"metric": "max_prob", "threshold": 0.0}
        configs: dict[str, dict[str, Any]] = {
            "max_prob (reference)": {"gate": accept},
            "max_prob, temperature 1.5": {"gate": {**accept, "temperature": 1.5}},
            "learned router": {"gate": {"type": "learned", "model": str(router), "threshold": 0.0}},
            "max_prob + drift + shadow": {
                "gate": accept,
                "drift": {"window": 1000},
                "shadow": {"gate": {"metric": "margin", "threshold": 0.5}},
            },
        }
        runtimes = {
            name: EdgeRuntime(
                policy_from_dict({"tasks": {"digits": {"local": {"path": str(edge)}, **c}}})
            )
            for name, c in configs.items()
        }
        try:
            for rt in runtimes.values():
                assert rt.infer(x, "digits").tier is Tier.EDGE
            route = {
                name: pct(
                    np.array([rt.infer(x, "digits").timings["route"] * 1e3 for _ in range(args.n)])
                )
                for name, rt in runtimes.items()
            }
            calls = interleaved_us(
                {name: (lambda rt=rt: rt.infer(x, "digits")) for name, rt in runtimes.items()},
                args.n,
                rounds=10,
            )
        finally:
            for rt in runtimes.values():
                rt.close()
    ref = pct(calls["max_prob (reference)"])
    rows, data = [], {}
    for name in configs:
        c, r = pct(calls[name]), route[name]
        extra = c["p50"] - ref["p50"]
        ok = r["p99"] < GOAL_ROUTE_P99_US and (name.endswith("(reference)") or extra <= 2.0)
        rows.append([name, c["p50"], c["p99"], f"{extra:+.2f}", r["p50"], r["p99"],
                     "yes" if ok else "NO"])  # fmt: skip
        data[name] = {"infer_us": c, "route_us": r, "extra_p50_us": extra}
    emit(
        "edge-gates",
        f"EdgeRuntime.infer per gate, one row, µs (goals: routing p99 < {GOAL_ROUTE_P99_US:.0f}"
        f" µs; infer p50 within {GOAL_EXTRA_P50_US:.0f} µs of the plain max_prob gate)",
        ["gate", "infer p50", "infer p99", "vs reference p50", "route p50", "route p99", "goal"],
        rows,
        data,
        args.json,
    )


if __name__ == "__main__":
    main()
