"""Learned routers vs the confidence gates on the reference digits, same run.

``python -m benchmarks.routing.learned [--json bench-learned-router.json]``

* **Quality.** Routers are trained on the calibration split and judged on the test split (the
  edge: the reference int8 MLP; the cloud: the reference CNN, run here). Each router's
  CPT(80%) is the escalation rate it needs to recover 80% of the edge→cloud accuracy gap
  (:func:`tandem.router.calibrate.escalation_for_recovery`); AUROC is its score as a detector
  of *benefit* (edge wrong, cloud right). Reference: the ``max_prob`` gate, with ``margin``,
  ``entropy`` and the oracle (escalates exactly the rows the cloud fixes) beside it.
  ``learned - max_prob`` carries a 95% paired bootstrap interval.
* **Latency.** One row per call, this one thread: the ``max_prob`` gate
  (:func:`tandem.kernels.confidence_row`, what the edge runs today) vs the learned router's
  jitted row path (:meth:`LearnedRouter.score_row`) and ONNX Runtime on the same router file
  (the bound C++ session's ``run``, intra-op threads = 1, inter-op threads = 1, as the SDK).

Goal: learned router p99 < 20 µs per row. The issue's anchor: logistic regression or gradient
boosting on the calibration split did no better than ``max_prob`` (43.5-48.6% vs 43%).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import interleaved_us, pct, print_table, write_results
from tandem.kernels import confidence_row
from tandem.reference.models import EDGE, build_reference_models
from tandem.router.calibrate import cpt_difference
from tandem.router.learned import load_router
from tandem.router.learned_train import confidence_gate_scores, judge, train_router
from tandem.router_data import reference_digits_examples
from tandem.runtime.manifest import load_manifest

GOAL_P99_US = 20.0
TARGET = 0.8
# (name, model, uses_logits, hidden)
ROUTERS = (
    ("logistic", "logistic", False, None),
    ("mlp", "mlp", False, None),
    ("logistic+logits", "logistic", True, None),
    ("logistic+hidden", "logistic", False, "auto"),
    ("mlp+hidden", "mlp", False, "auto"),
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=20_000, help="latency samples per path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="bench-learned-router.json")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()[0]

    models = build_reference_models()
    edge = models / load_manifest(models).get(EDGE).file
    routers, quality, scores = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="tandem-router-") as tmp:
        plain = reference_digits_examples(edge)
        with_hidden = reference_digits_examples(edge, hidden_tensor="auto")
        test = plain[1]
        for name, model, uses_logits, hidden in ROUTERS:
            tr, ho, tensor = with_hidden if hidden else plain
            report = train_router(
                tr,
                ho,
                Path(tmp) / f"{name}.onnx",
                model=model,
                uses_logits=uses_logits,
                hidden_tensor=tensor,
                seed=args.seed,
                target=TARGET,
            )
            r = load_router(report.path)
            routers[name] = (r, ho)
            scores[name] = r.score_batch(ho.logits, ho.hidden)
            quality[name] = {"model": report.model, "candidates": report.candidates}
        gates = confidence_gate_scores(test.logits)
        rows = []
        for g in judge({**gates, **scores}, test.edge_correct, test.cloud_correct, TARGET):
            d, ci = (None, (None, None))
            if g.name in scores:
                d, ci = cpt_difference(
                    scores[g.name],
                    gates["max_prob"],
                    test.edge_correct,
                    test.cloud_correct,
                    target=TARGET,
                    seed=args.seed,
                )
            quality.setdefault(g.name, {}).update(
                {"cpt80": g.cpt, "auroc": g.auroc, "minus_max_prob": d, "ci95": ci}
            )
            diff = "-" if d is None else f"{100 * d:+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
            rows.append(
                [
                    g.name,
                    quality[g.name].get("model", "-"),
                    f"{100 * g.cpt:.1f}%",
                    f"{g.auroc:.3f}",
                    diff,
                ]
            )
        edge_acc, cloud_acc = test.edge_correct.mean(), test.cloud_correct.mean()
        print_table(
            "routers on the digits test split (trained on calib)",
            ["router", "chosen model", "CPT(80%)", "AUROC (benefit)", "vs max_prob, points"],
            rows,
            f"{len(test)} test rows; edge {edge_acc:.3f}, cloud {cloud_acc:.3f}",
        )

        # latency: one row a call, interleaved so drift in machine load hits all alike
        row = np.ascontiguousarray(test.logits[7], np.float32)
        fns = {"max_prob gate (confidence_row)": lambda: confidence_row(row)}
        for name, (r, ho) in routers.items():
            h = None if ho.hidden is None else np.ascontiguousarray(ho.hidden[7], np.float32)
            fns[f"{name}: jitted row"] = lambda r=r, h=h: r.score_row(row, h)
            feeds = {"logits": row[None]} | ({} if h is None else {"hidden": h[None]})
            run = getattr(r.session, "_sess", r.session).run
            fns[f"{name}: ONNX Runtime"] = lambda run=run, feeds=feeds: run(
                ["p_stand"], feeds, None
            )
        lat = {k: pct(v) for k, v in interleaved_us(fns, args.rows).items()}
    lat_rows = [
        [
            k,
            f"{v['p50']:.2f}",
            f"{v['p99']:.2f}",
            "-" if "max_prob" in k else ("yes" if v["p99"] < GOAL_P99_US else "NO"),
        ]
        for k, v in lat.items()
    ]
    print_table(
        "gate latency per row, µs (one thread)",
        ["path", "p50", "p99", f"p99 < {GOAL_P99_US:g} µs"],
        lat_rows,
        "numba single-threaded; ONNX Runtime intra-op 1, inter-op 1",
    )
    write_results(
        Path(args.json),
        "learned-router",
        {
            "target_recovery": TARGET,
            "rows": args.rows,
            "seed": args.seed,
            "ort_threads": {"intra_op": 1, "inter_op": 1},
            "goal_p99_us": GOAL_P99_US,
        },
        {
            "quality": quality,
            "latency_us": lat,
            "edge_accuracy": float(edge_acc),
            "cloud_accuracy": float(cloud_acc),
        },
        (load0, os.getloadavg()[0]),
    )


if __name__ == "__main__":
    main()
