"""Threshold calibration from held-out data, and the accuracy-vs-escalation curve.

Given, for each held-out example, the edge's gate score and whether edge and cloud were right,
:func:`routing_curve` says what accuracy every threshold buys at what escalation rate.
:func:`pick_threshold` picks the threshold that recovers a target share of the edge→cloud
accuracy gap with the fewest escalations — on a calibration split, never on the test split.
:func:`escalation_for_recovery` is RouteLLM's "calls to the strong model needed for X% of its
gain" (CPT), used to score a router on the test split; :func:`compare_gates` puts gates
side by side (CPT, AUROC for benefit, decisions), :func:`cpt_difference` with an interval.

:func:`choose_threshold` picks a threshold to a target a user states (:func:`parse_objective`:
an escalation budget, accuracy near the cloud's, a share of the gap, or a cost model), with
bootstrap intervals; :func:`evaluate_threshold` checks it on held-out data. Scores are in one
convention, higher = more confident (:func:`accept_scores` turns the entropy gate around).
Temperature scaling and ECE live in :mod:`tandem.runtime.calibration` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from tandem.runtime.calibration import (  # noqa: F401 - calibration's API, in one place
    T_BOUNDS,
    expected_calibration_error,
    fit_score_temperature,
    fit_temperature,
    reliability_bins,
    reliability_diagram,
    scale_scores,
    softmax,
)


@dataclass(frozen=True)
class RoutingCurve:
    """One point per candidate threshold, escalation rate ascending. A request escalates when
    its score is below the threshold (scores where higher means more confident)."""

    thresholds: np.ndarray
    escalation_rate: np.ndarray
    accuracy: np.ndarray
    edge_accuracy: float
    cloud_accuracy: float

    def recovery(self) -> np.ndarray:
        """Share of the edge→cloud accuracy gap recovered at each point (1.0 = all of it)."""
        gap = self.cloud_accuracy - self.edge_accuracy
        if gap <= 0:
            return np.ones_like(self.accuracy)
        return (self.accuracy - self.edge_accuracy) / gap


def routing_curve(
    scores: np.ndarray, edge_correct: np.ndarray, cloud_correct: np.ndarray
) -> RoutingCurve:
    """Accuracy and escalation rate for every distinct threshold over ``scores``."""
    s = np.asarray(scores, dtype=np.float64)
    e = np.asarray(edge_correct, dtype=np.float64)
    c = np.asarray(cloud_correct, dtype=np.float64)
    n = len(s)
    if n == 0 or not (len(e) == len(c) == n):
        raise ValueError(
            "scores, edge_correct and cloud_correct must be equally long and non-empty"
        )
    s = np.where(np.isnan(s), -np.inf, s)  # invalid rows always escalate
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    # Escalating the k least confident: accuracy = cloud on the first k + edge on the rest.
    cloud_prefix = np.concatenate([[0.0], np.cumsum(c[order])])
    edge_suffix = e.sum() - np.concatenate([[0.0], np.cumsum(e[order])])
    finite = s_sorted[np.isfinite(s_sorted)]
    thresholds = np.concatenate([[-np.inf], np.unique(finite), [np.inf]])
    k = np.searchsorted(s_sorted, thresholds, side="left")
    k[-1] = n
    acc = (cloud_prefix[k] + edge_suffix[k]) / n
    return RoutingCurve(thresholds, k / n, acc, float(e.mean()), float(c.mean()))


def pick_threshold(curve: RoutingCurve, target_recovery: float = 0.9) -> float:
    """The threshold with the lowest escalation rate whose accuracy recovers at least
    ``target_recovery`` of the gap; clipped into [0, 1] so it fits a policy file."""
    ok = np.flatnonzero(curve.recovery() >= target_recovery)
    t = curve.thresholds[ok[0]] if len(ok) else np.inf
    return float(np.clip(t, 0.0, 1.0))


def escalation_for_recovery(curve: RoutingCurve, target_recovery: float = 0.8) -> float:
    """Smallest escalation rate at which routing recovers ``target_recovery`` of the gap."""
    ok = np.flatnonzero(curve.recovery() >= target_recovery)
    return float(curve.escalation_rate[ok[0]]) if len(ok) else 1.0


# ---------------------------------------------------------------------------------------------
# Gate scores in one convention: higher = more confident, escalate when below the threshold
# ---------------------------------------------------------------------------------------------

# metrics that escalate when *above* the threshold (normalised entropies)
_ESCALATE_ABOVE = frozenset({"entropy", "first_entropy"})


def accept_scores(logits: np.ndarray, metric: str, temperature: float = 1.0) -> np.ndarray:
    """A confidence gate's score for each row of ``logits / temperature`` (as
    :class:`~tandem.router.routing.ConfidenceGate` takes it from :func:`kernels.confidence`),
    turned so that higher means more confident: ``entropy`` becomes 1 - H / log C. Invalid
    rows are NaN (they always escalate)."""
    from tandem.kernels.confidence import confidence

    z = np.ascontiguousarray(np.asarray(logits, dtype=np.float64) / temperature)
    s = confidence(z)
    metric = str(metric)
    if metric == "max_prob":
        return s.max_prob
    if metric == "margin":
        return s.margin
    if metric == "entropy":
        return 1.0 - s.entropy / np.log(max(z.shape[1], 2))
    raise ValueError(f"unknown confidence gate metric {metric!r}")


def to_accept_scores(metric: str, policy_scores: np.ndarray) -> np.ndarray:
    """A gate's own score (as logged, or as the policy compares it) in the accept convention."""
    s = np.asarray(policy_scores, dtype=np.float64)
    return 1.0 - s if str(metric) in _ESCALATE_ABOVE else s


