"""Policy edits a human can review: comments, order and flow style kept; validated before
anything is written; written atomically with a backup."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.router.policy import load_policy
from tandem.router.policy_edit import edit_task
from tandem.runtime.errors import ConfigError

POLICY = """\
# the robot's policy
version: 1
tasks:
  digits:
    local: {path: model.onnx}   # the edge model
    cloud: {endpoint: "tcp://127.0.0.1:5555", model: digits-cloud}
    gate: {metric: max_prob, threshold: 0.8}
    rules:
      - {tag: private, route: local}  # never leaves the device
    deadline_ms: 50  # ms
  sort:
    kind: generate
    local: {path: lm.gguf}
    gate:
      metric: token_min   # escalate when a token's p is below
      threshold: 0.5
"""

RECORD = {
    "date": "2026-01-02T03:04:05+00:00",
    "objective": "max-escalation=0.2",
    "data": {"source": "calib.npz", "sha256": "ab" * 32, "rows": 1800},
    "models": {"edge": "v0001", "cloud": "digits-cloud@1"},
    "escalation_rate": {"expected": 0.2, "low": 0.18, "high": 0.22},
    "accuracy": {"expected": 0.8, "low": 0.78, "high": 0.82},
    "score_quantiles": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
}


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "lm.gguf").write_bytes(b"")
    p = tmp_path / "policy.yaml"
    p.write_text(POLICY)
    return p


def test_edit_keeps_comments_order_and_flow_style_and_validates(policy: Path) -> None:
    edit = edit_task(policy, "digits", threshold=0.4321, temperature=1.25, calibration=RECORD)
    new = edit.new_text
    for comment in ("# the robot's policy", "# the edge model", "# never leaves the device"):
        assert comment in new
    assert "gate: {metric: max_prob, threshold: 0.4321, temperature: 1.25}" in new
    assert "deadline_ms: 50  # ms" in new
    # only the gate line changed in what was there; the record came after the task's last key
    diff = edit.diff()
    assert diff.count("\n-") - diff.count("\n---") == 1
    assert new.index("deadline_ms") < new.index("calibration:") < new.index("  sort:")
    assert "escalation_rate: {expected: 0.2, low: 0.18, high: 0.22}" in new
    tp = edit.policy.tasks["digits"]
    assert tp.gate.threshold == 0.4321 and tp.gate.temperature == 1.25
    assert tp.calibration is not None and tp.calibration.data["rows"] == 1800
    assert policy.read_text() == POLICY  # nothing written yet


def test_second_edit_replaces_the_record_in_place(policy: Path, tmp_path: Path) -> None:
    out = tmp_path / "p2.yaml"
    edit_task(policy, "digits", threshold=0.4, calibration=RECORD).write(out)
    again = edit_task(
        out, "digits", threshold=0.5, calibration={**RECORD, "objective": "recovery=0.8"}
    )
    assert again.new_text.count("calibration:") == 1
    assert "objective: recovery=0.8" in again.new_text
    assert again.policy.tasks["digits"].gate.threshold == 0.5


def test_refuses_an_edit_that_would_not_validate(policy: Path) -> None:
    with pytest.raises(ConfigError, match=r"tasks\.digits\.gate\.threshold: must be between 0"):
        edit_task(policy, "digits", threshold=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        edit_task(policy, "digits", threshold=0.5, temperature=0.0)
    with pytest.raises(ConfigError, match="only a confidence gate has a temperature"):
        edit_task(policy, "sort", threshold=0.5, temperature=2.0)
    with pytest.raises(ConfigError, match=r"no such task.*digits, sort"):
        edit_task(policy, "nope", threshold=0.5)
    assert policy.read_text() == POLICY


def test_generation_task_threshold_keeps_block_style(policy: Path) -> None:
    edit = edit_task(policy, "sort", threshold=0.35)
    assert "      metric: token_min   # escalate when a token's p is below\n" in edit.new_text
    assert "      threshold: 0.35\n" in edit.new_text
    assert edit.policy.tasks["sort"].gate.threshold == 0.35


def test_write_in_place_keeps_a_backup_and_out_writes_elsewhere(
    policy: Path, tmp_path: Path
) -> None:
    edit = edit_task(policy, "digits", threshold=0.3, calibration=RECORD)
    dest = edit.write()
    assert dest == policy
    assert (tmp_path / "policy.yaml.bak").read_text() == POLICY
    assert load_policy(policy).tasks["digits"].gate.threshold == 0.3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".policy")]  # no temp left
    # to another folder, relative paths would resolve there: validated against it first
    other = tmp_path / "elsewhere"
    other.mkdir()
    edit2 = edit_task(policy, "digits", threshold=0.2)
    edit2.write(other / "policy.yaml")
    assert load_policy(other / "policy.yaml").tasks["digits"].gate.threshold == 0.2
