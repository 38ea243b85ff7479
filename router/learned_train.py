"""Training a learned router from examples and judging it against the confidence gates on
held-out rows: :func:`train_router` fits (:func:`~tandem.router.learned_fit.fit_router`),
exports (:func:`~tandem.router.learned.export_router`), loads the file back and compares its
scores with the ``max_prob``, ``margin`` and ``entropy`` gates by CPT and AUROC
(:func:`tandem.router.calibrate.compare_gates`), with a paired bootstrap interval on the
difference from the best gate (:func:`tandem.router.calibrate.cpt_difference`).

Where the rows come from (the escalation log, a labelled ``.npz``, the reference digits) is
:mod:`tandem.router_data`; ``tandem router train`` is the command.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tandem.router.calibrate import (
    GateReport,
    accept_scores,
    compare_gates,
    cpt_difference,
    pick_threshold,
    routing_curve,
)
from tandem.router.learned import FeatureSpec, classify_features, export_router, load_router
from tandem.router.learned_fit import fit_router

GATE_METRICS = ("max_prob", "margin", "entropy")  # the confidence gates a router is judged by


@dataclass(frozen=True)
class RouterExamples:
    """Rows a classify router trains or is judged on: the edge's (N, C) logits, whether the
    edge and the cloud were right (from the escalation log: edge label == cloud label, and
    the cloud is right by definition), and the edge's (N, H) hidden vectors when used."""

    logits: np.ndarray
    edge_correct: np.ndarray
    cloud_correct: np.ndarray
    hidden: np.ndarray | None = None

    @property
    def benefit(self) -> np.ndarray:
        return ~np.asarray(self.edge_correct, bool) & np.asarray(self.cloud_correct, bool)

    def __len__(self) -> int:
        return len(self.logits)

    def take(self, idx: np.ndarray) -> RouterExamples:
        h = None if self.hidden is None else self.hidden[idx]
        return RouterExamples(self.logits[idx], self.edge_correct[idx], self.cloud_correct[idx], h)

    def split(self, holdout_share: float, seed: int = 0) -> tuple[RouterExamples, RouterExamples]:
        """(train, holdout), stratified on benefit."""
        from sklearn.model_selection import train_test_split

        b = self.benefit
        strat = b if min(b.sum(), (~b).sum()) >= 2 else None
        i_tr, i_ho = train_test_split(
            np.arange(len(self)), test_size=holdout_share, stratify=strat, random_state=seed
        )
        return self.take(np.sort(i_tr)), self.take(np.sort(i_ho))


