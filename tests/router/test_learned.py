"""Learned routers: the exported ONNX graph, the jitted row path and the training-time
estimator give the same scores; bad files are refused; on data where a feature predicts
benefit the router beats max_prob; token routers; the CLI end to end."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from typer.testing import CliRunner, Result

from tandem.cli import app
from tandem.edge.escalation_log import EscalationLog, EscalationRecord
from tandem.router.learned import (
    FeatureSpec,
    classify_features,
    export_router,
    expose_hidden,
    fit_router,
    load_router,
    token_features,
)
from tandem.router.learned_train import RouterExamples, train_router
from tandem.runtime.backends.onnx import OnnxBackend
from tandem.runtime.errors import ConfigError


def _synthetic(n: int, c: int, seed: int, h: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, hidden vectors, and benefit that depends on max_prob and on hidden[:, 0]."""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(n, c)) * rng.uniform(0.3, 3.0, size=(n, 1))).astype(np.float32)
    hidden = rng.normal(size=(n, h)).astype(np.float32) if h else None
    p = np.exp(logits - logits.max(1, keepdims=True))
    p_max = (p / p.sum(1, keepdims=True)).max(1)
    z = 3 * (0.6 - p_max) + (2 * hidden[:, 0] if h else 0)
    return logits, hidden, rng.random(n) < 1 / (1 + np.exp(-z))


@pytest.mark.parametrize(
    ("model", "uses_logits", "hidden_dim"),
    [("logistic", False, 0), ("mlp", False, 0), ("mlp", True, 0), ("logistic", True, 4)],
)
def test_exported_router_matches_training_scores(
    tmp_path: Path, model: str, uses_logits: bool, hidden_dim: int
) -> None:
    c = 6
    logits, hidden, benefit = _synthetic(400, c, 1, hidden_dim)
    spec = FeatureSpec(
        n_classes=c, top_k=3, uses_logits=uses_logits, uses_hidden=hidden_dim > 0,
        hidden_dim=hidden_dim,
    )  # fmt: skip
    feats = classify_features(logits, spec, hidden)
    fitted = fit_router(feats, benefit, model=model)  # type: ignore[arg-type]
    assert fitted.model.startswith(model)
    version = export_router(fitted, spec, tmp_path / "r.onnx", provenance={"data": "synthetic"})
    r = load_router(tmp_path / "r.onnx", n_classes=c)
    assert (r.kind, r.n_classes, r.uses_hidden, r.version) == (
        "classify",
        c,
        hidden_dim > 0,
        version,
    )
    assert r.provenance["data"] == "synthetic" and r.provenance["rows"] == 400
    # training time: the sklearn estimator on the standardised features
    w = fitted.weights
    want = fitted.estimator.predict_proba((feats - w.mean) * w.inv_std)[:, 0]
    onnx_scores = r.score_batch(logits, hidden)
    rows = np.array([r.score_row(x, None if hidden is None else h) for x, h in
                     zip(logits, hidden if hidden is not None else [None] * len(logits),
                         strict=True)])  # fmt: skip
    ref = r.score_batch_reference(logits, hidden)  # float64 from the file's float32 weights
    np.testing.assert_allclose(ref, want, atol=1e-6)
    np.testing.assert_allclose(rows, ref, atol=1e-9)
    np.testing.assert_allclose(onnx_scores, want, atol=2e-5)
    assert ((want >= 0) & (want <= 1)).all() and want.std() > 0.05  # not a constant


