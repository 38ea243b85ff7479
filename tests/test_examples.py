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


def test_example_llm_policy_and_worker_config_validate() -> None:
    policy = load_policy(EXAMPLES / "llm-policy.yaml")
    task = policy.tasks["sort"]
    assert task.kind == "generate" and task.local.path == EXAMPLES / "llm-models" / "edge-q8_0.gguf"
    worker = load_worker_config(EXAMPLES / "llm-worker.yaml")
    assert worker.models_dir == EXAMPLES / "llm-models" and worker.generation.max_streams == 8


def test_example_chat_policy_and_worker_config_validate() -> None:
    policy = load_policy(EXAMPLES / "chat-policy.yaml")
    assert policy.tasks["chat"].local.path == EXAMPLES / "chat-models" / "chat-edge-q8_0.gguf"
    worker = load_worker_config(EXAMPLES / "chat-worker.yaml")
    assert worker.models_dir == EXAMPLES / "chat-models" and worker.models == ["chat-cloud"]
