"""**cascade** — the sorting task's held-out items (``--difficulties``, ``--n`` per difficulty):
exact-match accuracy, escalation rate, end-to-end latency p50/p95 and time to first token p50,
through ``EdgeRuntime.generate(stream=True)`` with the edge GGUF on the device and a worker
process serving ``sort-cloud`` on loopback, for: edge only (no cloud target); cloud only (a tag
rule); each gate — ``token_mean``, ``token_min``, ``token_quantile`` (q 0.1) after a probe of 8
tokens, ``first_entropy`` up front — and mid-stream escalation (``token_min`` over a window of
8). Hand-off ``restart``: an escalated item's answer is the cloud's own answer from the prompt.
Each gate's threshold is calibrated on a **calibration split** (the held-out items after the
test items, same difficulties) with :func:`tandem.router.calibrate.pick_threshold` (the fewest
escalations recovering 80% of the cloud−edge gap there), never on the test items.

*CPT(80%)* (RouteLLM's "calls to the strong model for 80% of its gain"), per gate, on the test
items, offline: one edge-only pass gives every item's token log-probs and first-token entropy
and whether the edge was right; one cloud-only pass whether the cloud was right. Each item's gate
score is the router's own :class:`~tandem.router.routing.TokenGate` score, for the gate's task
as the policy validates it, over the log-probs the live gate looks at (probe: the first 8
tokens; mid-stream: the lowest window score along the answer; up front: the normalised entropy,
as 1 − it in the sweep, which escalates the lowest).
Escalating the k least confident items for every k (a threshold sweep,
:func:`~tandem.router.calibrate.routing_curve`) gives accuracy vs escalation rate; CPT(80%) is
the lowest escalation rate whose accuracy recovers ≥ 80% of the gap
(:func:`~tandem.router.calibrate.escalation_for_recovery`). A router that escalates at random
needs 80%. With hand-off ``restart`` and greedy decoding the sweep is exact: the live runs at
the calibrated threshold land on one of its points (the JSON holds both, as a check: there the
gate's own ``accepts`` decides).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.llm.harness import N_CTX, Bench, percentile, say
from tandem.reference import lm_task
from tandem.reference.lm_models import CLOUD
from tandem.reference.lm_task import SortItem

if TYPE_CHECKING:
    from tandem.router.policy import GenerateTaskPolicy, Policy

TARGET_RECOVERY = 0.8  # CPT(80%), and the calibration target
PROBE_TOKENS = 8
WINDOW = 8
# The gates compared: each a generate task's gate and mode as a policy file writes them (the
# threshold is calibrated).
GATES: dict[str, dict[str, Any]] = {
    "token_mean, probe": {"gate": {"metric": "token_mean"}, "mode": "probe"},
    "token_min, probe": {"gate": {"metric": "token_min"}, "mode": "probe"},
    "token_quantile q0.1, probe": {
        "gate": {"metric": "token_quantile", "quantile": 0.1},
        "mode": "probe",
    },
    "first_entropy, upfront": {"gate": {"metric": "first_entropy"}, "mode": "upfront"},
    "token_min, midstream": {"gate": {"metric": "token_min"}, "mode": "midstream"},
}
COLUMNS = [
    "mode",
    "threshold",
    "accuracy",
    "escalated",
    "p50 ms",
    "p95 ms",
    "TTFT p50 ms",
    "CPT(80%)",
]


def gate_policy(
    thresholds: dict[str, float], local: dict[str, Any], cloud: dict[str, Any]
) -> Policy:
    """A policy with each gate of :data:`GATES` as a generate task at its threshold, validated
    by the policy loader: the tasks the edge runs, and whose gate, mode, probe and window the
    offline scoring reads."""
    from tandem.router.policy import policy_from_dict

    tasks = {
        name: {
            "kind": "generate",
            "local": local,
            "cloud": cloud,
            "gate": {**g["gate"], "threshold": thresholds[name]},
            "mode": g["mode"],
            "probe_tokens": PROBE_TOKENS,
            "window": WINDOW,
            "handoff": "restart",
        }
        for name, g in GATES.items()
    }
    return policy_from_dict({"tasks": tasks})


def answer_score(
    task: GenerateTaskPolicy, logprobs: Sequence[float], first_entropy: float | None
) -> float:
    """The score ``task``'s live gate decides on for an answer whose edge tokens have
    ``logprobs``: :meth:`TokenGate.score <tandem.router.routing.TokenGate.score>` over the first
    ``probe_tokens`` (mode probe; 1.0 when the model ended at once), or the lowest over every
    window of ``window`` tokens as the answer grows (midstream; inf when nothing was generated);
    up front, the first token's normalised entropy the live gate scored (``first_entropy``, an
    edge-only answer's confidence). NaN: unknown."""
    from tandem.router.policy import EscalationMode
    from tandem.router.routing import TokenGate

    gate = TokenGate(task.gate)
    if task.mode is EscalationMode.UPFRONT:
        return math.nan if first_entropy is None else first_entropy
    if task.mode is EscalationMode.PROBE:
        return gate.probe_score(list(logprobs[: task.probe_tokens]))
    if not logprobs:  # midstream: nothing generated, nothing to doubt
        return math.inf
    lp = list(logprobs)
    return min(gate.window_score(lp[:k], task.window) for k in range(1, len(lp) + 1))


