"""The routing decision for one task: pre-route rules on tags, the confidence gate, the
escalation budget. Steps 1 and 4 of the request path; pure and cheap (a few hundred ns)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from tandem.router.policy import (
    GateMetric,
    GateSpec,
    GenerateTaskPolicy,
    Route,
    TaskPolicy,
    TokenGateMetric,
    TokenGateSpec,
)
from tandem.runtime.errors import ConfigError


class ConfidenceGate:
    """Accepts an edge answer when its confidence clears the threshold.

    ``max_prob``/``margin``: accept when the value is >= threshold. ``entropy``: the entropy in
    nats is normalised by log(C) into [0, 1] and accepted when <= threshold, so it needs C >= 2
    (:meth:`check_classes` refuses a smaller model when the task is set up).
    """

    def __init__(self, spec: GateSpec) -> None:
        self.metric = spec.metric
        self.threshold = spec.threshold

    def check_classes(self, n_classes: int, *, task: str) -> None:
        """:class:`ConfigError` if this gate cannot score a model with ``n_classes`` classes
        (0: the model has no class axis)."""
        if self.metric is GateMetric.ENTROPY and n_classes < 2:
            raise ConfigError(
                f"task {task!r}: gate metric 'entropy' is normalised by log(C) and needs a "
                f"model with at least 2 classes, this one has {n_classes}"
            )

    def score(self, max_prob: float, margin: float, entropy: float, n_classes: int) -> float:
        """The value this gate compares with its threshold. ``entropy`` with ``n_classes`` < 2
        raises :class:`ValueError`: there is nothing to normalise by, and any fixed value
        would either always or never escalate without saying so."""
        if self.metric is GateMetric.MAX_PROB:
            return max_prob
        if self.metric is GateMetric.MARGIN:
            return margin
        if n_classes < 2:
            raise ValueError(f"the entropy gate needs at least 2 classes, got {n_classes}")
        return entropy / math.log(n_classes)

    def accepts(self, score: float) -> bool:
        """False for NaN (an invalid row is never accepted)."""
        if self.metric is GateMetric.ENTROPY:
            return score <= self.threshold
        return score >= self.threshold


class TokenGate:
    """Accepts a generated answer (or its first tokens) when its token confidence clears the
    threshold; see :class:`~tandem.router.policy.TokenGateMetric`. Token log-probs come from
    the logits rows through :func:`tandem.kernels.confidence_row` (see
    :func:`tandem.runtime.generation.token_confidence`)."""

    def __init__(self, spec: TokenGateSpec) -> None:
        self.metric = spec.metric
        self.threshold = spec.threshold
        self.quantile = spec.quantile

    def score(
        self, logprobs: Sequence[float], first_entropy: float | None = None, n_vocab: int = 0
    ) -> float:
        """The gate's value for these token log-probs (NaN when there are none, or when the
        entropy is unknown: an OpenAI-compatible server does not return it)."""
        if self.metric is TokenGateMetric.FIRST_ENTROPY:
            if first_entropy is None or n_vocab < 2:
                return math.nan
            return first_entropy / math.log(n_vocab)
        if not len(logprobs):
            return math.nan
        lp = np.asarray(logprobs, dtype=np.float64)
        if self.metric is TokenGateMetric.TOKEN_MEAN:
            return math.exp(lp.mean())
        if self.metric is TokenGateMetric.TOKEN_MIN:
            return math.exp(lp.min())
        return math.exp(np.quantile(lp, self.quantile))

    def probe_score(
        self, logprobs: Sequence[float], first_entropy: float | None = None, n_vocab: int = 0
    ) -> float:
        """The score an answer's probe (its first tokens: ``probe_tokens``, or one up front)
        is decided on: :meth:`score`, except that a probe with no tokens (the model ended at
        once, EOS) leaves nothing to doubt: 1.0."""
        if self.metric is not TokenGateMetric.FIRST_ENTROPY and not len(logprobs):
            return 1.0
        return self.score(logprobs, first_entropy, n_vocab)

    def window_score(self, logprobs: Sequence[float], window: int) -> float:
        """The score mode midstream watches as an answer grows: :meth:`score` of the last
        ``window`` tokens."""
        return self.score(logprobs[-window:])

    def accepts(self, score: float) -> bool:
        """False for NaN (unknown confidence is never accepted)."""
        if self.metric is TokenGateMetric.FIRST_ENTROPY:
            return score <= self.threshold
        return score >= self.threshold


class TokenBucket:
    """Escalations allowed per second, with a burst. Thread-safe."""

    def __init__(self, rate_per_s: float, burst: int | None = None) -> None:
        self.rate = float(rate_per_s)
        self.capacity = float(burst if burst is not None else max(1.0, self.rate))
        self._tokens = self.capacity
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def try_take(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


@dataclass(frozen=True, slots=True)
class Decision:
    escalate: bool
    reason: str  # e.g. "confident", "low-confidence", "rule:private", "budget"


ACCEPT = Decision(False, "confident")
NO_CLOUD = Decision(False, "no-cloud-target")
OVER_BUDGET = Decision(False, "budget-exhausted")
LOW_CONFIDENCE = Decision(True, "low-confidence")
INVALID_OUTPUT = Decision(True, "invalid-edge-output")


class TaskRouter:
    """Routes one task's requests as its :class:`TaskPolicy` says."""

    def __init__(self, policy: TaskPolicy | GenerateTaskPolicy) -> None:
        self.policy = policy
        self.gate: ConfidenceGate | TokenGate = (
            TokenGate(policy.gate)
            if isinstance(policy, GenerateTaskPolicy)
            else ConfidenceGate(policy.gate)
        )
        self.has_cloud = policy.cloud is not None
        self.budget = (
            TokenBucket(policy.budget.escalations_per_s, policy.budget.burst)
            if policy.budget
            else None
        )
        self._rules = [
            (r.tag, Decision(r.route is Route.CLOUD, f"rule:{r.tag}")) for r in policy.rules
        ]

    def pre_route(self, tags: Collection[str]) -> Decision | None:
        """The first rule whose tag is present, or None (the gate decides)."""
        if tags:
            for tag, decision in self._rules:
                if tag in tags:
                    return decision
        return None

    def decide(self, score: float, valid: bool = True) -> Decision:
        """Gate and budget. A rule that forces the cloud bypasses this (and the budget)."""
        if valid and self.gate.accepts(score):
            return ACCEPT
        if not self.has_cloud:
            return NO_CLOUD
        if self.budget is not None and not self.budget.try_take():
            return OVER_BUDGET
        return INVALID_OUTPUT if not valid else LOW_CONFIDENCE