def test_invalid_rows_never_accepted_and_edge_cases_agree(tmp_path: Path) -> None:
    c = 4
    logits, hidden, benefit = _synthetic(400, c, 2, 3)
    spec = FeatureSpec(n_classes=c, top_k=c, uses_logits=True, uses_hidden=True, hidden_dim=3)
    fitted = fit_router(classify_features(logits, spec, hidden), benefit, model="mlp")
    export_router(fitted, spec, tmp_path / "r.onnx")
    r = load_router(tmp_path / "r.onnx")
    inf, nan = np.inf, np.nan
    rows = np.array(
        [
            [nan, 0, 0, 0],  # invalid
            [inf, 0, 0, 0],  # invalid
            [-inf, -inf, -inf, -inf],  # invalid: no finite logit
            [1, 1, 1, 1],  # a four-way tie
            [5, 5, 0, 0],  # a tie for the top
            [-inf, 2, -inf, 1],  # valid: some classes impossible
            [3e4, 0, 0, -3e4],  # extreme but finite
            [0, 0, 0, 0],
        ],
        np.float32,
    )
    h = np.zeros((len(rows), 3), np.float32)
    batch = r.score_batch(rows, h)
    one = np.array([r.score_row(x, y) for x, y in zip(rows, h, strict=True)])
    ref = r.score_batch_reference(rows, h)
    assert np.isnan(batch[:3]).all() and np.isnan(one[:3]).all() and np.isnan(ref[:3]).all()
    np.testing.assert_allclose(batch[3:], ref[3:], atol=2e-5)
    np.testing.assert_allclose(one[3:], ref[3:], atol=1e-9)
    # a non-finite hidden vector is invalid too, and NaN never clears a threshold
    bad_h = np.array([np.nan, 0, 0], np.float32)
    assert math.isnan(r.score_row(rows[3], bad_h))
    assert math.isnan(r.score_batch(rows[3:4], bad_h[None])[0])
    assert not (r.score_row(rows[0], h[0]) >= 0.0)


def test_two_classes(tmp_path: Path) -> None:
    logits, _, benefit = _synthetic(300, 2, 3)
    spec = FeatureSpec(n_classes=2, top_k=2)
    export_router(fit_router(classify_features(logits, spec), benefit), spec, tmp_path / "r.onnx")
    r = load_router(tmp_path / "r.onnx", n_classes=2)
    np.testing.assert_allclose(r.score_batch(logits), r.score_batch_reference(logits), atol=2e-5)
    assert r.score_row(logits[0]) == pytest.approx(r.score_batch_reference(logits[:1])[0])


def test_refuses_bad_files(tmp_path: Path, tiny_models: Path) -> None:
    with pytest.raises(ConfigError, match="router file not found"):
        load_router(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match=r"junk\.onnx"):
        load_router(tmp_path / "junk.onnx")
    with pytest.raises(ConfigError, match="not a Tandem router"):
        load_router(tiny_models / "edge-int8.onnx")  # an ONNX file, but not a router
    logits, _, benefit = _synthetic(300, 5, 4)
    spec = FeatureSpec(n_classes=5, top_k=2)
    export_router(fit_router(classify_features(logits, spec), benefit), spec, tmp_path / "r.onnx")
    with pytest.raises(ConfigError, match=r"r\.onnx.*5 classes, expected .* 10"):
        load_router(tmp_path / "r.onnx", n_classes=10)
    with pytest.raises(ConfigError, match=r"task 'digits'.*5 classes; this model has 10"):
        load_router(tmp_path / "r.onnx").check_classes(10, task="digits")
    # weights that do not fit the spec the metadata claims
    m = onnx.load(tmp_path / "r.onnx")
    for p in m.metadata_props:
        if p.key == "tandem.router.spec":
            p.value = FeatureSpec(n_classes=5, top_k=3).to_json()
    onnx.save(m, tmp_path / "tampered.onnx")
    with pytest.raises(ConfigError, match=r"tampered\.onnx: router weights do not match"):
        load_router(tmp_path / "tampered.onnx")


def test_learned_router_beats_max_prob_where_a_feature_predicts_benefit(tmp_path: Path) -> None:
    """The edge is well calibrated except on class 0, where it is wrong 80% of the time
    however confident: max_prob cannot see that, the class-ordered log-probs can."""
    rng = np.random.default_rng(5)
    n, c = 3000, 4
    logits = (rng.normal(size=(n, c)) * rng.uniform(0.5, 4.0, size=(n, 1))).astype(np.float32)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p_max = (p / p.sum(1, keepdims=True)).max(1)
    top1 = logits.argmax(1)
    edge_ok = rng.random(n) < np.where(top1 == 0, 0.2, p_max)
    rows = RouterExamples(logits, edge_ok, np.ones(n, bool))
    tr, ho = rows.split(0.4, seed=0)
    report = train_router(tr, ho, tmp_path / "r.onnx", uses_logits=True, model="logistic")
    by = {g.name: g for g in report.gates}
    assert by["learned"].cpt < by["max_prob"].cpt - 0.05
    assert by["learned"].auroc > by["max_prob"].auroc + 0.05
    assert by["oracle"].cpt <= by["learned"].cpt
    assert report.better and "is better than" in report.verdict()
    # without the class-ordered features it cannot tell either
    plain = train_router(tr, ho, tmp_path / "p.onnx", model="logistic")
    assert not plain.better