def to_policy_threshold(metric: str, threshold: float) -> float:
    """A threshold in the accept convention as the policy file states it for ``metric``."""
    t = 1.0 - threshold if str(metric) in _ESCALATE_ABOVE else threshold
    return float(np.clip(round(t, 6), 0.0, 1.0))


def score_deciles(metric: str, accept: np.ndarray) -> list[float]:
    """The gate score's deciles (10%..90%) in the policy's own convention: the drift alarm's
    baseline (:class:`~tandem.router.policy.CalibrationRecord.score_quantiles`)."""
    s = to_accept_scores(metric, accept)  # the map is its own inverse
    s = s[np.isfinite(s)]
    if not len(s):
        return []
    return [round(float(q), 6) for q in np.quantile(s, np.linspace(0.1, 0.9, 9))]


# ---------------------------------------------------------------------------------------------
# Thresholds from targets users state
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostModel:
    """Costs in one unit (e.g. dollars) per request. The expected cost per request of a
    threshold that escalates a share r of requests at routed accuracy a is::

        edge_energy + r * (cloud + cloud_energy + latency_ms * latency_cost) + (1 - a) * error

    The edge runs on every request, so ``edge_energy`` shifts the cost but never the choice."""

    cloud: float = 0.0  # the cloud's price of one escalated request
    latency_ms: float = 0.0  # extra latency an escalation adds, ms
    latency_cost: float = 0.0  # cost of one ms of latency
    error: float = 1.0  # cost of a wrong answer
    edge_energy: float = 0.0  # on-device energy of one request
    cloud_energy: float = 0.0  # energy of one escalation (radio, cloud)

    def per_request(self, escalation_rate: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
        per_escalation = self.cloud + self.cloud_energy + self.latency_ms * self.latency_cost
        return self.edge_energy + escalation_rate * per_escalation + (1 - accuracy) * self.error


@dataclass(frozen=True)
class Objective:
    """What the threshold is chosen for:

    * ``max-escalation=R``: the best routed accuracy escalating at most a share R;
    * ``accuracy-within=P``: routed accuracy within P points (percent) of the cloud's, at the
      fewest escalations;
    * ``recovery=F``: recover a share F of the edge→cloud accuracy gap at the fewest
      escalations (:func:`pick_threshold`);
    * ``cost:KEY=V,...``: the lowest expected cost per request (:class:`CostModel`).
    """

    kind: str
    value: float = 0.0
    cost: CostModel | None = None

    def __str__(self) -> str:
        if self.cost is not None:
            fields = vars(self.cost)
            return "cost:" + ",".join(f"{k}={v:g}" for k, v in fields.items() if v)
        return f"{self.kind}={self.value:g}"


OBJECTIVES = ("max-escalation", "accuracy-within", "recovery", "cost")


def parse_objective(text: str) -> Objective:
    """``"max-escalation=0.2"``, ``"accuracy-within=1.0"``, ``"recovery=0.8"`` or
    ``"cost:cloud=0.002,latency_ms=40,latency_cost=0.0001,error=1.0"``; :class:`ConfigError`
    saying what is expected otherwise."""
    from tandem.runtime.errors import ConfigError

    usage = (
        "expected max-escalation=R (0..1), accuracy-within=POINTS, recovery=F (0..1) or "
        "cost:KEY=VALUE,... with keys " + ", ".join(CostModel.__dataclass_fields__)
    )
    t = text.strip().replace("_", "-") if not text.strip().startswith("cost") else text.strip()
    if t.startswith("cost"):
        body = t[4:].lstrip(":")
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in body.split(","))):
            key, _, v = part.partition("=")
            key = key.strip().replace("-", "_")
            if key not in CostModel.__dataclass_fields__:
                raise ConfigError(f"objective {text!r}: unknown cost key {key!r}; {usage}")
            try:
                values[key] = float(v)
            except ValueError:
                raise ConfigError(f"objective {text!r}: {key} needs a number; {usage}") from None
            if values[key] < 0 or not np.isfinite(values[key]):
                raise ConfigError(f"objective {text!r}: {key} must be finite and >= 0")
        if not values:
            raise ConfigError(f"objective {text!r}: no costs given; {usage}")
        return Objective("cost", cost=CostModel(**values))
    kind, _, v = t.partition("=")
    kind = kind.strip()
    try:
        value = float(v)
    except ValueError:
        raise ConfigError(f"objective {text!r}: {usage}") from None
    if kind not in OBJECTIVES or kind == "cost":
        raise ConfigError(f"objective {text!r}: unknown objective {kind!r}; {usage}")
    top = 100.0 if kind == "accuracy-within" else 1.0
    if not 0.0 <= value <= top:
        raise ConfigError(f"objective {text!r}: {kind} must be between 0 and {top:g}")
    return Objective(kind, value)