@dataclass
class RouterReport:
    """What :func:`train_router` did: the file, the chosen model, every gate on the held-out
    rows (``gates``: the confidence gates, ``learned``, ``oracle``), and the learned router's
    CPT minus the best confidence gate's with a 95% bootstrap interval (negative: better)."""

    path: str
    version: str
    model: str
    candidates: dict[str, float]
    rows_train: int
    rows_holdout: int
    gates: list[GateReport]
    best_gate: str
    cpt_difference: float
    cpt_difference_ci: tuple[float, float]
    threshold: float
    target: float

    @property
    def learned(self) -> GateReport:
        return next(g for g in self.gates if g.name == "learned")

    @property
    def better(self) -> bool:
        """The learned router needs fewer escalations and the interval excludes zero."""
        return self.cpt_difference_ci[1] < 0

    def verdict(self) -> str:
        d, (lo, hi) = self.cpt_difference * 100, (x * 100 for x in self.cpt_difference_ci)
        if self.better:
            how = "better than"
        elif self.cpt_difference_ci[0] > 0:
            how = "worse than"
        else:
            how = "not measurably better than"
        return (
            f"the learned router is {how} the best confidence gate ({self.best_gate}): "
            f"CPT({self.target:.0%}) {d:+.1f} points (95% CI {lo:+.1f} to {hi:+.1f}) on "
            f"{self.rows_holdout} held-out rows"
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["gates"] = [{"name": g.name, "cpt": g.cpt, "auroc": g.auroc} for g in self.gates]
        d["better"] = self.better
        d["verdict"] = self.verdict()
        return d


def data_digest(*arrays: np.ndarray | None) -> str:
    """sha256 over the arrays a router was trained on (dtype, shape and bytes of each)."""
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def confidence_gate_scores(logits: np.ndarray, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """Each confidence gate's score of ``logits / temperature`` (higher = more confident):
    :func:`~tandem.router.calibrate.accept_scores` for every metric in :data:`GATE_METRICS`."""
    return {m: accept_scores(logits, m, temperature) for m in GATE_METRICS}


def oracle_scores(edge_correct: np.ndarray, cloud_correct: np.ndarray) -> np.ndarray:
    """Scores that escalate exactly the rows the cloud fixes, first: the floor no gate beats."""
    e, c = np.asarray(edge_correct, bool), np.asarray(cloud_correct, bool)
    return np.where(~e & c, np.arange(len(e)) / (2.0 * max(len(e), 1)), 1.0)


def judge(
    scores: dict[str, np.ndarray],
    edge_correct: np.ndarray,
    cloud_correct: np.ndarray,
    target: float = 0.8,
) -> list[GateReport]:
    """Each scored gate's CPT(target) and AUROC for benefit on the same rows, plus ``oracle``
    (:func:`oracle_scores`)."""
    gates = {**scores, "oracle": oracle_scores(edge_correct, cloud_correct)}
    return compare_gates(
        {name: (s, None) for name, s in gates.items()}, edge_correct, cloud_correct, target=target
    )[0]


def train_router(
    train: RouterExamples,
    holdout: RouterExamples,
    out: str | Path,
    *,
    top_k: int = 3,
    uses_logits: bool = False,
    hidden_tensor: str | None = None,
    model: Literal["auto", "logistic", "mlp"] = "auto",
    seed: int = 0,
    temperature: float = 1.0,
    target: float = 0.8,
    provenance: dict[str, Any] | None = None,
) -> RouterReport:
    """Fit a classify router on ``train``, export it to ``out``, and compare it on
    ``holdout`` with the confidence gates (of ``logits / temperature``) by CPT(``target``)
    and AUROC. ``threshold``: the lowest score threshold whose routed accuracy on the training
    rows recovers 90% of the gap (a starting point, never chosen on the rows it is judged on;
    ``tandem calibrate`` picks it to your target)."""
    c = train.logits.shape[1]
    hd = 0 if train.hidden is None else train.hidden.shape[1]
    spec = FeatureSpec(
        n_classes=c,
        top_k=min(top_k, c),
        uses_logits=uses_logits,
        uses_hidden=hd > 0,
        hidden_dim=hd,
        hidden_tensor=hidden_tensor,
    )
    fitted = fit_router(
        classify_features(train.logits, spec, train.hidden), train.benefit, model=model, seed=seed
    )
    prov = {
        "sha256": data_digest(train.logits, train.edge_correct, train.cloud_correct, train.hidden),
        **(provenance or {}),
        "rows": len(train),
        "seed": seed,
    }
    version = export_router(fitted, spec, out, provenance=prov)
    router = load_router(out, n_classes=c)
    learned = router.score_batch(holdout.logits, holdout.hidden)
    gates = confidence_gate_scores(holdout.logits, temperature)
    results = judge(
        {**gates, "learned": learned}, holdout.edge_correct, holdout.cloud_correct, target
    )
    best = min((g for g in results if g.name in gates), key=lambda g: g.cpt)
    diff, ci = cpt_difference(
        learned,
        gates[best.name],
        holdout.edge_correct,
        holdout.cloud_correct,
        target=target,
        seed=seed,
    )
    # the suggested threshold comes from the training rows: the held-out ones only judge
    fit_scores = router.score_batch(train.logits, train.hidden)
    curve = routing_curve(fit_scores, train.edge_correct, train.cloud_correct)
    return RouterReport(
        path=str(out),
        version=version,
        model=fitted.model,
        candidates=fitted.candidates,
        rows_train=len(train),
        rows_holdout=len(holdout),
        gates=results,
        best_gate=best.name,
        cpt_difference=diff,
        cpt_difference_ci=ci,
        threshold=pick_threshold(curve, 0.9),
        target=target,
    )
