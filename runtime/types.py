"""Types both sides share: what an answer looks like."""

from __future__ import annotations

from dataclasses import dataclass
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
    ``local``, ``route``, ``cloud`` and ``log`` (when escalated), and ``total``.
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