def test_token_features_and_token_router(tmp_path: Path) -> None:
    f = token_features([-0.1, -2.0], 1.0, 100)
    np.testing.assert_allclose(
        f, [-1.05, -2.0, -1.81, 1 / math.log(100), 1.0, math.log(3)], atol=1e-9
    )
    assert np.isnan(token_features([-0.1, np.nan])).all()
    assert token_features([])[:3].tolist() == [0.0, 0.0, 0.0]
    assert token_features([-1.0], None, 0)[3:5].tolist() == [0.0, 0.0]  # entropy unknown
    rng = np.random.default_rng(6)
    probes = [rng.normal(-0.5, 1.0, size=rng.integers(1, 12)).clip(max=0) for _ in range(800)]
    ents = rng.uniform(0, 5, size=800)
    feats = np.stack([token_features(lp, e, 1000) for lp, e in zip(probes, ents, strict=True)])
    benefit = feats[:, 1] < -1.5  # a low token escalates with benefit
    spec = FeatureSpec(kind="generate")
    fitted = fit_router(feats, benefit, model="logistic")
    export_router(fitted, spec, tmp_path / "t.onnx")
    r = load_router(tmp_path / "t.onnx")
    assert r.kind == "generate" and not r.uses_hidden
    one = np.array([r.score_tokens(lp, e, 1000) for lp, e in zip(probes, ents, strict=True)])
    np.testing.assert_allclose(one, r.weights.scores(feats), atol=1e-9)
    np.testing.assert_allclose(one, fitted.weights.scores(feats), atol=1e-6)
    np.testing.assert_allclose(r.score_token_features(feats), one, atol=2e-5)
    assert one[benefit].mean() < 0.3 < 0.7 < one[~benefit].mean()
    assert math.isnan(r.score_tokens([np.nan]))
    with pytest.raises(ValueError, match="score_tokens"):
        r.score_batch(np.zeros((1, 3)))
    with pytest.raises(ConfigError, match="generate model"):
        load_router(tmp_path / "t.onnx", n_classes=3)


def test_expose_hidden_adds_a_second_output(tmp_path: Path, tiny_models: Path) -> None:
    edge = tiny_models / "edge-int8.onnx"
    out, name, width = expose_hidden(edge, None, tmp_path / "edge-h.onnx")
    assert width == 32 and "Relu" in name
    x = np.random.default_rng(0).uniform(0, 1, size=(5, 64)).astype(np.float32)
    np.testing.assert_array_equal(OnnxBackend(out).predict(x), OnnxBackend(edge).predict(x))
    assert [o.name for o in onnx.load(out).graph.output][1] == name
    with pytest.raises(ConfigError, match="no node computes a tensor named 'nope'"):
        expose_hidden(edge, "nope", tmp_path / "x.onnx")


def _policy(tmp_path: Path, edge: Path, log: Path | None = None) -> Path:
    policy = {
        "version": 1,
        "tasks": {
            "digits": {
                "local": {"path": str(edge)},
                "gate": {"metric": "max_prob", "threshold": 0.5},
            }
        },
    }
    if log is not None:
        policy["escalation_log"] = {"path": str(log)}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path  # fmt: skip


def _train(policy: Path, out: Path, *args: str, task: str = "digits") -> Result:
    """``tandem router train POLICY --task TASK --out OUT ARGS...`` in this process."""
    return CliRunner().invoke(
        app, ["router", "train", str(policy), "--task", task, "--out", str(out), *args]
    )


