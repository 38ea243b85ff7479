"""Threshold calibration from held-out data, and the accuracy-vs-escalation curve.

Given, for each held-out example, the edge's gate score and whether edge and cloud were right,
:func:`routing_curve` says what accuracy every threshold buys at what escalation rate.
:func:`pick_threshold` picks the threshold that recovers a target share of the edge→cloud
accuracy gap with the fewest escalations — on a calibration split, never on the test split.
:func:`escalation_for_recovery` is RouteLLM's "calls to the strong model needed for X% of its
gain" (CPT), used to score a router on the test split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
