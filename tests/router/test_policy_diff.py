"""``tandem policy diff``: key paths that differ, and the replay of an escalation log written
by a real runtime (tiny ONNX models, a real worker process, audited and escalated rows)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from tandem.cli import app, policy_cmd
from tandem.edge import EdgeRuntime, EscalationLog, EscalationRecord
from tandem.kernels.confidence import confidence
from tandem.reference.models import CLOUD, LABELS
from tandem.router.policy import load_policy, policy_from_dict
from tandem.router.policy_diff import (
    compare_routings,
    policy_changes,
    policy_digest,
    task_changes,
    wilson,
)
from tandem.runtime.backends.onnx import OnnxBackend

runner = CliRunner()


def doc(models: Path, threshold: float, endpoint: str = "tcp://127.0.0.1:5555", **kw) -> dict:
    return {
        "version": 1,
        "tasks": {
            "digits": {
                "local": {"path": str(models / "edge-int8.onnx"), "labels": LABELS},
                "cloud": {"endpoint": endpoint, "model": CLOUD},
                "gate": {"metric": "max_prob", "threshold": threshold},
                "rules": [{"tag": "critical", "route": "cloud"}],
                "deadline_ms": 10_000,
                **kw,
            }
        },
    }


def test_changes_name_key_paths_and_ignore_spelled_out_defaults(tiny_models) -> None:
    a = policy_from_dict(doc(tiny_models, 0.5))
    b_doc = doc(tiny_models, 0.7, audit_rate=0.0)  # 0.0 is the default: no change
    b_doc["tasks"]["digits"]["rules"].append({"tag": "private", "route": "local"})
    b_doc["tasks"]["sort"] = doc(tiny_models, 0.1)["tasks"]["digits"]
    b = policy_from_dict(b_doc)
    got = [str(c) for c in policy_changes(a, b)]
    assert got[:2] == [
        "tasks.digits.gate.threshold: 0.5 -> 0.7",
        "tasks.digits.rules[1]: (absent) -> {'tag': 'private', 'route': 'local'}",
    ]
    assert got[2].startswith("tasks.sort: (absent) -> {") and len(got) == 3
    assert task_changes(a, b) == {"digits": "changed", "sort": "added"}
    assert policy_changes(a, a) == [] and policy_digest(a) == policy_digest(
        policy_from_dict(doc(tiny_models, 0.5, audit_rate=0.0))
    )
    assert policy_digest(a) != policy_digest(b)


def test_compare_routings_counts_flips_and_pairs_the_bootstrap() -> None:
    rng = np.random.default_rng(0)
    old = rng.random(2000) < 0.4
    new = old & (rng.random(2000) < 0.5)  # new escalates a subset of old's
    c = compare_routings(old, new, old.astype(float), new.astype(float), n_boot=500)
    assert c.to_cloud == 0 and c.to_edge == int(old.sum() - new.sum())
    assert c.escalated == (int(old.sum()), int(new.sum()))
    d = c.escalation_delta
    assert d.low <= d.expected <= d.high < 0
    # paired: the difference's interval is narrower than either rate's
    assert d.high - d.low < c.escalation_rate[0].high - c.escalation_rate[0].low
    with pytest.raises(ValueError):
        compare_routings(old, new[:5])


def between(scores: np.ndarray, q: float) -> float:
    """A threshold midway between two neighbouring scores, the q-quantile: no row sits near
    it, so float32 (the runtime) and float64 (the replay) scores fall on the same side."""
    s = np.sort(scores.astype(np.float64))
    k = int(q * len(s))
    return float((s[k - 1] + s[k]) / 2)


@pytest.fixture(scope="module")
def logged(tiny_models, worker, tmp_path_factory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A log written by a real runtime: 600 requests, a third tagged critical, audit_rate
    0.25, the gate's threshold at the scores' 60th percentile. Returns the policy, the log,
    the inputs and their scores."""
    tmp = tmp_path_factory.mktemp("diff")
    xs = np.random.default_rng(3).uniform(0, 1, (600, 64)).astype(np.float32)
    scores = confidence(OnnxBackend(tiny_models / "edge-int8.onnx").predict(xs)).max_prob
    threshold = between(scores, 0.6)
    policy = tmp / "old.yaml"
    d = doc(tiny_models, threshold, worker.endpoint, audit_rate=0.25)
    d["escalation_log"] = {"path": "escalations.sqlite", "synchronous": "normal"}
    policy.write_text(yaml.safe_dump(d))
    with EdgeRuntime.from_policy(policy, seed=0) as rt:
        for i, x in enumerate(xs):
            r = rt.infer(x, tags={"critical"} if i % 3 == 0 else ())
            assert r.tier.value in ("edge", "cloud")
    return policy, tmp / "escalations.sqlite", xs, scores


