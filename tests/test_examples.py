"""The example files in the README are valid."""

from __future__ import annotations

from pathlib import Path

from tandem.cloud.config import load_worker_config
from tandem.router.policy import load_policy

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_example_policy_and_worker_config_validate() -> None:
    policy = load_policy(EXAMPLES / "policy.yaml")
    assert policy.tasks["digits"].local.path == EXAMPLES / "models" / "edge-int8.onnx"
    worker = load_worker_config(EXAMPLES / "worker.yaml")
    assert worker.models_dir == EXAMPLES / "models"
