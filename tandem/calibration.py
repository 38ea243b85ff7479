"""``tandem calibrate`` as a library: a task's gate calibrated on labelled data, to a target
the user states, written into the policy as a reviewable change.

:func:`calibrate_task` is the library call behind the command (:mod:`tandem.cli.calibrate`,
which parses, calls it and prints). The steps:

1. Rows (:mod:`tandem.calibration_rows`): what the edge and the cloud answered on labelled
   data: an ``.npz``, the escalation log (only audited rows choose thresholds), or the
   reference corrupted digits.
2. Temperature scaling of the edge's logits (classification) or a power calibration of a token
   gate's score (generation); ECE before and after, a reliability diagram on request.
3. The threshold the objective asks for, with bootstrap 95% intervals
   (:func:`tandem.router.calibrate.choose_threshold`); held-out figures with ``--holdout``.
4. The edit: gate threshold and temperature, a ``calibration:`` record (date, objective, data
   digest, model versions, intervals, score deciles), shown as a diff; written with ``--write``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tandem.calibration_rows import MIN_AUDITED_ROWS, Progress, Rows, load_rows
from tandem.runtime.errors import ConfigError


# ------------------------------------------------------------------------------- scoring
def gate_scores(rows: Rows, gate: Any, temperature: float | None = None) -> np.ndarray:
    """``gate``'s score for every row in the accept convention (higher = more confident,
    escalate when below the threshold); ``temperature`` overrides a confidence gate's."""
    from tandem.router.calibrate import accept_scores, to_accept_scores
    from tandem.router.policy import GateSpec, LearnedGateSpec, TokenGateSpec
    from tandem.router.routing import TokenGate

    if isinstance(gate, GateSpec):
        assert rows.logits is not None
        t = gate.temperature if temperature is None else temperature
        return accept_scores(rows.logits, gate.metric.value, t)
    if isinstance(gate, LearnedGateSpec):
        try:
            from tandem.router.learned import load_router
        except ImportError as e:
            raise ConfigError(f"a learned gate needs tandem.router.learned ({e})") from None
        assert rows.logits is not None
        router = load_router(gate.model, n_classes=rows.logits.shape[1])
        try:
            return np.asarray(router.score_batch(rows.logits), np.float64)
        except ValueError as e:  # e.g. a router that reads the edge's hidden vector too
            raise ConfigError(f"{gate.model}: cannot score the calibration rows: {e}") from None
    assert isinstance(gate, TokenGateSpec) and rows.logprobs is not None
    tg = TokenGate(gate)
    if gate.metric.value == "first_entropy":  # not in the log's log-probs: use what was logged
        raw = rows.logged_scores if rows.logged_scores is not None else np.full(len(rows), np.nan)
    else:
        raw = np.array([tg.probe_score(lp) for lp in rows.logprobs], np.float64)
    return to_accept_scores(gate.metric.value, raw)


def accept_threshold(gate: Any) -> float:
    """A gate's policy threshold in the accept convention."""
    from tandem.router.calibrate import to_accept_scores

    metric = getattr(gate, "metric", None)
    return float(to_accept_scores(metric.value if metric else "", np.array(gate.threshold)))


# ------------------------------------------------------------------------------- the report
@dataclass
class CalibrationReport:
    task: str
    kind: str  # classify | generate
    objective: str
    source: str
    rows: int  # rows the temperature was fitted on
    threshold_rows: int  # rows the threshold was chosen on
    audited_rows: int | None  # escalation log only
    temperature: float | None  # written to the policy (confidence gates), else None
    score_temperature: float | None  # generation: the token score's power calibration
    ece_before: float
    ece_after: float
    threshold: float  # as the policy states it
    choice: Any  # router.calibrate.Choice
    holdout: dict[str, Any] | None
    comparison: dict[str, Any] | None
    edit: Any  # router.policy_edit.PolicyEdit
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        c = self.choice
        return {
            "task": self.task,
            "kind": self.kind,
            "objective": self.objective,
            "source": self.source,
            "rows": self.rows,
            "threshold_rows": self.threshold_rows,
            "audited_rows": self.audited_rows,
            "temperature": self.temperature,
            "score_temperature": self.score_temperature,
            "ece": {"before": self.ece_before, "after": self.ece_after},
            "threshold": self.threshold,
            "objective_met": c.met,
            "escalation_rate": c.escalation_rate.as_dict(),
            "accuracy": c.accuracy.as_dict(),
            "edge_accuracy": c.on_data.edge_accuracy,
            "cloud_accuracy": c.on_data.cloud_accuracy,
            "expected_cost": c.on_data.cost,
            "holdout": self.holdout,
            "comparison": self.comparison,
            "policy_changed": self.edit.changed,
            "calibration": self.edit.policy.tasks[self.task].calibration.model_dump(mode="json"),
            "notes": self.notes,
        }


