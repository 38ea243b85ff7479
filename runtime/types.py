"""Types both sides share: what an answer looks like."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np


class Tier(StrEnum):
    """Who answered. ``edge-degraded``: the router wanted the cloud, but the cloud was
    unreachable, too slow for the deadline, or returned an error — so the edge's own answer is
    returned, marked."""

    EDGE = "edge"
    CLOUD = "cloud"
    EDGE_DEGRADED = "edge-degraded"


@dataclass(slots=True)
class Result:
    """One answer.

    ``output`` is the answering model's output row (logits unless the policy says the model
    emits probabilities); ``index`` its arg-max (-1 when the edge output was NaN/inf and the
    cloud did not answer) and ``label`` the matching label (the index when the policy names no
    labels; None when index is -1). ``confidence`` is the edge model's score under the task's
    gate metric — what the routing decision was made on. ``timings`` are milliseconds:
    ``local``, ``route``, ``cloud`` and ``log`` (when escalated), and ``total``; when the cloud
    answered, also ``cloud_queue`` and ``cloud_compute``, the worker's own measures of the time
    the request waited there and of the model run that answered it (its batch's run), so
    ``cloud - cloud_queue - cloud_compute`` is the network and the wire's share.

    ``stage``: where the answer stopped — ``edge`` (also when degraded), ``cloud`` (the task's
    cloud target), ``tier:1``, ``tier:2``... (the policy's ``tiers``). ``model_versions`` has
    ``edge`` (with a model store: ``"v0003:ab12cd34ef56"``, the version and its file's
    sha256), ``cloud``, ``tier:N`` for every tier that answered, and ``router`` for a learned
    gate. ``shadow_escalate``: whether the task's shadow gate would have escalated (None: no
    shadow gate).
    """

    output: np.ndarray
    index: int
    label: Any
    tier: Tier
    confidence: float
    reason: str
    timings: dict[str, float]
    model_versions: dict[str, str]
    request_id: str | None = None  # set when the request was escalated (escalation log key)
    stage: str = "edge"
    shadow_escalate: bool | None = None


@dataclass(slots=True)
class AnswerChunk:
    """Part of a streamed answer: the text and token ids one tier produced, with each token's
    log-probability under the model that produced it (NaN where an OpenAI-compatible server
    did not say). ``restart``: everything streamed before this chunk is withdrawn and the
    answer starts over here (a ``midstream`` hand-off with ``handoff: restart``)."""

    text: str
    tokens: list[int]
    tier: Tier
    logprobs: list[float]
    restart: bool = False
    token_texts: list[str] | None = None  # each token's text, where known (the edge's tokens)
    # speculative decoding: per token, whether the edge drafted it (and the cloud accepted it)
    drafted: list[bool] | None = None


@dataclass(slots=True)
class GenerationResult:
    """A whole answer. Per token: ``tokens``, ``token_tiers`` and ``logprobs`` (same length);
    ``tiers`` the tiers used in order. ``confidence`` is the gate's score where the routing
    decision was made (None when a rule decided). ``escalated_at``: the number of answer
    tokens that were kept from the edge when the cloud took over (None: it never did).
    ``timings`` (ms): ``ttft`` (call to first token), ``total``, ``local`` and ``cloud``;
    ``inter_token_ms``: the gap before each token after the first, as the caller saw it.
    The cloud's part (``deadline_ms``) is counted from when the cloud is asked."""

    text: str
    tokens: list[int]
    token_tiers: list[Tier]
    logprobs: list[float]
    tiers: list[Tier]
    confidence: float | None
    reason: str
    finish_reason: str
    timings: dict[str, float]
    inter_token_ms: list[float]
    model_versions: dict[str, str]
    escalated_at: int | None = None
    prompt_tokens: int | None = None  # the prompt's length in the edge model's tokens
    request_id: str | None = None
    # speculative decoding (mode speculative, escalated): rounds, drafted, accepted,
    # acceptance, gammas (γ per round), fallback (the rest streamed), the controller's estimates
    speculation: dict[str, Any] | None = None
    # the answer's path through the edge's state machine (tandem.edge.answer.Phase values),
    # e.g. ["route", "probe", "cloud", "degraded", "done"]
    phases: list[str] = field(default_factory=list)
    shadow_escalate: bool | None = None  # the task's shadow gate's verdict (None: no shadow)

    @property
    def degraded(self) -> bool:
        return Tier.EDGE_DEGRADED in self.tiers
