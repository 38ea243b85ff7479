"""The co-evolution features in the request path: calibrated and learned gates, tiers, audit
sampling, shadow gates and the drift alarm — real ONNX Runtime, real workers on loopback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from tandem.cloud.process import WorkerProcess
from tandem.edge import EdgeRuntime, Tier
from tandem.reference.models import CLOUD, EDGE
from tandem.router.drift import DriftAlarm
from tandem.runtime.backends.onnx import OnnxBackend
from tests.peers import free_endpoint


def softmax_max(logits: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / t
    p = np.exp(z - z.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).max(-1)


def rt_for(make_policy, endpoint, **kw) -> EdgeRuntime:
    return EdgeRuntime.from_policy(make_policy(endpoint, **kw))


@pytest.fixture
def xs() -> np.ndarray:
    return np.random.default_rng(3).uniform(0, 1, size=(64, 64)).astype(np.float32)


@pytest.fixture
def edge_logits(tiny_models: Path, xs) -> np.ndarray:
    """The int8 model's logits as the tests' calls see them: rows 0-31 one at a time (infer),
    32-63 as one batch (dynamic quantization scales activations per batch)."""
    return as_called(OnnxBackend(tiny_models / "edge-int8.onnx"), xs, 32)


def as_called(model: OnnxBackend, xs: np.ndarray, n_single: int) -> np.ndarray:
    one = [model.predict(x[None])[0] for x in xs[:n_single]]
    return np.concatenate([np.asarray(one), model.predict(xs[n_single:])])


# ---------------------------------------------------------------------------- calibrated gate
@pytest.mark.parametrize("temperature", [1.0, 0.25, 4.0])
def test_temperature_scales_the_score(make_policy, xs, edge_logits, temperature) -> None:
    gate = {"metric": "max_prob", "threshold": 0.5, "temperature": temperature}
    with rt_for(make_policy, None, log=False, gate=gate) as rt:
        one = [rt.infer(x).confidence for x in xs[:32]]
        batch = [r.confidence for r in rt.infer_batch(xs[32:])]
    want = softmax_max(edge_logits, temperature)
    np.testing.assert_allclose(one + batch, want, rtol=1e-4)
    if temperature > 1:  # a higher temperature flattens: less confident than T = 1
        assert (np.asarray(one) < softmax_max(edge_logits[:32])).all()


# ---------------------------------------------------------------------------- learned gate
def test_learned_gate_scores_with_the_router(make_policy, tmp_path, xs, edge_logits) -> None:
    from tandem.router.learned import FeatureSpec, RouterWeights, export_router, load_router

    spec = FeatureSpec(kind="classify", n_classes=10)
    nf = spec.n_features
    w = np.zeros((nf, 1))
    w[0, 0] = -3.0  # P(stands) grows with the top probability
    weights = RouterWeights(np.zeros(nf), np.ones(nf), ((w, np.zeros(1)),))
    path = tmp_path / "router.onnx"
    version = export_router(weights, spec, path)
    router = load_router(path)
    want = np.array([router.score_row(row) for row in edge_logits])
    threshold = float(np.median(want))
    gate = {"type": "learned", "model": str(path), "threshold": threshold}
    with rt_for(make_policy, None, log=False, gate=gate) as rt:
        results = [rt.infer(x) for x in xs[:32]] + rt.infer_batch(xs[32:])
        stats = rt.stats()["tasks"]["digits"]
    np.testing.assert_allclose([r.confidence for r in results], want, rtol=1e-4)
    assert len({round(r.confidence, 6) for r in results}) > 10  # the score varies by row
    assert results[0].model_versions["router"] == version
    assert stats["stages"] == {"edge": 64}


def test_learned_gate_for_another_class_count_is_refused(make_policy, tmp_path) -> None:
    from tandem.router.learned import FeatureSpec, RouterWeights, export_router

    spec = FeatureSpec(kind="classify", n_classes=7)
    nf = spec.n_features
    export_router(
        RouterWeights(np.zeros(nf), np.ones(nf), ((np.zeros((nf, 1)), np.zeros(1)),)),
        spec,
        tmp_path / "r.onnx",
    )
    gate = {"type": "learned", "model": str(tmp_path / "r.onnx"), "threshold": 0.5}
    with pytest.raises(Exception, match="7"):
        rt_for(make_policy, None, log=False, gate=gate)


# ---------------------------------------------------------------------------- tiers
@pytest.mark.integration
def test_tiers_stop_where_the_gates_say(make_policy, make_worker_config, worker, tiny_models, xs):
    """edge -> a small cloud model (the int8 MLP, its own worker) -> the large one (the CNN):
    rows the small model is unsure of go on to the large one."""
    small = as_called(OnnxBackend(tiny_models / "edge-int8.onnx"), xs[:16], 8)
    large = OnnxBackend(tiny_models / "cloud-fp32.onnx").predict(xs[:16])
    t_tier = float(np.median(softmax_max(small, 0.5)))
    climbs = softmax_max(small, 0.5) < t_tier
    with WorkerProcess(make_worker_config(models=[EDGE])) as w_small:
        tiers = [
            {
                "cloud": {"endpoint": worker.endpoint, "model": CLOUD},
                "gate": {"threshold": t_tier, "temperature": 0.5},
            }
        ]
        policy = make_policy(w_small.endpoint, threshold=1.0, tiers=tiers)
        doc = yaml.safe_load(policy.read_text())
        doc["tasks"]["digits"]["cloud"]["model"] = EDGE  # the small model is the first tier
        policy.write_text(yaml.safe_dump(doc))
        with EdgeRuntime.from_policy(policy) as rt:
            singles = [rt.infer(x) for x in xs[:8]]
            batch = rt.infer_batch(xs[8:16])
            rows = list(rt.escalation_log.records())
            stats = rt.stats()["tasks"]["digits"]
    results = singles + batch
    for i, r in enumerate(results):
        assert r.tier is Tier.CLOUD
        if climbs[i]:
            assert r.stage == "tier:1" and r.model_versions["tier:1"].startswith(f"{CLOUD}@")
            np.testing.assert_allclose(r.output, large[i], rtol=1e-4, atol=1e-5)
        else:
            assert r.stage == "cloud" and "tier:1" not in r.model_versions
            np.testing.assert_allclose(r.output, small[i], rtol=1e-4, atol=1e-5)
    n_top = int(climbs.sum())
    assert stats["stages"] == {k: v for k, v in {"cloud": 16 - n_top, "tier:1": n_top}.items() if v}
    assert stats["cascade"] == {
        "escalated": 16,
        "top_tier": n_top,
        "saved": 16 - n_top,
        "saved_share": pytest.approx(1 - n_top / 16),
    }
    by_id = {row.request_id: row for row in rows}
    for r in results:  # the log keeps the final answer and says where it stopped
        row = by_id[r.request_id]
        np.testing.assert_allclose(row.cloud_output, r.output, rtol=1e-6)
        assert (r.stage in row.reason) == (r.stage == "tier:1")


@pytest.mark.integration
def test_a_failed_tier_keeps_the_answer_before(make_policy, worker, tiny_models, xs) -> None:
    tiers = [{"cloud": {"endpoint": free_endpoint(), "model": CLOUD}, "gate": {"threshold": 1.0}}]
    with rt_for(make_policy, worker.endpoint, threshold=1.0, deadline_ms=300, tiers=tiers) as rt:
        r = rt.infer(xs[0])
        stats = rt.stats()["tasks"]["digits"]
    cloud = OnnxBackend(tiny_models / "cloud-fp32.onnx").predict(xs[:1])[0]
    np.testing.assert_allclose(r.output, cloud, rtol=1e-4, atol=1e-5)
    assert r.tier is Tier.CLOUD and r.stage == "cloud"
    assert r.reason.startswith("low-confidence; tier:1-") and "tier:1" not in r.model_versions
    assert stats["cascade"]["top_tier"] == 1  # asked, though it did not answer


# a calibration the drift tests' traffic is far from: a 0.5% escalation rate, scores near 1
QUIET_CALIBRATION = {
    "date": "2026-01-01T00:00:00Z",
    "objective": "max_escalation=0.01",
    "escalation_rate": {"expected": 0.005, "low": 0.0, "high": 0.01},
    "score_quantiles": [0.9 + 0.01 * k for k in range(9)],
}


# ---------------------------------------------------------------------------- audit
@pytest.mark.integration
def test_audit_rate_escalates_that_share_of_accepted_requests(make_policy, worker, xs) -> None:
    n, rate = 300, 0.2
    data = np.resize(xs, (n, 64))
    with rt_for(make_policy, worker.endpoint, threshold=0.0, audit_rate=rate) as rt:
        results = rt.infer_batch(data)
        private = [rt.infer(x, tags={"private"}) for x in xs[:50]]
        logged = len(rt.escalation_log)
    audited = sum(r.reason == "audit" for r in results)
    sd = (n * rate * (1 - rate)) ** 0.5
    assert abs(audited - n * rate) < 4.5 * sd  # binomial: fails about once in 10^5 runs
    assert all(r.tier is Tier.CLOUD for r in results if r.reason == "audit")
    assert all(r.reason == "confident" for r in results if r.reason != "audit")
    assert all(r.reason == "rule:private" for r in private)  # rules win over audits
    assert logged == audited


@pytest.mark.integration
def test_audits_sample_every_request_the_gate_decides(make_policy, worker, xs) -> None:
    # the gate escalates everything here: audits are drawn from those requests too, so the
    # audited rows are a sample of all traffic, not only of what the gate accepted
    n, rate = 300, 0.3
    with rt_for(make_policy, worker.endpoint, threshold=1.0, audit_rate=rate) as rt:
        results = rt.infer_batch(np.resize(xs, (n, 64)))
    audited = sum(r.reason == "audit" for r in results)
    sd = (n * rate * (1 - rate)) ** 0.5
    assert abs(audited - n * rate) < 4.5 * sd
    assert all(r.reason in ("audit", "low-confidence") for r in results)


# ---------------------------------------------------------------------------- shadow
def test_shadow_counters(make_policy, xs, edge_logits) -> None:
    mp = softmax_max(edge_logits)
    cuts = np.sort(mp)
    active_t = float(cuts[19] + cuts[20]) / 2  # between rows: no score on a threshold
    shadow_t = float(cuts[44] + cuts[45]) / 2
    shadow = {"gate": {"metric": "max_prob", "threshold": shadow_t}}
    with rt_for(make_policy, None, log=False, threshold=active_t, shadow=shadow) as rt:
        one = [rt.infer(x) for x in xs[:32]]
        batch = rt.infer_batch(xs[32:])
        counters = rt.stats()["tasks"]["digits"]["shadow"]
    a, s = mp < active_t, mp < shadow_t
    assert [r.shadow_escalate for r in one + batch] == s.tolist()
    assert counters == {
        "requests": 64,
        "active": int(a.sum()),
        "shadow": int(s.sum()),
        "both": int((a & s).sum()),
        "only_active": int((a & ~s).sum()),
        "only_shadow": int((s & ~a).sum()),
    }
    assert counters["only_shadow"] > 0 and counters["only_active"] == 0


@pytest.mark.integration
def test_shadow_verdict_is_logged_per_row(make_policy, worker, xs, edge_logits) -> None:
    mp = softmax_max(edge_logits[32:48])
    shadow = {"gate": {"metric": "max_prob", "threshold": float(np.median(mp))}}
    with rt_for(make_policy, worker.endpoint, threshold=1.0, shadow=shadow) as rt:
        results = rt.infer_batch(xs[32:48])  # every row escalates; the shadow splits them
        rows = {row.request_id: row for row in rt.escalation_log.records()}
    assert len(rows) == 16
    for r in results:
        assert rows[r.request_id].model_versions["shadow"] == (
            "escalate" if r.shadow_escalate else "accept"
        )
    assert {r.shadow_escalate for r in results} == {True, False}


# ---------------------------------------------------------------------------- drift
def test_drift_alarm_in_the_runtime(make_policy, xs, edge_logits, caplog) -> None:
    """Calibrated on confident traffic (escalation rate ~0); live traffic escalates often."""
    calls: list[DriftAlarm] = []

    def broken(alarm: DriftAlarm) -> None:
        raise RuntimeError("a buggy hook")

    threshold = float(np.median(softmax_max(edge_logits)))
    with rt_for(
        make_policy,
        None,
        log=False,
        threshold=threshold,
        drift={"window": 50, "alpha": 1e-4},
        calibration=QUIET_CALIBRATION,
    ) as rt:
        rt.on_drift(broken)
        rt.on_drift(calls.append)
        for x in np.resize(xs, (150, 64)):
            assert rt.infer(x).index >= 0  # requests go on whatever the hooks do
        drift = rt.stats()["tasks"]["digits"]["drift"]
    assert drift["alarms"] == 3 and drift["state"] == "alarm" and drift["last_alarm_window"] == 3
    assert len(calls) == 3 and calls[0].p_rate < 1e-4 and calls[0].task == "digits"
    assert "a drift callback raised" in caplog.text


def test_a_slow_drift_callback_does_not_hold_requests(make_policy, xs, edge_logits) -> None:
    import time

    calls: list[DriftAlarm] = []

    def slow(alarm: DriftAlarm) -> None:
        time.sleep(0.3)
        calls.append(alarm)

    threshold = float(np.median(softmax_max(edge_logits)))
    worst = 0.0
    with rt_for(
        make_policy, None, log=False, threshold=threshold,
        drift={"window": 50, "alpha": 1e-4}, calibration=QUIET_CALIBRATION,
    ) as rt:  # fmt: skip
        rt.on_drift(slow)
        for x in np.resize(xs, (100, 64)):
            t0 = time.perf_counter()
            rt.infer(x)
            worst = max(worst, time.perf_counter() - t0)
    assert worst < 0.2  # two alarms' callbacks took 0.3 s each, on their own thread
    assert len(calls) == 2  # closing the runtime let them finish


def test_no_drift_section_means_no_drift_stats(make_policy, xs) -> None:
    with rt_for(make_policy, None, log=False) as rt:
        rt.infer(xs[0])
        st = rt.stats()["tasks"]["digits"]
    assert st["drift"] is None and st["stages"] == {"edge": 1} and st["shadow"]["requests"] == 0
