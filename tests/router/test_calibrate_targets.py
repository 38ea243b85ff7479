"""Temperature scaling, ECE and thresholds chosen to stated targets: on synthetic data drawn
from known distributions (so the population value each interval should hold is known), and on
the reference corrupted digits (calib → test)."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.router.calibrate import (
    accept_scores,
    choose_threshold,
    escalation_for_recovery,
    evaluate_threshold,
    expected_calibration_error,
    fit_score_temperature,
    fit_temperature,
    parse_objective,
    reliability_diagram,
    routing_curve,
    scale_scores,
    softmax,
    to_policy_threshold,
)
from tandem.router.policy import GateSpec
from tandem.router.routing import ConfidenceGate
from tandem.runtime.errors import ConfigError


def calibrated_logits(n: int, c: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = (
        rng.normal(0.0, 1.5, size=(n, c))
        + rng.normal(0, 2.0, size=(n, 1)) * np.eye(c)[rng.integers(0, c, n)]
    )
    p = softmax(z)
    y = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return z, y


def test_temperature_recovers_a_known_overconfidence_and_ece_falls() -> None:
    z, y = calibrated_logits(20_000)
    hot = z * 4.0  # four times too confident
    t = fit_temperature(hot, y)
    assert t == pytest.approx(4.0, rel=0.08)
    before = expected_calibration_error(hot, y)
    after = expected_calibration_error(hot / t, y)
    assert before > 0.1 and after < 0.02 and after < before / 5
    # argmax (accuracy) is untouched by a temperature
    assert np.array_equal((hot / t).argmax(1), hot.argmax(1))


def test_temperature_drops_nan_and_inf_rows() -> None:
    z, y = calibrated_logits(5_000, seed=1)
    clean = fit_temperature(z * 2, y)
    dirty = np.concatenate([z * 2, np.full((3, 10), np.nan), np.full((2, 10), np.inf)])
    labels = np.concatenate([y, [0, 1, 2, 3, 4]])
    dirty[-1, 0] = 0.0  # +inf elsewhere in the row still drops it
    assert fit_temperature(dirty, labels) == pytest.approx(clean, rel=1e-6)
    with pytest.raises(ValueError, match="no row"):
        fit_temperature(np.full((4, 3), np.nan), np.zeros(4))


def test_ece_worked_example_and_probabilities_equal_logits() -> None:
    assert expected_calibration_error(
        np.array([0.9, 0.9, 0.6, 0.6]), np.array([1, 0, 1, 1])
    ) == pytest.approx(0.4)
    z, y = calibrated_logits(2_000, seed=2)
    assert expected_calibration_error(softmax(z), y) == pytest.approx(
        expected_calibration_error(z, y)
    )


def test_token_score_power_calibration_improves_ece() -> None:
    rng = np.random.default_rng(3)
    truth = rng.uniform(0.2, 1.0, 20_000)  # P(the edge's answer is right)
    correct = rng.random(20_000) < truth
    reported = truth**0.25  # an overconfident score, monotone in the truth
    t = fit_score_temperature(reported, correct)
    assert t == pytest.approx(0.25, rel=0.1)
    assert expected_calibration_error(scale_scores(reported, t), correct) < 0.02
    assert expected_calibration_error(reported, correct) > 0.1


def test_reliability_diagram_writes_a_png(tmp_path) -> None:
    z, y = calibrated_logits(1_000, seed=4)
    out = reliability_diagram(tmp_path / "r.png", {"before": (z * 3, y), "after": (z, y)})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------- thresholds to targets
def known_routing(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """score ~ U(0, 1); the edge is right with probability = score; the cloud with 0.95. At
    threshold t the population escalation rate is t and the routed accuracy
    0.95 t + (1 - t^2) / 2."""
    rng = np.random.default_rng(seed)
    s = rng.random(n)
    return s, rng.random(n) < s, rng.random(n) < 0.95


def population(t: float) -> tuple[float, float]:
    return t, 0.95 * t + (1 - t * t) / 2


@pytest.mark.parametrize("target", ["max-escalation=0.2", "accuracy-within=1.0", "recovery=0.8"])
def test_threshold_meets_its_target_on_held_out_data_within_its_interval(target: str) -> None:
    calib, test = known_routing(40_000, seed=10), known_routing(40_000, seed=11)
    choice = choose_threshold(*calib, target, seed=0, n_boot=2000)
    assert choice.met
    rate, acc = population(choice.threshold)
    assert rate in choice.escalation_rate and acc in choice.accuracy  # the population value
    held = evaluate_threshold(*test, choice.threshold)
    p_rate, p_acc = choice.predict(held.n)
    assert held.escalation_rate in p_rate and held.accuracy in p_acc
    obj = parse_objective(target)
    if obj.kind == "max-escalation":
        assert choice.escalation_rate.expected <= 0.2
        assert held.escalation_rate <= 0.2 + (p_rate.high - p_rate.expected)
        assert choice.threshold == pytest.approx(0.2, abs=0.01)
    elif obj.kind == "accuracy-within":
        assert held.accuracy >= held.cloud_accuracy - 0.01 - (p_acc.expected - p_acc.low)
    else:  # the existing pick_threshold semantics: fewest escalations reaching the recovery
        curve = routing_curve(*calib)
        assert choice.escalation_rate.expected == pytest.approx(
            escalation_for_recovery(curve, 0.8), abs=1 / 40_000
        )


def test_cost_objective_finds_the_analytic_optimum() -> None:
    # escalating a row costs 0.25 and saves (1 - s) - 0.05 expected errors: worth it below 0.70
    data = known_routing(60_000, seed=12)
    choice = choose_threshold(*data, "cost:cloud=0.2,latency_ms=50,latency_cost=0.001,error=1")
    assert choice.threshold == pytest.approx(0.70, abs=0.03)
    ev = evaluate_threshold(*data, choice.threshold, choice.objective.cost)
    worse = evaluate_threshold(*data, 0.5, choice.objective.cost)
    assert ev.cost is not None and worse.cost is not None and ev.cost < worse.cost


def test_nan_scores_always_escalate_and_threshold_stays_in_0_1() -> None:
    s, e, c = known_routing(1_000, seed=13)
    s[:50] = np.nan
    choice = choose_threshold(s, e, c, "max-escalation=0.0")
    assert 0.0 <= choice.threshold <= 1.0
    assert choice.escalation_rate.expected == pytest.approx(0.05)
    everything = choose_threshold(s, e, c, "accuracy-within=0")
    assert 0.0 <= everything.threshold <= 1.0


@pytest.mark.parametrize(
    "bad",
    ["max-escalation=1.5", "max-escalation=x", "speed=1", "cost:", "cost:cloud=-1", "cost:foo=1"],
)
def test_bad_objectives_say_what_is_expected(bad: str) -> None:
    with pytest.raises(ConfigError, match="objective"):
        parse_objective(bad)


def test_objective_strings_round_trip() -> None:
    assert str(parse_objective("max_escalation=0.2")) == "max-escalation=0.2"
    obj = parse_objective("cost:cloud=0.002,latency_ms=40,latency_cost=0.0001,error=1.0")
    assert obj.cost is not None and obj.cost.latency_ms == 40
    assert str(parse_objective(str(obj))) == str(obj)


def test_entropy_gate_threshold_maps_back_to_the_policy_convention() -> None:
    z, y = calibrated_logits(3_000, seed=5)
    s = accept_scores(z, "entropy", temperature=1.3)
    choice = choose_threshold(s, z.argmax(1) == y, np.ones(len(y), bool), "max-escalation=0.3")
    gate = ConfidenceGate(
        GateSpec(metric="entropy", threshold=to_policy_threshold("entropy", choice.threshold))
    )
    p = softmax(z / 1.3)
    h = -(p * np.log(p)).sum(1) / np.log(10)
    escalated = np.array([not gate.accepts(v) for v in h])
    assert escalated.mean() == pytest.approx(choice.escalation_rate.expected, abs=1e-3)


@pytest.mark.slow
def test_reference_digits_calib_to_test() -> None:
    from tandem.reference.digits import load_workload
    from tandem.reference.models import build_reference_models
    from tandem.runtime.backends.onnx import OnnxBackend

    models = build_reference_models()
    w = load_workload(0)
    edge = OnnxBackend(models / "edge-int8.onnx", threads=0)
    cloud = OnnxBackend(models / "cloud-fp32.onnx", threads=0)
    zc, zt = edge.predict(w.calib.x) * 4.0, edge.predict(w.test.x) * 4.0  # miscalibrated
    t = fit_temperature(zc, w.calib.y)
    assert expected_calibration_error(zt / t, w.test.y) < expected_calibration_error(zt, w.test.y)
    cc = cloud.predict(w.calib.x).argmax(1) == w.calib.y
    ct = cloud.predict(w.test.x).argmax(1) == w.test.y
    for target in ("max-escalation=0.2", "accuracy-within=1.0"):
        choice = choose_threshold(
            accept_scores(zc, "max_prob", t), zc.argmax(1) == w.calib.y, cc, target
        )
        held = evaluate_threshold(
            accept_scores(zt, "max_prob", t), zt.argmax(1) == w.test.y, ct, choice.threshold
        )
        p_rate, p_acc = choice.predict(held.n)
        assert held.escalation_rate in p_rate and held.accuracy in p_acc, (
            target,
            held,
            p_rate,
            p_acc,
        )
