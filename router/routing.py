"""The routing decision for one task: pre-route rules on tags, the gate (confidence, with its
temperature, or a learned router), audit sampling, the escalation budget, and a shadow gate
that only records what it would have decided. Steps 1 and 4 of the request path; pure and
cheap (a few hundred ns for a confidence gate)."""

from __future__ import annotations

import copy
import itertools
import math
import random
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tandem.kernels.confidence import confidence, confidence_row
from tandem.router.policy import (
    AnyGate,
    GateMetric,
    GateSpec,
    GenerateTaskPolicy,
    LearnedGateSpec,
    Route,
    TaskPolicy,
    TokenGateMetric,
    TokenGateSpec,
)
from tandem.runtime.errors import ConfigError


class RowGate(Protocol):
    """A gate on a classifier's output rows: what the edge runtime calls per request."""

    threshold: float
    version: str | None  # a learned router's version (None for a confidence gate)

    def check_classes(self, n_classes: int, *, task: str) -> None: ...

    def evaluate_row(self, logits: np.ndarray, n_classes: int) -> tuple[int, float]:
        """``(top1, score)`` for one logits row (top1 -1: the row holds NaN/inf)."""
        ...

    def evaluate_batch(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(top1, scores)`` for (N, C) logits, as :meth:`evaluate_row` row by row."""
        ...

    def accepts(self, score: float) -> bool: ...

    def describe(self) -> str: ...


class ConfidenceGate:
    """Accepts an edge answer when its confidence clears the threshold.

    ``max_prob``/``margin``: accept when the value is >= threshold. ``entropy``: the entropy in
    nats is normalised by log(C) into [0, 1] and accepted when <= threshold, so it needs C >= 2
    (:meth:`check_classes` refuses a smaller model when the task is set up).
    """

    version: str | None = None

    def __init__(self, spec: GateSpec) -> None:
        self.metric = spec.metric
        self.threshold = spec.threshold
        self.temperature = spec.temperature
        self._scaled = spec.temperature != 1.0

    def evaluate_row(self, logits: np.ndarray, n_classes: int) -> tuple[int, float]:
        """``(top1, score)`` of one logits row, the statistic taken on ``logits / T`` (no copy
        when T is 1). Temperature does not move the arg-max, only the score."""
        if self._scaled:
            logits = logits / self.temperature
        top1, max_prob, margin, entropy = confidence_row(logits)
        return top1, self.score(max_prob, margin, entropy, n_classes)

    def evaluate_batch(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._scaled:
            logits = logits / self.temperature
        s = confidence(logits)
        if self.metric is GateMetric.MAX_PROB:
            scores = np.asarray(s.max_prob, np.float64)
        elif self.metric is GateMetric.MARGIN:
            scores = np.asarray(s.margin, np.float64)
        else:
            n = logits.shape[-1]
            if n < 2:
                raise ValueError(f"the entropy gate needs at least 2 classes, got {n}")
            scores = np.asarray(s.entropy, np.float64) / math.log(n)
        return np.asarray(s.top1), scores

    def describe(self) -> str:
        op = ">" if self.metric is GateMetric.ENTROPY else "<"
        t = f" T={self.temperature:g}" if self._scaled else ""
        return f"{self.metric.value}{op}{self.threshold:g}{t}"

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


class LearnedGate:
    """A learned router (:mod:`tandem.router.learned`, loaded lazily: only tasks that use one
    pay for the import): score = P(the edge's answer stands), accepted when >= threshold; NaN
    (and a row the edge model made NaN/inf) is never accepted."""

    def __init__(self, spec: LearnedGateSpec) -> None:
        from tandem.router.learned import load_router

        self.threshold = spec.threshold
        self.path = spec.model
        self.router = load_router(spec.model)
        self.version: str | None = str(self.router.version)
        if self.router.uses_hidden:
            raise ConfigError(
                f"{spec.model}: this router reads the edge model's hidden layer, and the runtime "
                "feeds routers logits only; train one without the hidden embedding"
            )

    def check_classes(self, n_classes: int, *, task: str) -> None:
        want = int(self.router.n_classes)
        if n_classes != want:
            raise ConfigError(
                f"task {task!r}: the learned router {self.path} was trained on {want} classes, "
                f"the edge model has {n_classes}"
            )

    def evaluate_row(self, logits: np.ndarray, n_classes: int) -> tuple[int, float]:
        top1 = confidence_row(logits)[0]
        return top1, (float(self.router.score_row(logits)) if top1 >= 0 else math.nan)

    def evaluate_batch(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        top1 = np.asarray(confidence(logits).top1)
        scores = np.asarray(self.router.score_batch(logits), np.float64)
        return top1, np.where(top1 >= 0, scores, math.nan)

    def accepts(self, score: float) -> bool:
        return score >= self.threshold

    def describe(self) -> str:
        return f"learned:{self.version}<{self.threshold:g}"


def make_gate(spec: AnyGate) -> RowGate:
    """The gate a policy's ``gate`` (or ``shadow.gate``) names."""
    if isinstance(spec, LearnedGateSpec):
        return LearnedGate(spec)
    return ConfidenceGate(spec)


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
    reason: str  # e.g. "confident", "low-confidence", "rule:private", "budget", "audit"


ACCEPT = Decision(False, "confident")
NO_CLOUD = Decision(False, "no-cloud-target")
OVER_BUDGET = Decision(False, "budget-exhausted")
LOW_CONFIDENCE = Decision(True, "low-confidence")
INVALID_OUTPUT = Decision(True, "invalid-edge-output")
AUDIT = Decision(True, "audit")


class TaskRouter:
    """Routes one task's requests as its :class:`TaskPolicy` says.

    ``audit_rate``: that share of the requests the gate decides goes to the cloud with reason
    ``audit``, whatever the gate says, drawn from this router's own RNG (``seed``: reproducible
    runs): the audited rows of the escalation log are then an unbiased sample of the traffic
    (the gate's escalations alone are not), which is what ``tandem calibrate --log`` picks
    thresholds on. An audit takes an escalation from the budget like any other (the budget
    protects the cloud; an audit it cannot pay for is skipped), and rules still win
    (``private`` never leaves)."""

    def __init__(self, policy: TaskPolicy | GenerateTaskPolicy, *, seed: int | None = None) -> None:
        self.policy = policy
        self.gate: Any
        self.shadow: Any = None
        if isinstance(policy, GenerateTaskPolicy):
            self.gate = TokenGate(policy.gate)
            if policy.shadow is not None:
                self.shadow = TokenGate(policy.shadow.gate)
        else:
            self.gate = make_gate(policy.gate)
            if policy.shadow is not None:
                self.shadow = make_gate(policy.shadow.gate)
        self.has_cloud = policy.cloud is not None
        self.budget = (
            TokenBucket(policy.budget.escalations_per_s, policy.budget.burst)
            if policy.budget
            else None
        )
        self._rules = [
            (r.tag, Decision(r.route is Route.CLOUD, f"rule:{r.tag}")) for r in policy.rules
        ]
        self.audit_rate = policy.audit_rate if self.has_cloud else 0.0
        self._rng = random.Random(seed)

    def pre_route(self, tags: Collection[str]) -> Decision | None:
        """The first rule whose tag is present, or None (the gate decides)."""
        if tags:
            for tag, decision in self._rules:
                if tag in tags:
                    return decision
        return None

    def decide(self, score: float, valid: bool = True) -> Decision:
        """Gate, audit and budget. A rule that forces the cloud bypasses this (and the budget)."""
        # every request the gate decides is drawn for audit alike, whatever the gate says, so
        # the audited rows are an unbiased sample of that traffic (what calibration needs)
        audit = self.audit_rate and self._rng.random() < self.audit_rate
        if audit and (self.budget is None or self.budget.try_take()):
            return AUDIT
        if valid and self.gate.accepts(score):
            return ACCEPT
        if not self.has_cloud:
            return NO_CLOUD
        if self.budget is not None and not self.budget.try_take():
            return OVER_BUDGET
        return INVALID_OUTPUT if not valid else LOW_CONFIDENCE


def _value(counter: itertools.count[int]) -> int:
    """How many times ``next`` was called on ``counter`` (a copy is advanced, not it)."""
    return next(copy.copy(counter))


class RoutingStats:
    """One task's routing counters, kept across model swaps (``EdgeRuntime.stats()``):

    * ``stages``: answers by where they stopped (``edge``, ``cloud``, ``tier:1``...);
    * ``shadow``: the active and the shadow gate's verdicts on the same requests (before
      rules, budget and audit: what each gate would decide);
    * ``cascade``: escalated requests, how many reached the top tier, and the requests the
      top tier did not see (what the cascade saves against sending every escalation there).
    """

    def __init__(self, n_tiers: int = 0) -> None:
        self._lock = threading.Lock()
        self.n_tiers = n_tiers
        # one itertools.count per stage: next() is atomic under the GIL, so the edge path
        # counts without taking a lock (a stage seen for the first time takes it once)
        self._stages: dict[str, itertools.count[int]] = {}
        # requests, active, shadow, both, only_active, only_shadow
        self._shadow = [0, 0, 0, 0, 0, 0]
        self._escalated = 0
        self._top = 0
        self.swaps = 0
        self.swaps_refused = 0

    def record(self, stage: str, active: bool | None = None, shadow: bool | None = None) -> None:
        """Count one answer; ``active``/``shadow``: the two gates' verdicts (escalate?) when a
        shadow gate runs."""
        counter = self._stages.get(stage)
        if counter is None:
            with self._lock:
                counter = self._stages.setdefault(stage, itertools.count())
        next(counter)
        if shadow is None:
            return
        with self._lock:
            c = self._shadow
            c[0] += 1
            c[1] += active
            c[2] += shadow
            c[3] += active and shadow
            c[4] += active and not shadow
            c[5] += shadow and not active

    def record_cascade(self, escalated: int, reached_top: int) -> None:
        with self._lock:
            self._escalated += escalated
            self._top += reached_top

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            stages = {k: _value(c) for k, c in list(self._stages.items())}
            out: dict[str, Any] = {"stages": stages}
            c = self._shadow
            out["shadow"] = dict(
                zip(
                    ("requests", "active", "shadow", "both", "only_active", "only_shadow"),
                    c,
                    strict=True,
                )
            )
            if self.n_tiers:
                out["cascade"] = {
                    "escalated": self._escalated,
                    "top_tier": self._top,
                    "saved": self._escalated - self._top,
                    "saved_share": (1 - self._top / self._escalated) if self._escalated else 0.0,
                }
            out["swaps"] = {"done": self.swaps, "refused": self.swaps_refused}
            return out