@dataclass(frozen=True)
class Estimate:
    """A value on the data with its bootstrap interval (95% unless said)."""

    expected: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"expected": self.expected, "low": self.low, "high": self.high}

    def __contains__(self, v: float) -> bool:
        return self.low <= v <= self.high


@dataclass(frozen=True)
class Evaluation:
    """What one threshold does on one data set (escalate when score < threshold)."""

    threshold: float
    n: int
    escalation_rate: float
    accuracy: float
    edge_accuracy: float
    cloud_accuracy: float
    cost: float | None = None

    @property
    def recovery(self) -> float:
        gap = self.cloud_accuracy - self.edge_accuracy
        return 1.0 if gap <= 0 else (self.accuracy - self.edge_accuracy) / gap


@dataclass(frozen=True)
class Choice:
    """The threshold an objective chose (accept convention: escalate when score < threshold),
    what it does on the data it was chosen on, and bootstrap 95% intervals of the escalation
    rate and routed accuracy a large stream would see at this threshold. :meth:`predict`
    widens them to what a held-out set of n rows would show."""

    objective: Objective
    on_data: Evaluation
    escalation_rate: Estimate
    accuracy: Estimate
    met: bool  # the objective's constraint holds on the data (always True for cost)
    counts: tuple[int, int, int, int]  # rows: (escalated, routed right) in 00, 01, 10, 11

    @property
    def threshold(self) -> float:
        return self.on_data.threshold

    def predict(self, n: int, *, seed: int = 0, n_boot: int = 1000) -> tuple[Estimate, Estimate]:
        """95% prediction intervals for the escalation rate and accuracy observed on ``n`` new
        rows: a bootstrap draw of the row mix, then ``n`` rows drawn from it."""
        rng = np.random.default_rng(seed)
        p = np.asarray(self.counts, dtype=np.float64) / sum(self.counts)
        mixes = rng.dirichlet(np.asarray(self.counts) + 0.5, size=n_boot) if n else p[None]
        draws = np.array([rng.multinomial(n, m) for m in mixes]) / max(n, 1)
        return _estimate(draws[:, 2] + draws[:, 3], p[2] + p[3]), _estimate(
            draws[:, 1] + draws[:, 3], p[1] + p[3]
        )


