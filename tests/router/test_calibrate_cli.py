"""``tandem calibrate`` end to end: on a real escalation log written by EscalationLog (audited
and escalated rows, the reference ONNX models), on a generation task's log, and on the
reference digits (slow)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from tandem.cli import app
from tandem.edge.escalation_log import EscalationLog
from tandem.kernels.confidence import confidence
from tandem.reference.models import build_reference_models
from tandem.router.policy import load_policy
from tandem.runtime.backends.onnx import OnnxBackend

runner = CliRunner()


@pytest.fixture(scope="module")
def models() -> Path:
    return build_reference_models()


def _policy(tmp: Path, models: Path, **task: object) -> Path:
    p = tmp / "policy.yaml"
    doc = {
        "version": 1,
        "tasks": {
            "digits": {
                "local": {"path": str(models / "edge-int8.onnx")},
                "cloud": {"endpoint": "tcp://127.0.0.1:5555", "model": "digits-cloud"},
                "gate": {"metric": "max_prob", "threshold": 0.8},
                "audit_rate": 0.05,
                **task,
            }
        },
    }
    p.write_text("# calibrated by tandem calibrate\n" + yaml.safe_dump(doc, sort_keys=False))
    return p


def _write_log(path: Path, models: Path, n_audit: int, n_escalated: int = 300) -> None:
    """Rows as the edge logs them: audited rows (a random sample of traffic) and rows the gate
    escalated (low max_prob); the cloud model's answers as cloud labels."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(0)
    d = load_digits()
    x = (d.images.reshape(len(d.images), -1) / 16.0).astype(np.float32)
    x = x + rng.normal(0, 0.25, x.shape).astype(np.float32)  # a bad camera: the edge errs
    edge = OnnxBackend(models / "edge-int8.onnx", threads=0)
    cloud = OnnxBackend(models / "cloud-fp32.onnx", threads=0)
    ze, zc = edge.predict(x), cloud.predict(x)
    p = confidence(ze).max_prob
    low = np.flatnonzero(p < 0.8)[:n_escalated]
    audit = rng.choice(len(x), n_audit, replace=False)
    with EscalationLog(path) as log:
        for idx, reason in ((audit, "audit"), (low, "low-confidence")):
            log.append_batch(
                ts_ms=int(time.time() * 1e3),
                task="digits",
                tier="cloud",
                request_ids=[f"{reason}-{i}" for i in idx],
                reasons=[reason] * len(idx),
                tags=[],
                inputs=x[idx],
                edge_outputs=ze[idx],
                edge_labels=list(ze[idx].argmax(1)),
                edge_confidences=list(p[idx]),
                cloud_outputs=zc[idx],
                cloud_labels=list(zc[idx].argmax(1)),
                error=None,
                timings_ms={"total": 1.0},
                model_versions={"edge": edge.version, "cloud": "digits-cloud@test"},
            )