def _r(v: float, digits: int = 6) -> float:
    return round(float(v), digits)


def _threshold_rows(rows: Rows, source: str, task: str, allow_biased: bool) -> Rows:
    audited = int(rows.unbiased.sum())
    if audited >= MIN_AUDITED_ROWS or (audited == len(rows) and audited > 0):
        return rows.subset(rows.unbiased)
    if allow_biased:
        rows.notes.append(
            f"threshold chosen on {len(rows)} escalated rows (--allow-biased): they are the "
            "edge's least confident, so the escalation rate and accuracy are biased"
        )
        return rows
    raise ConfigError(
        f"{source}: {audited} audited rows of task {task!r} (reason 'audit'); a threshold "
        f"needs at least {MIN_AUDITED_ROWS}, because the other rows escalated for low "
        f"confidence and are no sample of traffic. Set tasks.{task}.audit_rate (e.g. 0.02) in "
        "the policy and let traffic run, calibrate from a labelled .npz, or pass "
        "--allow-biased to use the escalated rows anyway."
    )


def calibrate_task(
    policy_path: str | Path,
    task: str,
    source: str,
    *,
    objective: str = "recovery=0.9",
    holdout: str | None = None,
    fit_temperature: bool = True,
    allow_biased: bool = False,
    compare: bool = False,
    plot: str | Path | None = None,
    seed: int = 0,
    n_boot: int = 1000,
    n_bins: int = 15,
    progress: Progress = lambda _: None,
) -> CalibrationReport:
    """Calibrate ``task``'s gate on ``source`` (see :func:`load_rows`) to ``objective``
    (:func:`tandem.router.calibrate.parse_objective`) and return the report with the policy
    edit, validated and not written (``report.edit.write()``)."""
    from tandem.router import calibrate as cal
    from tandem.router.policy import GateSpec, load_policy
    from tandem.router.policy_edit import edit_task

    obj = cal.parse_objective(objective)
    path = Path(policy_path)
    policy = load_policy(path)
    if task not in policy.tasks:
        raise ConfigError(f"{path}: no task {task!r} (tasks: {', '.join(sorted(policy.tasks))})")
    tp = policy.tasks[task]
    generate = tp.kind == "generate"
    rows = load_rows(source, task, tp, progress)
    is_log = not source.startswith("reference") and Path(source).suffix != ".npz"
    trows = _threshold_rows(rows, source, task, allow_biased) if is_log else rows
    gate = tp.gate
    metric = getattr(gate, "metric", None)
    metric_name = metric.value if metric is not None else "learned"
    temperature = score_t = None
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if generate:
        progress("calibrating the token gate's score")
        s = gate_scores(rows, gate)
        score_t = cal.fit_score_temperature(s, rows.edge_correct)
        curves = {
            "before": (s, rows.edge_correct),
            "after": (cal.scale_scores(s, score_t), rows.edge_correct),
        }
    else:
        assert rows.logits is not None and rows.labels is not None
        t0 = gate.temperature if isinstance(gate, GateSpec) else 1.0
        t1 = t0
        if fit_temperature:
            progress(f"fitting a temperature on {len(rows)} rows")
            t1 = cal.fit_temperature(rows.logits, rows.labels)
        if isinstance(gate, GateSpec) and fit_temperature:
            temperature = t1
        curves = {
            f"before (T={t0:.3g})": (rows.logits / t0, rows.labels),
            f"after (T={t1:.3g})": (rows.logits / t1, rows.labels),
        }
    (b_a, b_l), (a_a, a_l) = curves.values()
    ece_before = cal.expected_calibration_error(b_a, b_l, n_bins)
    ece_after = cal.expected_calibration_error(a_a, a_l, n_bins)
    if plot is not None:
        cal.reliability_diagram(plot, curves, n_bins=n_bins, title=f"{task}: reliability")

    progress(f"choosing the threshold for {obj} on {len(trows)} rows")
    scores = gate_scores(trows, gate, temperature)
    choice = cal.choose_threshold(
        scores, trows.edge_correct, trows.cloud_correct, obj, seed=seed, n_boot=n_boot
    )
    threshold = cal.to_policy_threshold(metric_name, choice.threshold)
    record = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "objective": str(obj),
        "data": {"source": rows.source, "sha256": rows.sha256, "rows": len(trows)},
        "models": rows.models,
        "escalation_rate": {k: _r(v) for k, v in choice.escalation_rate.as_dict().items()},
        "accuracy": {k: _r(v) for k, v in choice.accuracy.as_dict().items()},
        "score_quantiles": cal.score_deciles(metric_name, scores),
    }
    edit = edit_task(path, task, threshold=threshold, temperature=temperature, calibration=record)

    held = None
    if holdout is not None:
        hrows = load_rows(holdout, task, tp, progress, holdout=True)
        h_is_log = not holdout.startswith("reference") and Path(holdout).suffix != ".npz"
        if h_is_log:
            hrows = _threshold_rows(hrows, holdout, task, allow_biased)
        ev = cal.evaluate_threshold(
            gate_scores(hrows, gate, temperature),
            hrows.edge_correct,
            hrows.cloud_correct,
            choice.threshold,
            obj.cost,
        )
        p_esc, p_acc = choice.predict(ev.n, seed=seed, n_boot=n_boot)
        held = {
            "source": hrows.source,
            "rows": ev.n,
            "escalation_rate": ev.escalation_rate,
            "accuracy": ev.accuracy,
            "edge_accuracy": ev.edge_accuracy,
            "cloud_accuracy": ev.cloud_accuracy,
            "cost": ev.cost,
            "objective_met": cal._met(obj, ev),
            "predicted_escalation_rate": p_esc.as_dict(),
            "predicted_accuracy": p_acc.as_dict(),
            "within_prediction": ev.escalation_rate in p_esc and ev.accuracy in p_acc,
        }
        if not generate and hrows.logits is not None:
            t0 = gate.temperature if isinstance(gate, GateSpec) else 1.0
            t1 = temperature or t0
            held["ece_before"] = cal.expected_calibration_error(
                hrows.logits / t0, hrows.labels, n_bins
            )
            held["ece_after"] = cal.expected_calibration_error(
                hrows.logits / t1, hrows.labels, n_bins
            )

    comparison = _compare(trows, tp, edit, task, temperature) if compare else None
    return CalibrationReport(
        task=task,
        kind=tp.kind,
        objective=str(obj),
        source=rows.source,
        rows=len(rows),
        threshold_rows=len(trows),
        audited_rows=int(rows.unbiased.sum()) if is_log else None,
        temperature=temperature,
        score_temperature=score_t,
        ece_before=ece_before,
        ece_after=ece_after,
        threshold=threshold,
        choice=choice,
        holdout=held,
        comparison=comparison,
        edit=edit,
        notes=rows.notes,
    )


def _compare(
    rows: Rows, tp: Any, edit: Any, task: str, temperature: float | None
) -> dict[str, Any]:
    """The active gate as the policy states it now, the calibrated one, and the shadow gate,
    on the same rows."""
    from tandem.router.calibrate import compare_gates

    if tp.shadow is None:
        raise ConfigError(f"tasks.{task}.shadow: no shadow gate to compare with (--compare)")
    new_gate = edit.policy.tasks[task].gate
    gates = {
        "active": (gate_scores(rows, tp.gate), accept_threshold(tp.gate)),
        "calibrated": (gate_scores(rows, new_gate), accept_threshold(new_gate)),
        "shadow": (gate_scores(rows, tp.shadow.gate), accept_threshold(tp.shadow.gate)),
    }
    reports, _ = compare_gates(gates, rows.edge_correct, rows.cloud_correct)
    _, agree = compare_gates(
        {k: gates[k] for k in ("active", "shadow")}, rows.edge_correct, rows.cloud_correct
    )
    return {
        "rows": len(rows),
        "gates": {
            r.name: {"escalation_rate": r.escalation_rate, "accuracy": r.accuracy, "cpt80": r.cpt80}
            for r in reports
        },
        "active_shadow_agreement": agree,
    }