def _confidence(task: GenerateTaskPolicy, score: float) -> float:
    """``score`` oriented as :mod:`tandem.router.calibrate` wants it, escalating the lowest:
    the first-entropy gate escalates the highest, so it becomes 1 − score."""
    from tandem.router.policy import TokenGateMetric

    return 1.0 - score if task.gate.metric is TokenGateMetric.FIRST_ENTROPY else score


def _calibrated(task: GenerateTaskPolicy, curve: Any) -> float:
    """The policy threshold for ``task``'s gate from a calibration curve of
    :func:`_confidence` values."""
    from tandem.router.calibrate import pick_threshold
    from tandem.router.policy import TokenGateMetric

    t = pick_threshold(curve, TARGET_RECOVERY)
    return (
        float(np.clip(1.0 - t, 0.0, 1.0))
        if task.gate.metric is TokenGateMetric.FIRST_ENTROPY
        else t
    )


@dataclass
class Answer:
    """One item's answer through the edge runtime."""

    correct: bool
    escalated: bool
    degraded: bool
    latency_ms: float
    ttft_ms: float
    logprobs: list[float]
    confidence: float | None  # the gate's score (edge-only: normalised first-token entropy)


def _ask(rt: Any, task: str, item: SortItem, tags: frozenset[str] = frozenset()) -> Answer:
    t0 = time.perf_counter()
    with rt.generate(
        item.prompt, task, max_tokens=item.difficulty + 1, tags=tags, stream=True
    ) as s:
        for _ in s:
            pass
    wall = (time.perf_counter() - t0) * 1e3
    r = s.result
    assert r is not None
    return Answer(
        correct=lm_task.score(r.text, item),
        escalated=r.escalated_at is not None,
        degraded=r.degraded,
        latency_ms=wall,
        ttft_ms=r.timings.get("ttft", math.nan),
        logprobs=list(r.logprobs),
        confidence=r.confidence,
    )


