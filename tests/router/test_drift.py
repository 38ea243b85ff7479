"""The drift alarm: quiet on a steady stream, loud on a shifted one, cheap per request."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tandem.router.drift import DriftAlarm, DriftMonitor, _cuts, goodness_p, rate_p
from tandem.router.policy import CalibrationRecord, DriftSpec

THRESHOLD = 0.6


def scores(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    """max_prob-like scores in (0, 1], with a point mass at 1.0 (a saturated softmax)."""
    s = rng.beta(5.0 - 3 * shift, 2.0, size=n)
    s[rng.random(n) < 0.15] = 1.0
    return s


def calibration(rng: np.random.Generator, rows: int = 20_000) -> CalibrationRecord:
    s = scores(rng, rows)
    esc = s < THRESHOLD
    boot = [rng.choice(esc, rows).mean() for _ in range(200)]
    return CalibrationRecord(
        date="2026-01-01T00:00:00Z",
        objective="max_escalation=0.3",
        data={"rows": rows},
        escalation_rate={
            "expected": float(esc.mean()),
            "low": float(np.quantile(boot, 0.025)),
            "high": float(np.quantile(boot, 0.975)),
        },
        score_quantiles=np.quantile(s, np.arange(1, 10) / 10).tolist(),
    )


def feed(m: DriftMonitor, s: np.ndarray) -> None:
    for v in s.tolist():
        m.observe(v, v < THRESHOLD)


@pytest.mark.parametrize("with_calibration", [True, False])
def test_steady_stream_does_not_fire(with_calibration: bool) -> None:
    rng = np.random.default_rng(1)
    cal = calibration(rng) if with_calibration else None
    m = DriftMonitor(DriftSpec(window=1000, alpha=1e-4), cal, task="t")
    feed(m, scores(rng, 200 * 1000))
    st = m.stats()
    assert st["windows"] == 200 and st["alarms"] <= 1
    assert st["baseline"] == ("calibration" if with_calibration else "first-window")
    assert st["p_rate"] is not None and st["p_scores"] is not None


@pytest.mark.parametrize("with_calibration", [True, False])
def test_shifted_stream_fires_within_a_few_windows(with_calibration: bool) -> None:
    rng = np.random.default_rng(2)
    cal = calibration(rng) if with_calibration else None
    alarms: list[DriftAlarm] = []
    m = DriftMonitor(DriftSpec(window=1000, alpha=1e-4), cal, task="t", on_alarm=alarms.append)
    feed(m, scores(rng, 3000))
    assert m.stats()["alarms"] == 0
    feed(m, scores(rng, 3000, shift=0.5))  # less confident: more escalations, lower scores
    st = m.stats()
    assert st["alarms"] >= 1 and st["state"] == "alarm" and alarms
    assert alarms[0].window <= 5 and alarms[0].task == "t"
    assert alarms[0].escalation_rate > cal.escalation_rate.high if cal else True


def test_score_shift_alone_fires_even_at_the_same_rate() -> None:
    """Scores move above the threshold, the escalation rate stays: the decile test sees it."""
    rng = np.random.default_rng(3)
    cal = calibration(rng)
    m = DriftMonitor(DriftSpec(window=1000, alpha=1e-4), cal)
    s = scores(rng, 4000)
    s = np.where(s >= THRESHOLD, 1.0, s)  # every confident score saturates
    feed(m, s)
    st = m.stats()
    assert st["alarms"] >= 1 and st["p_scores"] < 1e-4 and st["p_rate"] > 1e-3


def test_a_callback_that_raises_breaks_nothing(caplog) -> None:
    def boom(alarm: DriftAlarm) -> None:
        raise RuntimeError("callback bug")

    rng = np.random.default_rng(4)
    m = DriftMonitor(DriftSpec(window=100, alpha=1e-3), calibration(rng), on_alarm=boom)
    feed(m, np.zeros(300))
    assert m.stats()["alarms"] == 3
    assert "callback raised" in caplog.text
    assert caplog.text.count("drift alarm in window") == 1  # rate-limited


def test_tied_quantiles_merge_bins() -> None:
    edges, shares = _cuts([0.2, 0.5, 0.5])
    assert edges == [0.2] and shares.tolist() == pytest.approx([0.25, 0.75])
    edges, shares = _cuts([0.3, 0.6, 1.0])
    assert edges == [0.3, 0.6] and shares.tolist() == pytest.approx([0.25, 0.25, 0.5])
    edges, shares = _cuts([0.1 * k for k in range(1, 10)])
    assert len(edges) == 9 and shares == pytest.approx(np.full(10, 0.1))


def test_tests_in_small_numbers() -> None:
    assert rate_p(50, 100, 0.4, 0.6) == 1.0
    assert rate_p(90, 100, 0.4, 0.6) < 1e-8
    assert rate_p(5, 100, 0.4, 0.6) < 1e-8
    assert goodness_p(np.full(10, 10), np.full(10, 0.1)) == pytest.approx(1.0)
    assert goodness_p(np.array([100, 0]), np.array([0.5, 0.5])) < 1e-10


def test_observe_is_cheap() -> None:
    """Per request: a lock, two counters and a bisect (printed; bound generous for CI)."""
    rng = np.random.default_rng(5)
    m = DriftMonitor(DriftSpec(window=1_000_000), calibration(rng))
    s = scores(rng, 100_000).tolist()
    t0 = time.perf_counter()
    for v in s:
        m.observe(v, v < THRESHOLD)
    ns = (time.perf_counter() - t0) / len(s) * 1e9
    print(f"DriftMonitor.observe: {ns:.0f} ns per request")
    assert ns < 5_000