@pytest.mark.integration
@pytest.mark.slow
def test_replay_of_a_real_log_reproduces_the_runtime_and_shows_the_change(logged, tmp_path) -> None:
    old, log, _, scores = logged
    old_t = load_policy(old).tasks["digits"].gate.threshold
    new_doc = yaml.safe_load(old.read_text())
    new_t = between(scores, 0.3)
    new_doc["tasks"]["digits"]["gate"]["threshold"] = new_t
    new_doc["tasks"]["digits"]["rules"] = []  # critical requests: the gate decides now
    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump(new_doc))
    out = tmp_path / "diff.json"
    r = runner.invoke(
        app, ["policy", "diff", str(old), str(new), "--log", str(log), "--json", str(out)]
    )
    assert r.exit_code == 0, r.output
    print(r.output)
    assert f"tasks.digits.gate.threshold: {old_t} -> {new_t}" in r.output
    assert "tasks.digits.rules[0]: {'tag': 'critical', 'route': 'cloud'} -> (absent)" in r.output
    assert "audited rows (" in r.output and "agreement with the cloud" in r.output
    rep = json.loads(out.read_text())["replay"]["digits"]

    from tandem.edge.escalation_log import EscalationLog

    with EscalationLog(log) as elog:
        recs = list(elog.records("digits"))
    assert rep["rows"] == len(recs) and rep["skipped"] == 0
    # under OLD every logged row escalates except audited ones the gate would have accepted:
    # the replay routes exactly as the runtime did
    esc_old = np.array([not (r.reason == "audit" and r.edge_confidence >= old_t) for r in recs])
    assert all(r.reason == "rule:critical" for r in recs if "critical" in r.tags)
    assert rep["all_logged"]["escalated"]["old"] == esc_old.sum() < len(recs)
    # under NEW: the gate alone, at the lower threshold, on the confidence the edge logged
    esc_new = np.array([r.edge_confidence < new_t for r in recs])
    assert rep["all_logged"]["escalated"]["new"] == esc_new.sum()
    assert rep["all_logged"]["flips"] == {
        "to_edge": (esc_old & ~esc_new).sum(),
        "to_cloud": (~esc_old & esc_new).sum(),
    }
    a = rep["audited"]
    n_audit = sum(r.reason == "audit" for r in recs)
    assert a["rows"] == n_audit > 50
    assert a["escalation_rate"]["new"]["expected"] < a["escalation_rate"]["old"]["expected"]
    assert a["escalation_delta"]["high"] < 0  # fewer escalations, and the interval says so
    # agreement with the cloud: escalated rows agree by definition, edge rows when argmax agrees
    assert 0 < a["accuracy"]["new"]["expected"] <= a["accuracy"]["old"]["expected"] <= 1


