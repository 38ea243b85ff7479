from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tandem.router.policy import GateMetric, Route, load_policy
from tandem.runtime.errors import ConfigError

GOOD = """
version: 1
escalation_log: {path: logs/esc.sqlite}
tasks:
  digits:
    local: {path: models/edge.onnx, labels: ["a", "b"]}
    cloud: {endpoint: "tcp://127.0.0.1:5555", model: digits-cloud}
    gate: {metric: margin, threshold: 0.25}
    rules:
      - {tag: private, route: local}
      - {tag: critical, route: cloud}
    budget: {escalations_per_s: 10, burst: 20}
    deadline_ms: 50
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "policy.yaml"
    p.write_text(text)
    return p


def test_good_policy_loads_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    pol = load_policy(write(tmp_path, GOOD))
    t = pol.tasks["digits"]
    assert t.local.path == tmp_path / "models/edge.onnx"
    assert (
        pol.escalation_log is not None and pol.escalation_log.path == tmp_path / "logs/esc.sqlite"
    )
    assert t.gate.metric is GateMetric.MARGIN and t.gate.threshold == 0.25
    assert [r.route for r in t.rules] == [Route.LOCAL, Route.CLOUD]
    assert t.budget is not None and t.budget.burst == 20


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "threshold: 0.25",
            "threshold: 1.5",
            "tasks.digits.gate.threshold: must be between 0 and 1, got 1.5",
        ),
        (
            "threshold: 0.25",
            "treshold: 0.25",
            "tasks.digits.gate.treshold: unknown key (did you mean 'threshold'?)",
        ),
        (
            "metric: margin",
            "metric: confidence",
            "tasks.digits.gate.metric: must be 'max_prob', 'margin' or 'entropy', got 'confidence'",
        ),
        (
            "route: cloud}",
            "route: clod}",
            "tasks.digits.rules.1.route: must be 'local' or 'cloud', got 'clod'",
        ),
        (
            '"tcp://127.0.0.1:5555"',
            "localhost",
            "tasks.digits.cloud.endpoint: must be a ZeroMQ endpoint",
        ),
        (
            "deadline_ms: 50",
            "deadline_ms: 0",
            "tasks.digits.deadline_ms: must be greater than or equal to 1, got 0",
        ),
        (
            "escalations_per_s: 10",
            "escalations_per_s: 0",
            "tasks.digits.budget.escalations_per_s: must be greater than 0",
        ),
        ("version: 1", "version: 2", "version: must be 1, got 2"),
        (
            "    deadline_ms: 50",
            "    deadline_ms: 50\n    colour: red",
            "tasks.digits.colour: unknown key",
        ),
    ],
)
def test_bad_policy_names_file_key_and_expectation(tmp_path: Path, old, new, message) -> None:
    assert old in GOOD
    p = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(ConfigError) as info:
        load_policy(p)
    assert f"{p}: {message}" in info.value.message


def test_every_error_is_reported_not_just_the_first(tmp_path: Path) -> None:
    bad = GOOD.replace("threshold: 0.25", "threshold: 2").replace(
        "deadline_ms: 50", "deadline_ms: -1"
    )
    with pytest.raises(ConfigError) as info:
        load_policy(write(tmp_path, bad))
    assert len(info.value.message.splitlines()) == 2


def test_rule_to_cloud_without_cloud_target(tmp_path: Path) -> None:
    bad = GOOD.replace('    cloud: {endpoint: "tcp://127.0.0.1:5555", model: digits-cloud}\n', "")
    with pytest.raises(ConfigError, match="no cloud target"):
        load_policy(write(tmp_path, bad))


def test_yaml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_policy(write(tmp_path, "tasks: [unclosed"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_policy(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="tasks: required key is missing"):
        load_policy(write(tmp_path, "version: 1\n"))


def test_cli_policy_check(tmp_path: Path) -> None:
    good = write(tmp_path, GOOD)
    run = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "policy", "check", str(good)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and "OK" in run.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("threshold: 0.25", "threshold: 1.5"))
    run = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "policy", "check", str(bad)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert "tasks.digits.gate.threshold: must be between 0 and 1, got 1.5" in run.stderr


def test_policy_from_a_dict_resolves_paths_and_names_its_source(tmp_path: Path) -> None:
    from tandem.router.policy import policy_from_dict

    data = {"tasks": {"t": {"local": {"path": "m.onnx"}, "gate": {"threshold": 0.5}}}}
    assert policy_from_dict(data, base_dir=tmp_path).tasks["t"].local.path == tmp_path / "m.onnx"
    data["tasks"]["t"]["gate"]["threshold"] = 2
    with pytest.raises(ConfigError, match=r"^<policy>: tasks.t.gate.threshold: must be between"):
        policy_from_dict(data)
