"""``tandem demo``: the whole request path on the reference workload.

1. Build the reference models if missing (``tandem models build``).
2. Start a cloud worker process serving ``digits-cloud`` on a free loopback port.
3. Calibrate: run the calibration split through both models and pick the gate threshold with
   the fewest escalations that recovers ``target_recovery`` of the edge→cloud accuracy gap
   (:func:`tandem.router.calibrate.pick_threshold`). The test split is not looked at.
4. Write that policy, open an :class:`EdgeRuntime` on it and send every test image through
   ``infer`` one at a time, as a robot would.
5. Report accuracy edge-only / cloud-only / routed, escalation rate, the share of the gap
   routing recovers, latency per tier, model sizes, and the smallest escalation rate that
   recovers 80% of the gap on test (RouteLLM's CPT(80%)).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tandem.cloud.config import WorkerConfig
from tandem.cloud.process import WorkerProcess
from tandem.edge.runtime import EdgeRuntime
from tandem.kernels.confidence import confidence
from tandem.reference.digits import SEVERITIES, load_workload
from tandem.reference.models import (
    CLOUD,
    EDGE,
    EDGE_FP32,
    LABELS,
    MOE,
    build_reference_models,
    cloud_logits,
)
from tandem.router.calibrate import escalation_for_recovery, pick_threshold, routing_curve
from tandem.runtime.backends.onnx import OnnxBackend
from tandem.runtime.client import CloudClient
from tandem.runtime.errors import TandemError
from tandem.runtime.manifest import load_manifest
from tandem.runtime.types import Tier


@dataclass
class DemoReport:
    n_test: int
    threshold: float
    threshold_rule: str
    calib_escalation_rate: float
    edge_accuracy: float
    cloud_accuracy: float
    routed_accuracy: float
    escalation_rate: float
    gap_recovered: float
    cpt80_escalation_rate: float
    tier_counts: dict[str, int]
    latency_ms: dict[str, dict[str, float]]  # tier -> {p50, p95, p99, n}
    sizes: dict[str, int]  # model name -> bytes
    per_severity: list[dict[str, float]] = field(default_factory=list)
    cloud_description: str = ""
    endpoint: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_demo(
    *,
    models_dir: Path | None = None,
    rebuild: bool = False,
    deadline_ms: float = 200.0,
    target_recovery: float = 0.9,
    cloud_model: str = CLOUD,
    progress: Callable[[str], None] = lambda _: None,
) -> DemoReport:
    """``cloud_model``: ``digits-cloud`` (the dense CNN) or ``digits-moe`` (the MoE classifier,
    served on Tandem's MoE kernels)."""
    if cloud_model not in (CLOUD, MOE):
        raise TandemError(f"cloud model must be {CLOUD!r} or {MOE!r}, got {cloud_model!r}")
    models = build_reference_models(
        models_dir, force=rebuild, moe=cloud_model == MOE, progress=progress
    )
    manifest = load_manifest(models)
    data = load_workload(manifest.seed or 0)
    edge_model = OnnxBackend(models / manifest.get(EDGE).file)

    progress("starting a cloud worker process")
    cfg = WorkerConfig(bind="tcp://127.0.0.1:*", models_dir=models, models=[cloud_model])
    with WorkerProcess(cfg) as worker, tempfile.TemporaryDirectory(prefix="tandem-demo-") as tmp:
        assert worker.endpoint is not None
        with CloudClient(worker.endpoint) as client:
            progress("calibrating the gate threshold on the calibration split")
            calib_edge = confidence(edge_model.predict(data.calib.x))
            calib_cloud = cloud_logits(client, cloud_model, data.calib.x).argmax(axis=1)
            curve = routing_curve(
                calib_edge.max_prob,
                calib_edge.top1 == data.calib.y,
                calib_cloud == data.calib.y,
            )
            threshold = pick_threshold(curve, target_recovery)
            calib_esc = float(np.mean(np.nan_to_num(calib_edge.max_prob, nan=-1) < threshold))
            test_cloud = cloud_logits(client, cloud_model, data.test.x).argmax(axis=1)

        policy = {
            "version": 1,
            "escalation_log": {"path": str(Path(tmp) / "escalations.sqlite")},
            "tasks": {
                "digits": {
                    "local": {"path": str(models / manifest.get(EDGE).file), "labels": LABELS},
                    "cloud": {"endpoint": worker.endpoint, "model": cloud_model},
                    "gate": {"metric": "max_prob", "threshold": round(threshold, 6)},
                    "rules": [
                        {"tag": "private", "route": "local"},
                        {"tag": "critical", "route": "cloud"},
                    ],
                    "deadline_ms": int(deadline_ms),
                }
            },
        }
        policy_path = Path(tmp) / "policy.yaml"
        policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))

        progress(f"routing {len(data.test)} test images one at a time through EdgeRuntime")
        with EdgeRuntime.from_policy(policy_path) as rt:
            results = [rt.infer(x, "digits") for x in data.test.x]

    y = data.test.y
    test_edge = confidence(edge_model.predict(data.test.x))
    edge_ok = test_edge.top1 == y
    cloud_ok = test_cloud == y
    routed_ok = np.array([r.index for r in results]) == y
    tiers = np.array([r.tier.value for r in results])
    edge_acc, cloud_acc, routed_acc = (float(a.mean()) for a in (edge_ok, cloud_ok, routed_ok))
    gap = cloud_acc - edge_acc
    test_curve = routing_curve(test_edge.max_prob, edge_ok, cloud_ok)

    latency = {}
    for tier in Tier:
        rs = [r for r in results if r.tier is tier]
        if rs:
            p50, p95, p99 = np.percentile([r.timings["total"] for r in rs], [50, 95, 99])
            latency[tier.value] = {"p50": p50, "p95": p95, "p99": p99, "n": len(rs)}
            for stage in ("local", "route", "cloud", "log"):
                if stage in rs[0].timings:
                    latency[tier.value][f"{stage}_p50"] = float(
                        np.median([r.timings[stage] for r in rs])
                    )
    per_sev = []
    for s in SEVERITIES:
        m = data.test.severity == s
        per_sev.append(
            {
                "severity": s,
                "edge": float(edge_ok[m].mean()),
                "cloud": float(cloud_ok[m].mean()),
                "routed": float(routed_ok[m].mean()),
                "escalated": float((tiers[m] != Tier.EDGE.value).mean()),
            }
        )
    return DemoReport(
        n_test=len(y),
        threshold=threshold,
        threshold_rule=(
            f"the threshold with the fewest escalations whose routed accuracy on the "
            f"calibration split recovers >= {target_recovery:.0%} of the edge→cloud gap"
        ),
        calib_escalation_rate=calib_esc,
        edge_accuracy=edge_acc,
        cloud_accuracy=cloud_acc,
        routed_accuracy=routed_acc,
        escalation_rate=float((tiers != Tier.EDGE.value).mean()),
        gap_recovered=(routed_acc - edge_acc) / gap if gap > 0 else 1.0,
        cpt80_escalation_rate=escalation_for_recovery(test_curve, 0.8),
        tier_counts={t.value: int((tiers == t.value).sum()) for t in Tier},
        latency_ms=latency,
        sizes={
            m.name: m.size_bytes
            for m in manifest.models
            if m.name in (EDGE, EDGE_FP32, cloud_model)
        },
        cloud_description=manifest.get(cloud_model).description,
        per_severity=per_sev,
        endpoint=worker.endpoint or "",
    )