def test_diff_without_a_log_and_errors(tiny_models, tmp_path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump(doc(tiny_models, 0.5)))
    b.write_text(yaml.safe_dump(doc(tiny_models, 0.5)))
    r = runner.invoke(app, ["policy", "diff", str(a), str(b)])
    assert r.exit_code == 0 and "no difference" in r.output
    r = runner.invoke(app, ["policy", "diff", str(a), str(b), "--json", "-"])
    assert json.loads(r.output)["changes"] == []
    b.write_text("tasks: {digits: {gate: {threshold: 2}}}\n")
    r = runner.invoke(app, ["policy", "diff", str(a), str(b)])
    assert r.exit_code == 1 and "tasks.digits.gate.threshold" in r.output
    r = runner.invoke(app, ["policy", "diff", str(a), str(a), "--log", str(tmp_path / "x.db")])
    assert r.exit_code == 1 and "does not exist" in r.output


def test_rate_intervals_are_wilson_and_no_flips_is_not_certainty() -> None:
    assert (wilson(5, 100).low, wilson(5, 100).high) == pytest.approx((0.0215, 0.1118), abs=1e-4)
    none = np.zeros(100, bool)
    c = compare_routings(none, none, np.ones(100), np.ones(100))
    zero = c.escalation_rate[0]
    assert zero.expected == zero.low == 0.0 and zero.high == pytest.approx(0.037, abs=1e-3)
    d = c.escalation_delta  # no flips: the bootstrap would say [0, 0]
    assert c.to_cloud == c.to_edge == 0 and d.expected == 0.0 and d.low == -d.high < -0.03
    acc = c.accuracy[0]
    assert acc.expected == acc.high == 1.0 and acc.low < 0.97 and c.accuracy_flips == 0
    assert c.accuracy_delta.low < 0 < c.accuracy_delta.high
    text = policy_cmd._delta(d, c.to_cloud + c.to_edge)
    assert text == "none: no flips (within ±3.7 pts at 95%)"


def _unscorable_log(path: Path, n: int) -> None:
    """Rows an edge model other than the policy's logged, without their inputs: no policy's
    edge model can score them."""
    with EscalationLog(path) as lg:
        for i in range(n):
            lg.append(
                EscalationRecord(
                    ts_ms=1_000 + i, request_id=str(i), task="digits", tier="cloud",
                    reason="audit", tags=[], input=None, input_digest="",
                    edge_output=np.zeros(10, np.float32), edge_label=0, edge_confidence=0.1,
                    cloud_output=None, cloud_label=1, error=None, timings_ms={"total": 2.0},
                    model_versions={"edge": "another-model"},
                )
            )  # fmt: skip


def test_log_errors_and_nothing_to_replay_are_messages(tiny_models, tmp_path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump(doc(tiny_models, 0.5)))
    b.write_text(yaml.safe_dump(doc(tiny_models, 0.7)))
    corrupt = b"SQLite format 3\x00" + bytes(range(256)) * 4  # sqlite3: "not a database"
    cases = (("not-a-db", b"just some text\n" * 10), ("empty.sqlite", b""), ("c.db", corrupt))
    for name, content in cases:
        bad = tmp_path / name
        bad.write_bytes(content)
        r = runner.invoke(app, ["policy", "diff", str(a), str(b), "--log", str(bad)])
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.output, r.output
        assert f"{bad} is not an escalation log (SQLite)" in lines[0]
        assert bad.read_bytes() == content  # left as it was (not made a log)
    log = tmp_path / "esc.sqlite"
    _unscorable_log(log, 20)
    r = runner.invoke(app, ["policy", "diff", str(a), str(b), "--log", str(log)])
    assert r.exit_code == 0 and r.exception is None, r.output
    assert "nothing replayed" in r.output and "none of the 20 logged rows" in r.output
    r = runner.invoke(app, ["policy", "diff", str(a), str(b), "--log", str(log), "--json", "-"])
    rep = json.loads(r.output)["replay"]["digits"]
    assert rep["all_logged"] is None and rep["audited"] is None
    assert rep["rows"] == 0 and rep["skipped"] == 20