def test_calibrate_from_the_log_writes_a_reviewable_policy(tmp_path: Path, models: Path) -> None:
    policy = _policy(tmp_path, models, shadow={"gate": {"metric": "margin", "threshold": 0.3}})
    log = tmp_path / "escalations.sqlite"
    _write_log(log, models, n_audit=400)
    report = tmp_path / "report.json"
    args = ["calibrate", str(policy), "--task", "digits", "--log", str(log)]
    r = runner.invoke(
        app,
        [
            *args,
            "--objective",
            "max-escalation=0.3",
            "--compare",
            "--json",
            str(report),
            "--n-boot",
            "300",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "(400 audited)" in r.output and "nothing written" in r.output
    assert "+    calibration:" in r.output and "-      threshold: 0.8" in r.output
    assert "active and shadow decide alike" in r.output
    assert load_policy(policy).tasks["digits"].gate.threshold == 0.8  # not written
    out = json.loads(report.read_text())
    assert out["threshold_rows"] == 400 and out["rows"] == 700
    assert out["escalation_rate"]["expected"] <= 0.3 and out["objective_met"]
    assert set(out["comparison"]["gates"]) == {"active", "calibrated", "shadow"}
    r = runner.invoke(
        app, [*args, "--objective", "max-escalation=0.3", "--write", "--n-boot", "300"]
    )
    assert r.exit_code == 0, r.output
    tp = load_policy(policy).tasks["digits"]
    assert tp.calibration is not None and tp.calibration.data["rows"] == 400
    assert tp.calibration.models["cloud"] == "digits-cloud@test"
    assert len(tp.calibration.score_quantiles) == 9
    assert tp.gate.threshold == pytest.approx(out["threshold"])
    assert policy.read_text().startswith("# calibrated by tandem calibrate\n")
    assert (tmp_path / "policy.yaml.bak").is_file()


def test_too_few_audited_rows_are_refused_unless_biased_is_allowed(
    tmp_path: Path, models: Path
) -> None:
    policy = _policy(tmp_path, models)
    log = tmp_path / "escalations.sqlite"
    _write_log(log, models, n_audit=30)
    args = ["calibrate", str(policy), "--task", "digits", "--log", str(log), "--n-boot", "200"]
    r = runner.invoke(app, args)
    assert r.exit_code == 1
    assert "30 audited rows" in r.output and "audit_rate" in r.output
    r = runner.invoke(app, [*args, "--allow-biased"])
    assert r.exit_code == 0, r.output
    assert "biased" in r.output


def test_generation_task_from_the_log(tmp_path: Path) -> None:
    (tmp_path / "lm.gguf").write_bytes(b"")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\ntasks:\n  sort:\n    kind: generate\n    local: {path: lm.gguf}\n"
        '    cloud: {endpoint: "tcp://127.0.0.1:5555", model: sort-moe}\n'
        "    gate: {metric: token_min, threshold: 0.5}  # calibrated below\n"
    )
    rng = np.random.default_rng(1)
    log = tmp_path / "escalations.sqlite"
    with EscalationLog(log) as lg:
        for i in range(300):
            lp = np.log(rng.uniform(0.05, 1.0, 8)).astype(np.float32)
            right = rng.random() < np.exp(lp.min()) ** 0.3  # overconfident token score
            lg.append(
                _gen_record(
                    i, lp, "b c a" if right else "a b c", reason="audit" if i % 3 else "low"
                )
            )
    r = runner.invoke(
        app,
        [
            "calibrate",
            str(policy),
            "--task",
            "sort",
            "--log",
            str(log),
            "--objective",
            "recovery=0.8",
            "--n-boot",
            "200",
            "--out",
            str(tmp_path / "new.yaml"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "ECE of the token score" in r.output and "(200 audited)" in r.output
    tp = load_policy(tmp_path / "new.yaml").tasks["sort"]
    assert tp.calibration is not None and tp.calibration.data["rows"] == 200
    assert "# calibrated below" in (tmp_path / "new.yaml").read_text()


def _gen_record(i: int, lp: np.ndarray, edge_text: str, reason: str):
    from tandem.edge.escalation_rows import EscalationRecord

    return EscalationRecord(
        ts_ms=int(time.time() * 1e3),
        request_id=f"r{i}",
        task="sort",
        tier="cloud",
        reason=reason,
        tags=[],
        input=np.frombuffer(b"c a b", np.uint8),
        input_digest="",
        edge_output=lp,
        edge_label=None,
        edge_confidence=float(np.exp(lp.min())),
        cloud_output=None,
        cloud_label=None,
        error=None,
        timings_ms={},
        model_versions={"edge": "lm@1", "cloud": "sort-moe@1"},
        generation={"prompt": "c a b", "edge": edge_text, "cloud": "a b c", "answer": "a b c"},
    )


@pytest.mark.slow
def test_reference_digits_end_to_end(tmp_path: Path, models: Path) -> None:
    policy = _policy(tmp_path, models)
    png, report = tmp_path / "rel.png", tmp_path / "r.json"
    r = runner.invoke(
        app,
        [
            "calibrate",
            str(policy),
            "--task",
            "digits",
            "--reference",
            "digits",
            "--objective",
            "accuracy-within=1.0",
            "--holdout",
            "reference",
            "--plot",
            str(png),
            "--json",
            str(report),
            "--write",
        ],
    )
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:4] == b"\x89PNG"
    out = json.loads(report.read_text())
    assert out["holdout"]["source"] == "reference:digits:test" and out["holdout"]["rows"] == 1800
    assert out["holdout"]["within_prediction"], out["holdout"]
    tp = load_policy(policy).tasks["digits"]
    assert tp.gate.temperature == pytest.approx(out["temperature"], rel=1e-3)
    assert tp.calibration is not None and tp.calibration.data["source"] == "reference:digits:calib"


def test_compare_scores_a_learned_shadow_gate(tmp_path: Path, models: Path) -> None:
    from tandem.router.learned import FeatureSpec, classify_features, export_router, fit_router

    log = tmp_path / "escalations.sqlite"
    _write_log(log, models, n_audit=300)
    recs = list(EscalationLog(log).records("digits"))
    logits = np.stack([r.edge_output for r in recs])
    benefit = np.array([r.edge_label != r.cloud_label for r in recs])
    spec = FeatureSpec(n_classes=10, top_k=3)
    fitted = fit_router(classify_features(logits, spec), benefit, model="logistic")
    export_router(fitted, spec, tmp_path / "r.onnx")
    shadow = {"gate": {"type": "learned", "model": "r.onnx", "threshold": 0.5}}
    policy = _policy(tmp_path, models, shadow=shadow)
    report = tmp_path / "r.json"
    r = runner.invoke(
        app,
        [
            "calibrate",
            str(policy),
            "--task",
            "digits",
            "--log",
            str(log),
            "--compare",
            "--json",
            str(report),
            "--n-boot",
            "200",
        ],
    )
    assert r.exit_code == 0, r.output
    cmp = json.loads(report.read_text())["comparison"]
    assert 0.0 <= cmp["active_shadow_agreement"] <= 1.0
    shadow_rate = cmp["gates"]["shadow"]["escalation_rate"]
    assert 0.0 < shadow_rate < 1.0  # the router's scores came through, not NaN (all escalate)


def test_labelled_npz_with_cloud_logits_and_an_npz_holdout(tmp_path: Path, models: Path) -> None:
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(2)
    d = load_digits()
    x = (d.images.reshape(len(d.images), -1) / 16.0).astype(np.float32)
    x = x + rng.normal(0, 0.3, x.shape).astype(np.float32)
    zc = OnnxBackend(models / "cloud-fp32.onnx", threads=0).predict(x)
    half = len(x) // 2
    np.savez(tmp_path / "calib.npz", x=x[:half], y=d.target[:half], cloud_logits=zc[:half])
    np.savez(tmp_path / "test.npz", x=x[half:], y=d.target[half:], cloud_logits=zc[half:])
    policy = _policy(tmp_path, models, gate={"metric": "entropy", "threshold": 0.5})
    report = tmp_path / "r.json"
    r = runner.invoke(
        app,
        [
            "calibrate",
            str(policy),
            "--task",
            "digits",
            "--data",
            str(tmp_path / "calib.npz"),
            "--objective",
            "max-escalation=0.25",
            "--holdout",
            str(tmp_path / "test.npz"),
            "--json",
            str(report),
            "--n-boot",
            "300",
            "--write",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(report.read_text())
    assert out["holdout"]["rows"] == len(x) - half and out["holdout"]["within_prediction"]
    tp = load_policy(policy).tasks["digits"]
    # the entropy gate escalates above its threshold: the written one is 1 - the sweep's
    assert tp.gate.metric.value == "entropy" and tp.gate.threshold == out["threshold"]
    assert tp.calibration is not None and tp.calibration.models["cloud"] == "from-file"
    q = tp.calibration.score_quantiles  # normalised entropies, as the gate sees them
    assert q == sorted(q) and 0.0 <= q[0] <= q[-1] <= 1.0
