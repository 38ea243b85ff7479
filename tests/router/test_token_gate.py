"""Token-confidence gates and generation-task policies."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tandem.router.policy import TokenGateSpec, policy_from_dict
from tandem.router.routing import TaskRouter, TokenGate
from tandem.runtime.errors import ConfigError

LP = [math.log(0.9), math.log(0.2), math.log(0.8), math.log(0.95)]


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("token_mean", math.exp(np.mean(LP))),
        ("token_min", 0.2),
        ("token_quantile", math.exp(np.quantile(LP, 0.25))),
    ],
)
def test_token_metrics(metric: str, expected: float) -> None:
    gate = TokenGate(TokenGateSpec(metric=metric, threshold=0.5, quantile=0.25))
    assert gate.score(LP) == pytest.approx(expected)
    assert gate.accepts(gate.score(LP)) == (expected >= 0.5)


def test_min_is_below_mean_so_it_escalates_where_the_mean_hides_one_bad_token() -> None:
    mean = TokenGate(TokenGateSpec(metric="token_mean", threshold=0.5))
    low = TokenGate(TokenGateSpec(metric="token_min", threshold=0.5))
    assert mean.accepts(mean.score(LP)) and not low.accepts(low.score(LP))


def test_first_entropy_is_normalised_and_escalates_above() -> None:
    gate = TokenGate(TokenGateSpec(metric="first_entropy", threshold=0.5))
    assert gate.score([], first_entropy=math.log(16), n_vocab=256) == pytest.approx(0.5)
    assert gate.accepts(0.4) and not gate.accepts(0.6)


def test_unknown_confidence_is_never_accepted() -> None:
    for metric in ("token_mean", "token_min", "token_quantile"):
        gate = TokenGate(TokenGateSpec(metric=metric, threshold=0.0))
        assert math.isnan(gate.score([]))
        assert not gate.accepts(gate.score([]))
        assert not gate.accepts(gate.score([float("nan")]))
    ent = TokenGate(TokenGateSpec(metric="first_entropy", threshold=1.0))
    assert not ent.accepts(ent.score([], None, 100))


def _gen(**task) -> dict:
    base = {"kind": "generate", "local": {"path": "m.gguf"}, "gate": {"threshold": 0.5}}
    return {"tasks": {"t": {**base, **task}}}


def test_generation_policy_defaults_and_router() -> None:
    p = policy_from_dict(_gen(cloud={"endpoint": "tcp://127.0.0.1:1", "model": "m"}))
    t = p.tasks["t"]
    assert t.kind == "generate" and t.mode == "probe" and t.handoff == "continue"
    assert t.local.format == "gguf" and t.gate.metric == "token_min"
    router = TaskRouter(t)
    assert isinstance(router.gate, TokenGate)
    assert router.decide(0.4).escalate and not router.decide(0.6).escalate


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({"gate": {"threshold": 1.5}}, "tasks.t.gate.threshold: must be between 0 and 1"),
        ({"mode": "sometimes"}, "tasks.t.mode: "),
        ({"gate": {"metric": "first_entropy", "threshold": 0.5}}, "needs mode 'upfront'"),
        ({"rules": [{"tag": "critical", "route": "cloud"}]}, "no cloud target"),
        ({"probe_tokens": 0}, "tasks.t.probe_tokens"),
        ({"local": {"path": "m.gguf", "format": "onnx"}}, "tasks.t.local.format"),
        ({"mood": 1}, "did you mean 'mode'"),
    ],
)
def test_generation_policy_errors_name_the_key(task: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        policy_from_dict(_gen(**task), source="p.yaml")
    assert "p.yaml: " in str(e.value) and message in str(e.value)


def test_an_unknown_task_kind_is_named() -> None:
    with pytest.raises(ConfigError, match=r"'generat'.*'classify', 'generate'"):
        policy_from_dict({"tasks": {"t": {"kind": "generat"}}})
