from __future__ import annotations

import math
import time

import numpy as np
import pytest

from tandem.router.calibrate import escalation_for_recovery, pick_threshold, routing_curve
from tandem.router.policy import BudgetSpec, GateSpec, TaskPolicy
from tandem.router.routing import ConfidenceGate, TaskRouter, TokenBucket
from tandem.runtime.errors import ConfigError


def task(**kw) -> TaskPolicy:
    base = {
        "local": {"path": "/x.onnx"},
        "cloud": {"endpoint": "tcp://127.0.0.1:1", "model": "m"},
        "gate": {"threshold": 0.7},
        "rules": [{"tag": "private", "route": "local"}, {"tag": "critical", "route": "cloud"}],
    }
    return TaskPolicy.model_validate({**base, **kw})


@pytest.mark.parametrize(
    ("metric", "stats", "accepted"),
    [
        ("max_prob", (0.71, 0.1, 2.0), True),
        ("max_prob", (0.69, 0.9, 0.0), False),
        ("margin", (0.2, 0.71, 2.0), True),
        ("margin", (0.99, 0.5, 0.0), False),
        ("entropy", (0.1, 0.1, 0.6 * math.log(10)), True),  # normalised 0.6 <= 0.7
        ("entropy", (0.9, 0.9, 0.8 * math.log(10)), False),
    ],
)
def test_gate_metrics(metric, stats, accepted) -> None:
    gate = ConfidenceGate(GateSpec(metric=metric, threshold=0.7))
    assert gate.accepts(gate.score(*stats, n_classes=10)) is accepted


def test_nan_is_never_accepted() -> None:
    for metric in ("max_prob", "margin", "entropy"):
        gate = ConfidenceGate(
            GateSpec(metric=metric, threshold=0.0 if metric != "entropy" else 1.0)
        )
        assert not gate.accepts(gate.score(math.nan, math.nan, math.nan, 10))


def test_rules_first_match_wins_and_override_the_gate() -> None:
    r = TaskRouter(task())
    assert r.pre_route({"private", "critical"}).escalate is False  # listed first
    assert r.pre_route({"critical"}).escalate is True
    assert r.pre_route({"other"}) is None
    assert r.pre_route(()) is None
    assert r.decide(0.9).escalate is False
    d = r.decide(0.1)
    assert d.escalate and d.reason == "low-confidence"
    assert r.decide(0.99, valid=False).reason == "invalid-edge-output"


def test_no_cloud_never_escalates() -> None:
    r = TaskRouter(task(cloud=None, rules=[]))
    d = r.decide(0.0)
    assert not d.escalate and d.reason == "no-cloud-target"


def test_budget_caps_escalations() -> None:
    r = TaskRouter(task(budget=BudgetSpec(escalations_per_s=1.0, burst=3)))
    reasons = [r.decide(0.0).reason for _ in range(5)]
    assert reasons == ["low-confidence"] * 3 + ["budget-exhausted"] * 2


def test_token_bucket_refills() -> None:
    b = TokenBucket(rate_per_s=200.0, burst=1)
    assert b.try_take() and not b.try_take()
    time.sleep(0.02)
    assert b.try_take()


def test_routing_curve_by_hand() -> None:
    # scores ascending: 0.2 (edge wrong, cloud right), 0.5 (both right), 0.9 (edge right, cloud wrong)
    curve = routing_curve(np.array([0.9, 0.2, 0.5]), np.array([1, 0, 1]), np.array([0, 1, 1]))
    assert curve.edge_accuracy == pytest.approx(2 / 3) and curve.cloud_accuracy == pytest.approx(
        2 / 3
    )
    assert pick_threshold(curve, 1.0) == 0.0  # no gap: never escalate
    # thresholds -inf, 0.2, 0.5, 0.9, inf; a score below the threshold escalates
    np.testing.assert_allclose(curve.thresholds, [-np.inf, 0.2, 0.5, 0.9, np.inf])
    np.testing.assert_allclose(curve.escalation_rate, [0, 0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(curve.accuracy, [2 / 3, 2 / 3, 1, 1, 2 / 3])
    better_cloud = routing_curve(
        np.array([0.9, 0.2, 0.5]), np.array([1, 0, 1]), np.array([1, 1, 1])
    )
    assert pick_threshold(better_cloud, 1.0) == 0.5  # escalating the 0.2 alone closes the gap
    assert escalation_for_recovery(better_cloud, 1.0) == pytest.approx(1 / 3)


def test_pick_threshold_and_cpt() -> None:
    rng = np.random.default_rng(0)
    n = 2000
    scores = rng.uniform(0, 1, n)
    edge_ok = rng.uniform(0, 1, n) < scores  # confident edge is right more often
    cloud_ok = rng.uniform(0, 1, n) < 0.95
    curve = routing_curve(scores, edge_ok, cloud_ok)
    t = pick_threshold(curve, 0.9)
    routed = np.where(scores < t, cloud_ok, edge_ok).mean()
    gap = cloud_ok.mean() - edge_ok.mean()
    assert (routed - edge_ok.mean()) / gap >= 0.9
    # a lower threshold (fewer escalations) must not reach the target
    t_lower = curve.thresholds[np.searchsorted(curve.thresholds, t) - 1]
    routed_lower = np.where(scores < t_lower, cloud_ok, edge_ok).mean()
    assert (routed_lower - edge_ok.mean()) / gap < 0.9
    cpt = escalation_for_recovery(curve, 0.8)
    assert 0 < cpt < np.mean(scores < t)


def test_entropy_gate_refuses_fewer_than_two_classes() -> None:
    entropy = ConfidenceGate(GateSpec(metric="entropy", threshold=0.5))
    for n in (0, 1):
        with pytest.raises(ConfigError, match=f"task 't': .*this one has {n}"):
            entropy.check_classes(n, task="t")
        with pytest.raises(ValueError, match="at least 2 classes"):
            entropy.score(1.0, 1.0, 0.0, n)  # never a silent "confident"
    entropy.check_classes(2, task="t")
    assert entropy.score(0.5, 0.0, math.log(2), 2) == pytest.approx(1.0)
    ConfidenceGate(GateSpec(metric="max_prob", threshold=0.5)).check_classes(1, task="t")