def run(b: Bench) -> tuple[dict[str, Any], list[list[Any]]]:
    """Calibrate each gate, run the test items through every mode, and sweep offline. Returns
    the JSON and the table's rows."""
    from tandem.edge import EdgeRuntime
    from tandem.router.calibrate import escalation_for_recovery, routing_curve
    from tandem.router.policy import policy_from_dict

    z, t = b.sizes, b.threads
    w = b.worker()
    test, cal = [], []
    for d in z.difficulties:
        items = lm_task.held_out(d, z.cascade_n + z.cascade_cal_n)
        test += items[: z.cascade_n]
        cal += items[z.cascade_n :]
    local = {"path": str(b.edge_gguf), "threads": t, "n_ctx": N_CTX}
    cloud = {"endpoint": w.endpoint, "model": CLOUD}
    base = {
        "edge": {  # no cloud target; its gate (never escalating) records the first entropy
            "kind": "generate",
            "local": local,
            "gate": {"metric": "first_entropy", "threshold": 1.0},
            "mode": "upfront",
        },
        "cloud": {
            "kind": "generate",
            "local": local,
            "cloud": cloud,
            "gate": {"metric": "token_min", "threshold": 0.0},
            "rules": [{"tag": "cloud", "route": "cloud"}],
        },
    }
    to_cloud = frozenset({"cloud"})

    def edge_cloud(rt: Any, items: list[SortItem]) -> tuple[list[Answer], list[Answer]]:
        e, c = [], []
        for it in items:
            e.append(_ask(rt, "edge", it))
            c.append(_ask(rt, "cloud", it, to_cloud))
        return e, c

    # the gates' tasks as the edge runs them; scoring does not depend on the threshold
    scoring: dict[str, Any] = gate_policy(dict.fromkeys(GATES, 0.5), local, cloud).tasks

    def curves(e: list[Answer], c: list[Answer]) -> dict[str, Any]:
        ec = np.array([a.correct for a in e], float)
        cc = np.array([a.correct for a in c], float)
        return {
            name: routing_curve(
                np.array(
                    [_confidence(task, answer_score(task, a.logprobs, a.confidence)) for a in e]
                ),
                ec,
                cc,
            )
            for name, task in scoring.items()
        }

    with EdgeRuntime(policy_from_dict({"tasks": base})) as rt:
        say(f"cascade: calibrating on {len(cal)} items")
        edge_cloud(rt, cal[:2])  # warm-up
        cal_curves = curves(*edge_cloud(rt, cal))
        thresholds = {name: _calibrated(scoring[name], c) for name, c in cal_curves.items()}
        live = gate_policy(thresholds, local, cloud)
        with EdgeRuntime(live) as rg:
            say(f"cascade: {len(test)} test items × {len(GATES) + 2} modes")
            for name in GATES:
                _ask(rg, name, cal[0])  # warm-up
            runs: dict[str, list[Answer]] = {k: [] for k in ("edge only", "cloud only", *GATES)}
            for i, it in enumerate(test):
                order = list(runs)
                for name in order[i % len(order) :] + order[: i % len(order)]:
                    if name == "edge only":
                        runs[name].append(_ask(rt, "edge", it))
                    elif name == "cloud only":
                        runs[name].append(_ask(rt, "cloud", it, to_cloud))
                    else:
                        runs[name].append(_ask(rg, name, it))
    test_curves = curves(runs["edge only"], runs["cloud only"])
    edge_acc = float(np.mean([a.correct for a in runs["edge only"]]))
    cloud_acc = float(np.mean([a.correct for a in runs["cloud only"]]))
    data: dict[str, Any] = {
        "difficulties": list(z.difficulties),
        "n_test_per_difficulty": z.cascade_n,
        "n_calibration_per_difficulty": z.cascade_cal_n,
        "probe_tokens": PROBE_TOKENS,
        "window": WINDOW,
        "handoff": "restart",
        "target_recovery": TARGET_RECOVERY,
        "edge_accuracy": edge_acc,
        "cloud_accuracy": cloud_acc,
        "modes": {},
    }
    rows = []
    for name, answers in runs.items():
        m = _mode_stats(answers, test, z.difficulties)
        thr = cpt = ""
        if name in GATES:
            curve = test_curves[name]
            m["threshold"] = thresholds[name]
            # CPT is undefined without a gap to recover
            m["cpt80"] = (
                escalation_for_recovery(curve, TARGET_RECOVERY) if cloud_acc > edge_acc else None
            )
            m.update(_offline_point(live.tasks[name], runs["edge only"], runs["cloud only"]))
            thr = f"{thresholds[name]:.3g}"
            cpt = "no gap" if m["cpt80"] is None else f"{m['cpt80']:.0%}"
        data["modes"][name] = m
        rows.append(
            [
                name,
                thr,
                f"{m['accuracy']:.1%}",
                f"{m['escalation_rate']:.0%}",
                f"{m['latency_p50_ms']:.1f}",
                f"{m['latency_p95_ms']:.1f}",
                f"{m['ttft_p50_ms']:.1f}",
                cpt,
            ]
        )
    return data, rows


def _mode_stats(
    answers: list[Answer], items: list[SortItem], difficulties: Sequence[int]
) -> dict[str, Any]:
    by_d = {d: [a.correct for a, it in zip(answers, items, strict=True) if it.difficulty == d]
            for d in difficulties}  # fmt: skip
    return {
        "accuracy": float(np.mean([a.correct for a in answers])),
        "escalation_rate": float(np.mean([a.escalated for a in answers])),
        "degraded": int(sum(a.degraded for a in answers)),
        "latency_p50_ms": percentile([a.latency_ms for a in answers], 50),
        "latency_p95_ms": percentile([a.latency_ms for a in answers], 95),
        "ttft_p50_ms": percentile([a.ttft_ms for a in answers], 50),
        "accuracy_by_difficulty": {str(d): float(np.mean(v)) for d, v in by_d.items()},
    }


def _offline_point(
    task: GenerateTaskPolicy, edge: list[Answer], cloud: list[Answer]
) -> dict[str, float]:
    """The sweep's point at ``task``'s (calibrated) threshold, each item decided by the gate's
    own :meth:`~tandem.router.routing.TokenGate.accepts`: what the live run should give (a
    check)."""
    from tandem.router.routing import TokenGate

    gate = TokenGate(task.gate)
    esc = np.array([not gate.accepts(answer_score(task, a.logprobs, a.confidence)) for a in edge])
    right = [(c if x else e).correct for x, e, c in zip(esc, edge, cloud, strict=True)]
    return {"offline_escalation_rate": float(esc.mean()), "offline_accuracy": float(np.mean(right))}


def title(b: Bench, data: dict[str, Any]) -> tuple[str, str]:
    """The table's title and its note."""
    z, t = b.sizes, b.threads
    return (
        f"cascade on held-out sorting items, lengths {list(z.difficulties)}, "
        f"{z.cascade_n} per length (thresholds from {z.cascade_cal_n} per length of a "
        f"calibration split), {t} threads",
        f"edge {data['edge_accuracy']:.1%}, cloud {data['cloud_accuracy']:.1%}; CPT(80%): "
        "escalations needed for 80% of the gap, offline sweep on the test items (random: "
        "80%); probe 8 tokens, midstream window 8, hand-off restart",
    )