def test_cli_trains_from_a_real_escalation_log(tmp_path: Path, tiny_models: Path) -> None:
    """Rows written by EscalationLog (real sqlite); the cloud disagrees with the edge on the
    least confident rows and on class 3, so there is something to learn."""
    edge = tiny_models / "edge-int8.onnx"
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 1, size=(400, 64)).astype(np.float32)
    logits = OnnxBackend(edge).predict(x) * 8
    p = np.exp(logits - logits.max(1, keepdims=True))
    p_max = (p / p.sum(1, keepdims=True)).max(1)
    top1 = logits.argmax(1)
    wrong = (p_max < np.quantile(p_max, 0.3)) | (rng.random(400) < 0.1)
    cloud = np.where(wrong, (top1 + 1) % 10, top1)
    log_path = tmp_path / "escalations.sqlite"
    with EscalationLog(log_path, synchronous="normal") as log:
        for i in range(400):
            log.append(EscalationRecord(
                ts_ms=int(time.time() * 1000), request_id=f"r{i}", task="digits", tier="cloud",
                reason="audit" if i % 4 == 0 else "gate", tags=[], input=x[i], input_digest="",
                edge_output=logits[i], edge_label=int(top1[i]), edge_confidence=float(p_max[i]),
                cloud_output=None, cloud_label=int(cloud[i]), error=None, timings_ms={},
                model_versions={"edge": "v1"}))  # fmt: skip
        log.append(EscalationRecord(  # the cloud did not answer: skipped
            ts_ms=0, request_id="x", task="digits", tier="edge-degraded", reason="gate", tags=[],
            input=x[0], input_digest="", edge_output=logits[0], edge_label=0,
            edge_confidence=0.1, cloud_output=None, cloud_label=None, error="timeout",
            timings_ms={}, model_versions={"edge": "v1"}))  # fmt: skip
    policy = _policy(tmp_path, edge, log_path)
    out = tmp_path / "router.onnx"
    res = _train(policy, out, "--min-rows", "100", "--json", str(tmp_path / "r.json"))
    assert res.exit_code == 0, res.output
    assert "max_prob" in res.output and "learned" in res.output and "type: learned" in res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["rows_train"] + report["rows_holdout"] == 400
    names = [g["name"] for g in report["gates"]]
    assert names == ["max_prob", "margin", "entropy", "learned", "oracle"]
    r = load_router(out, n_classes=10)
    assert r.provenance["source"] == str(log_path) and r.provenance["task"] == "digits"
    # the log is too small for --min-rows: a clear refusal, no file
    res = _train(policy, tmp_path / "r2.onnx", "--min-rows", "1000")
    assert res.exit_code == 1 and "fewer than --min-rows 1000" in res.output
    assert not (tmp_path / "r2.onnx").exists()
    res = _train(policy, tmp_path / "r3.onnx", task="nope")
    assert res.exit_code == 1 and "no task 'nope'" in res.output


@pytest.mark.slow
def test_cli_reference_digits_end_to_end(tmp_path: Path) -> None:
    """Train on the calib split of the reference digits, judge on the test split (~30 s)."""
    from tandem.reference.models import EDGE, build_reference_models
    from tandem.runtime.manifest import load_manifest

    models = build_reference_models()
    edge = models / load_manifest(models).get(EDGE).file
    policy = _policy(tmp_path, edge)
    res = _train(policy, tmp_path / "r.onnx", "--reference", "digits", "--hidden", "auto",
                 "--json", str(tmp_path / "r.json"))  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["rows_holdout"] == 1800 and report["rows_train"] == 1795
    gates = {g["name"]: g for g in report["gates"]}
    assert 0.3 < gates["max_prob"]["cpt"] < 0.6  # the 43% on this split
    assert gates["oracle"]["cpt"] < gates["learned"]["cpt"]
    r = load_router(tmp_path / "r.onnx", n_classes=10)
    assert r.uses_hidden and r.spec.hidden_dim == 32 and r.spec.hidden_tensor


def test_cli_trains_from_labelled_data_with_the_hidden_vector(
    tmp_path: Path, tiny_models: Path
) -> None:
    """--data: the edge model (and its exposed hidden layer) runs on x here."""
    edge = tiny_models / "edge-int8.onnx"
    rng = np.random.default_rng(8)
    x = rng.uniform(0, 1, size=(300, 64)).astype(np.float32)
    edge_top1 = OnnxBackend(edge).predict(x).argmax(1)
    y = np.where(rng.random(300) < 0.6, edge_top1, rng.integers(0, 10, 300))
    np.savez(tmp_path / "d.npz", x=x, y=y, cloud_logits=np.eye(10)[y] * 5)
    out = tmp_path / "r.onnx"
    policy = _policy(tmp_path, edge)
    res = _train(policy, out, "--data", str(tmp_path / "d.npz"), "--hidden", "auto", "--model",
                 "logistic")  # fmt: skip
    assert res.exit_code == 0, res.output
    r = load_router(out, n_classes=10)
    assert r.uses_hidden and r.spec.hidden_dim == 32 and r.provenance["rows"] == 210
    np.savez(tmp_path / "bad.npz", x=x)
    res = _train(policy, tmp_path / "b.onnx", "--data", str(tmp_path / "bad.npz"))
    assert res.exit_code == 1 and "needs arrays 'x' and 'y'" in res.output