def _estimate(samples: np.ndarray, expected: float) -> Estimate:
    lo, hi = np.quantile(samples, [0.025, 0.975])
    return Estimate(float(expected), float(min(lo, expected)), float(max(hi, expected)))


def _prepare(
    scores: np.ndarray, edge_correct: np.ndarray, cloud_correct: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    e = np.asarray(edge_correct, dtype=bool)
    c = np.asarray(cloud_correct, dtype=bool)
    if not len(s) or not (len(s) == len(e) == len(c)):
        raise ValueError("scores, edge_correct and cloud_correct must be equally long, non-empty")
    return np.where(np.isnan(s), -np.inf, s), e, c


def evaluate_threshold(
    scores: np.ndarray,
    edge_correct: np.ndarray,
    cloud_correct: np.ndarray,
    threshold: float,
    cost: CostModel | None = None,
) -> Evaluation:
    """Escalation rate and routed accuracy of ``threshold`` on (held-out) data; scores in the
    accept convention, NaN always escalates."""
    s, e, c = _prepare(scores, edge_correct, cloud_correct)
    esc = s < threshold
    routed = np.where(esc, c, e)
    r, a = float(esc.mean()), float(routed.mean())
    return Evaluation(
        threshold=float(threshold),
        n=len(s),
        escalation_rate=r,
        accuracy=a,
        edge_accuracy=float(e.mean()),
        cloud_accuracy=float(c.mean()),
        cost=None if cost is None else float(cost.per_request(np.array(r), np.array(a))),
    )


def _pick(curve: RoutingCurve, objective: Objective) -> int:
    """Index into ``curve`` of the point the objective wants."""
    r, acc = curve.escalation_rate, curve.accuracy
    eps = 1e-12
    if objective.kind == "max-escalation":
        ok = np.flatnonzero(r <= objective.value + eps)
        best = acc[ok].max()
        return int(ok[np.flatnonzero(acc[ok] >= best - eps)[0]])
    if objective.kind == "accuracy-within":
        need = curve.cloud_accuracy - objective.value / 100.0
        ok = np.flatnonzero(acc >= need - eps)
        return int(ok[0]) if len(ok) else len(r) - 1
    if objective.kind == "recovery":
        ok = np.flatnonzero(curve.recovery() >= objective.value - eps)
        return int(ok[0]) if len(ok) else len(r) - 1
    assert objective.cost is not None
    c = objective.cost.per_request(r, acc)
    return int(np.flatnonzero(c <= c.min() + eps)[0])


def _met(objective: Objective, ev: Evaluation) -> bool:
    eps = 1e-9
    if objective.kind == "max-escalation":
        return ev.escalation_rate <= objective.value + eps
    if objective.kind == "accuracy-within":
        return ev.accuracy >= ev.cloud_accuracy - objective.value / 100.0 - eps
    if objective.kind == "recovery":
        return ev.recovery >= objective.value - eps
    return True


def choose_threshold(
    scores: np.ndarray,
    edge_correct: np.ndarray,
    cloud_correct: np.ndarray,
    objective: Objective | str,
    *,
    seed: int = 0,
    n_boot: int = 1000,
) -> Choice:
    """Pick the threshold ``objective`` asks for on this data (scores in the accept
    convention: higher = more confident, escalate when below; NaN always escalates).

    The threshold sits midway between the last score escalated and the next one, rounded to 6
    decimals, so a rounding on its way into a policy file cannot move a row across it; it is
    clipped into [0, 1]. The intervals are a bootstrap over rows at that fixed threshold; the
    statistics depend only on how many rows fall in each (escalated, routed right) cell, so
    each resample is one multinomial draw of those four counts (the same distribution as
    resampling rows, at O(1) a draw)."""
    obj = parse_objective(objective) if isinstance(objective, str) else objective
    s, e, c = _prepare(scores, edge_correct, cloud_correct)
    curve = routing_curve(s, e, c)
    j = _pick(curve, obj)
    finite = np.unique(s[np.isfinite(s)])
    t = curve.thresholds[j]
    if np.isfinite(t):
        below = finite[finite < t]
        t = (below[-1] + t) / 2 if len(below) else t
    t = float(np.clip(round(float(t), 6) if np.isfinite(t) else t, 0.0, 1.0))
    ev = evaluate_threshold(s, e, c, t, obj.cost)
    esc = s < t
    routed = np.where(esc, c, e)
    counts = np.bincount(esc.astype(np.int64) * 2 + routed, minlength=4)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(s), counts / len(s), size=n_boot) / len(s)
    return Choice(
        objective=obj,
        on_data=ev,
        escalation_rate=_estimate(draws[:, 2] + draws[:, 3], ev.escalation_rate),
        accuracy=_estimate(draws[:, 1] + draws[:, 3], ev.accuracy),
        met=_met(obj, ev),
        counts=tuple(int(x) for x in counts),  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------------------------------------
# Gates side by side
# ---------------------------------------------------------------------------------------------
def cpt(
    scores: np.ndarray, edge_correct: np.ndarray, cloud_correct: np.ndarray, target: float = 0.8
) -> float:
    """CPT(target) of a score: the escalation rate that recovers ``target`` of the gap."""
    return escalation_for_recovery(routing_curve(scores, edge_correct, cloud_correct), target)


def auroc(scores: np.ndarray, benefit: np.ndarray) -> float:
    """AUROC of ``-scores`` detecting ``benefit`` (edge wrong, cloud right; NaN scores rank as
    least sure); NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    b = np.asarray(benefit, bool)
    if b.all() or not b.any():
        return float("nan")
    s = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf)
    return float(roc_auc_score(b, -np.clip(s, -1e300, 1e300)))


@dataclass(frozen=True)
class GateReport:
    """One gate on a data set: CPT(``target``) and AUROC for benefit of its score, and with a
    threshold its escalation rate and routed accuracy (NaN without one)."""

    name: str
    escalation_rate: float
    accuracy: float
    cpt: float
    auroc: float
    target: float = 0.8

    @property
    def cpt80(self) -> float:  # as `tandem calibrate --compare` reports it; NaN at another target
        return self.cpt if self.target == 0.8 else float("nan")


def compare_gates(
    gates: Mapping[str, tuple[np.ndarray, float | None]],
    edge_correct: np.ndarray,
    cloud_correct: np.ndarray,
    *,
    target: float = 0.8,
) -> tuple[list[GateReport], float]:
    """A :class:`GateReport` for each named gate's ``(accept scores, threshold or None)`` on
    the same rows, and the share of rows on which all thresholded gates decide alike."""
    reports, decisions = [], []
    for name, (scores, threshold) in gates.items():
        s, e, c = _prepare(scores, edge_correct, cloud_correct)
        rate = acc = float("nan")
        if threshold is not None:
            ev = evaluate_threshold(s, e, c, threshold)
            rate, acc = ev.escalation_rate, ev.accuracy
            decisions.append(s < threshold)
        reports.append(GateReport(name, rate, acc, cpt(s, e, c, target), auroc(s, ~e & c), target))
    d = np.array(decisions)
    agree = float(np.mean(np.all(d == d[:1], axis=0))) if len(d) else 1.0
    return reports, agree


def cpt_difference(
    a: np.ndarray, b: np.ndarray, edge_correct: np.ndarray, cloud_correct: np.ndarray, *,
    target: float = 0.8, resamples: int = 300, seed: int = 0,
) -> tuple[float, tuple[float, float]]:  # fmt: skip
    """CPT(target) of scores ``a`` minus that of ``b`` on the same rows, and its 95% paired
    bootstrap interval (rows resampled together; NaN when no resample has a gap)."""
    e, c = np.asarray(edge_correct, bool), np.asarray(cloud_correct, bool)
    diff = cpt(a, e, c, target) - cpt(b, e, c, target)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(resamples):
        i = rng.integers(0, len(e), len(e))
        if c[i].mean() > e[i].mean():
            boots.append(cpt(a[i], e[i], c[i], target) - cpt(b[i], e[i], c[i], target))
    if not boots:
        return diff, (float("nan"), float("nan"))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return diff, (float(lo), float(hi))