def print_report(r: DemoReport, console: Any) -> None:
    from rich.table import Table

    t = Table(title=f"Tandem demo — corrupted digits, {r.n_test} held-out images")
    t.add_column("")
    t.add_column("accuracy", justify="right")
    t.add_column("escalation rate", justify="right")
    t.add_row("edge only (int8 MLP)", f"{r.edge_accuracy:.1%}", "0.0%")
    t.add_row(f"cloud only ({r.cloud_description})", f"{r.cloud_accuracy:.1%}", "100.0%")
    t.add_row(
        "routed (Tandem)", f"[bold]{r.routed_accuracy:.1%}[/bold]", f"{r.escalation_rate:.1%}"
    )
    console.print(t)
    console.print(
        f"gap recovered by routing: [bold]{r.gap_recovered:.1%}[/bold] of the "
        f"{(r.cloud_accuracy - r.edge_accuracy) * 100:.1f}-point edge→cloud gap\n"
        f"smallest escalation rate recovering 80% of the gap (CPT 80%, test): "
        f"[bold]{r.cpt80_escalation_rate:.1%}[/bold]\n"
        f"gate: escalate when max_prob < {r.threshold:.4f} — {r.threshold_rule} "
        f"(calibration escalation rate {r.calib_escalation_rate:.1%})"
    )
    lat = Table(title="latency per tier (ms, EdgeRuntime.infer end to end)")
    stages = ("local", "route", "cloud", "log")
    for col in ("tier", "n", "p50", "p95", "p99", *(f"{s} p50" for s in stages)):
        lat.add_column(col, justify="right" if col != "tier" else "left")
    for tier, v in r.latency_ms.items():
        lat.add_row(
            tier,
            str(v["n"]),
            *(f"{v[k]:.3f}" for k in ("p50", "p95", "p99")),
            *(f"{v[f'{s}_p50']:.3f}" if f"{s}_p50" in v else "-" for s in stages),
        )
    console.print(lat)
    sev = Table(title="accuracy by corruption severity")
    for col in ("severity", "edge", "cloud", "routed", "escalated"):
        sev.add_column(col, justify="right")
    for row in r.per_severity:
        sev.add_row(
            str(row["severity"]),
            *(f"{row[k]:.1%}" for k in ("edge", "cloud", "routed", "escalated")),
        )
    console.print(sev)
    sizes = Table(title="model sizes")
    sizes.add_column("model")
    sizes.add_column("bytes", justify="right")
    for name, b in r.sizes.items():
        sizes.add_row(name, f"{b:,}")
    if EDGE in r.sizes and EDGE_FP32 in r.sizes:
        sizes.caption = f"edge int8 is {r.sizes[EDGE] / r.sizes[EDGE_FP32]:.0%} of its fp32 size"
    console.print(sizes)
