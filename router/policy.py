"""Routing policy files: YAML, validated once by pydantic, trusted afterwards.

.. code-block:: yaml

    version: 1
    escalation_log: {path: escalations.sqlite}    # optional; relative to this file
    tasks:
      digits:
        local: {path: edge-int8.onnx, labels: ["0", "1", ...]}
        cloud: {endpoint: "tcp://127.0.0.1:5555", model: digits-cloud}
        gate: {metric: max_prob, threshold: 0.8}   # escalate when max_prob < 0.8
        rules:                                     # first matching tag wins
          - {tag: private, route: local}           # never leaves the device
          - {tag: critical, route: cloud}          # always escalates
        budget: {escalations_per_s: 50, burst: 100}
        deadline_ms: 50

Relative paths are resolved against the policy file's folder. Unknown keys are errors.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from tandem.runtime.config import ConfigPath, StrictModel, load_config, validate_config

_ENDPOINT = re.compile(r"^(tcp://[^:/\s]+:\d{1,5}|ipc://\S+|inproc://\S+)$")


def _between_0_and_1(v: float) -> float:
    if not 0.0 <= v <= 1.0:
        raise ValueError("must be between 0 and 1")
    return v


Probability = Annotated[float, AfterValidator(_between_0_and_1)]


class Route(StrEnum):
    LOCAL = "local"
    CLOUD = "cloud"


class GateMetric(StrEnum):
    """What the gate compares with its threshold. ``max_prob`` and ``margin`` escalate when
    below it; ``entropy`` (normalised by log C into [0, 1]) escalates when above it."""

    MAX_PROB = "max_prob"
    MARGIN = "margin"
    ENTROPY = "entropy"


class GateSpec(StrictModel):
    metric: GateMetric = GateMetric.MAX_PROB
    threshold: Probability


class RuleSpec(StrictModel):
    tag: str = Field(min_length=1)
    route: Route


class BudgetSpec(StrictModel):
    """Token bucket on escalations: ``escalations_per_s`` refill, at most ``burst`` saved up."""

    escalations_per_s: float = Field(gt=0)
    burst: int | None = Field(default=None, ge=1)


class LocalModelSpec(StrictModel):
    """The on-device model: any ONNX classifier whose first output is (N, C) scores."""

    path: ConfigPath
    version: str | None = None  # default: first 12 hex digits of the file's sha256
    output: Literal["logits", "probabilities"] = "logits"
    labels: list[str] | None = None
    threads: int = Field(default=1, ge=0)


class CloudTargetSpec(StrictModel):
    endpoint: str
    model: str = Field(min_length=1)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not _ENDPOINT.match(v):
            raise ValueError("must be a ZeroMQ endpoint like tcp://host:port or ipc:///path")
        return v


class TaskPolicy(StrictModel):
    local: LocalModelSpec
    cloud: CloudTargetSpec | None = None  # no cloud: every request answers on the device
    gate: GateSpec
    rules: list[RuleSpec] = Field(default_factory=list)
    budget: BudgetSpec | None = None
    deadline_ms: int = Field(default=100, ge=1, le=3_600_000)

    @model_validator(mode="after")
    def _cloud_rules_need_cloud(self) -> TaskPolicy:
        if self.cloud is None and any(r.route is Route.CLOUD for r in self.rules):
            raise ValueError("a rule routes to the cloud but the task has no cloud target")
        return self


class EscalationLogSpec(StrictModel):
    path: ConfigPath
    # "full": fsync at every commit, survives power loss; "normal": survives a process crash.
    synchronous: Literal["full", "normal"] = "full"
    store_inputs: bool = True


class Policy(StrictModel):
    version: Literal[1] = 1
    tasks: dict[str, TaskPolicy] = Field(min_length=1)
    escalation_log: EscalationLogSpec | None = None


def load_policy(path: str | Path) -> Policy:
    """Load and validate a policy file; raises :class:`~tandem.runtime.errors.ConfigError`
    naming every bad key."""
    p = Path(path)
    return load_config(p, Policy, base_dir=p.parent)


def policy_from_dict(data: dict, *, base_dir: str | Path = ".", source: str = "<policy>") -> Policy:
    return validate_config(data, Policy, source=source, base_dir=Path(base_dir))
