"""What differs between two policies: key paths with old and new values
(:func:`policy_changes`), per task (:func:`task_changes`), a digest that names a policy
(:func:`policy_digest`), and what two routings of the same logged rows do
(:func:`compare_routings`: escalation rate and routed accuracy of each with Wilson score
intervals, and the change with a paired bootstrap interval). ``tandem policy diff``
(:mod:`tandem.policy_replay`) and the edge runtime's policy reload
(:mod:`tandem.edge.policy_reload`) use them.

Key paths are as a policy file spells them, with list items by index::

    tasks.digits.gate.threshold: 0.8 -> 0.9
    tasks.digits.rules[1]: (absent) -> {'tag': 'critical', 'route': 'cloud'}
    tasks.sort: (absent) -> {...}                   # a task added

Defaults count: a key the new file sets to its default value is no change.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from tandem.router.calibrate import Estimate
from tandem.router.policy import Policy

ABSENT: Any = type("Absent", (), {"__repr__": lambda _self: "(absent)"})()
TaskChangeKind = Literal["added", "removed", "changed", "unchanged"]


@dataclass(frozen=True)
class Change:
    """One key that differs: its path, the old and the new value (:data:`ABSENT` when a side
    lacks it)."""

    path: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.path}: {_show(self.old)} -> {_show(self.new)}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "old": None if self.old is ABSENT else self.old,
            "new": None if self.new is ABSENT else self.new,
            "added": self.old is ABSENT,
            "removed": self.new is ABSENT,
        }


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _plain(policy: Policy) -> dict[str, Any]:
    return policy.model_dump(mode="json")


def policy_digest(policy: Policy) -> str:
    """The first 16 hex digits of the sha256 of the policy's canonical JSON (every key, its
    defaults filled in): equal for files that differ only in comments, layout or a default
    spelled out."""
    text = json.dumps(_plain(policy), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def policy_changes(old: Policy, new: Policy) -> list[Change]:
    """Every key whose value differs, in the files' order; a task (or any section) added or
    removed is one change with the whole section as its value."""
    out: list[Change] = []
    _walk("", _plain(old), _plain(new), out)
    return out


def _walk(path: str, a: Any, b: Any, out: list[Change]) -> None:
    if a == b:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in [*a, *(k for k in b if k not in a)]:
            sub = f"{path}.{k}" if path else str(k)
            _walk(sub, a.get(k, ABSENT), b.get(k, ABSENT), out)
        return
    if isinstance(a, list) and isinstance(b, list):
        for i in range(max(len(a), len(b))):
            _walk(
                f"{path}[{i}]",
                a[i] if i < len(a) else ABSENT,
                b[i] if i < len(b) else ABSENT,
                out,
            )
        return
    out.append(Change(path, a, b))


def task_changes(old: Policy, new: Policy) -> dict[str, TaskChangeKind]:
    """Each task of either policy: ``added``, ``removed``, ``changed`` or ``unchanged``."""
    out: dict[str, TaskChangeKind] = {}
    for name in [*old.tasks, *(n for n in new.tasks if n not in old.tasks)]:
        if name not in new.tasks:
            out[name] = "removed"
        elif name not in old.tasks:
            out[name] = "added"
        else:
            out[name] = "unchanged" if old.tasks[name] == new.tasks[name] else "changed"
    return out


# ------------------------------------------------------------------- two routings, one log
@dataclass(frozen=True)
class RoutingComparison:
    """Two routings of the same rows: how many escalate under each, how many flip each way,
    and — on the rows whose answer is known — the escalation rate and the routed accuracy of
    each (95% Wilson score intervals) with the 95% paired bootstrap interval of the difference
    (new - old). ``accuracy_flips``: rows right under one routing and wrong under the other."""

    rows: int
    escalated: tuple[int, int]  # (old, new)
    to_cloud: int  # flips: edge under old, cloud under new
    to_edge: int  # flips: cloud under old, edge under new
    escalation_rate: tuple[Estimate, Estimate]
    escalation_delta: Estimate
    accuracy: tuple[Estimate, Estimate] | None  # None: no row with a known answer
    accuracy_delta: Estimate | None
    accuracy_rows: int
    accuracy_flips: int = 0

    def as_dict(self) -> dict[str, Any]:
        def pair(p: tuple[Estimate, Estimate] | None) -> dict[str, Any] | None:
            return None if p is None else {"old": p[0].as_dict(), "new": p[1].as_dict()}

        return {
            "rows": self.rows,
            "escalated": {"old": self.escalated[0], "new": self.escalated[1]},
            "flips": {"to_cloud": self.to_cloud, "to_edge": self.to_edge},
            "escalation_rate": pair(self.escalation_rate),
            "escalation_delta": self.escalation_delta.as_dict(),
            "accuracy_rows": self.accuracy_rows,
            "accuracy_flips": self.accuracy_flips,
            "accuracy": pair(self.accuracy),
            "accuracy_delta": None
            if self.accuracy_delta is None
            else self.accuracy_delta.as_dict(),
        }


Z95 = 1.959963984540054  # the normal's 97.5% quantile: two-sided 95% intervals


def wilson(k: int, n: int, z: float = Z95) -> Estimate:
    """The proportion ``k / n`` with its Wilson score interval (95%): unlike a bootstrap it is
    not [0, 0] when ``k`` is 0 (0 of 100 is 0% [0%, 3.7%])."""
    if n <= 0:
        return Estimate(float("nan"), float("nan"), float("nan"))
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return Estimate(float(p), float(min(low, p)), float(max(high, p)))


def _delta(samples: np.ndarray, expected: float, flips: int, n: int) -> Estimate:
    """The paired bootstrap interval of a difference of two rates on the same ``n`` rows.
    With no flip (no row that differs) every resample's difference is 0, which would claim
    certainty: the interval is then ± the Wilson upper bound of a flip rate of 0 of ``n``."""
    if flips == 0:
        u = wilson(0, n).high
        return Estimate(0.0, -u, u)
    lo, hi = np.quantile(samples, [0.025, 0.975])
    return Estimate(float(expected), float(min(lo, expected)), float(max(hi, expected)))


def compare_routings(
    escalate_old: np.ndarray,
    escalate_new: np.ndarray,
    right_old: np.ndarray | None = None,
    right_new: np.ndarray | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> RoutingComparison:
    """Compare two routings of the same N rows. ``escalate_*``: (N,) bool, the row goes to the
    cloud. ``right_*``: (N,) float, 1 when the answer the row ends with under that routing is
    right, 0 when wrong, NaN when unknown (accuracy is taken over the rows known under both).
    Intervals, 95%: each rate's by Wilson score (:func:`wilson`); the difference's with the
    rows resampled together (a paired bootstrap, ``n_boot`` resamples), so it is much tighter
    than the two side by side; with no flip it is ± the Wilson bound of 0 flips in N rows.
    The statistics depend only on how many rows fall in each (old, new) cell, so each
    resample is one multinomial draw of those four counts (as
    :func:`tandem.router.calibrate.choose_threshold` does)."""
    eo = np.asarray(escalate_old, bool)
    en = np.asarray(escalate_new, bool)
    n = len(eo)
    if len(en) != n or n == 0:
        raise ValueError("both routings need the same rows, at least one")
    rng = np.random.default_rng(seed)
    rate_o, rate_n = _paired(eo, en, rng, n_boot)
    acc: tuple[Estimate, Estimate] | None = None
    acc_delta: Estimate | None = None
    known = acc_flips = 0
    if right_old is not None and right_new is not None:
        ro, rn = np.asarray(right_old, np.float64), np.asarray(right_new, np.float64)
        mask = np.isfinite(ro) & np.isfinite(rn)
        known = int(mask.sum())
        if known:
            ro, rn = ro[mask] > 0.5, rn[mask] > 0.5
            a_o, a_n = _paired(ro, rn, rng, n_boot)
            acc_flips = int((ro != rn).sum())
            acc = (wilson(int(ro.sum()), known), wilson(int(rn.sum()), known))
            acc_delta = _delta(a_n - a_o, float(rn.mean() - ro.mean()), acc_flips, known)
    flips = int((eo != en).sum())
    return RoutingComparison(
        rows=n,
        escalated=(int(eo.sum()), int(en.sum())),
        to_cloud=int((~eo & en).sum()),
        to_edge=int((eo & ~en).sum()),
        escalation_rate=(wilson(int(eo.sum()), n), wilson(int(en.sum()), n)),
        escalation_delta=_delta(rate_n - rate_o, float(en.mean() - eo.mean()), flips, n),
        accuracy=acc,
        accuracy_delta=acc_delta,
        accuracy_rows=known,
        accuracy_flips=acc_flips,
    )


def _paired(
    a: np.ndarray, b: np.ndarray, rng: np.random.Generator, n_boot: int
) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap means of two (N,) bool arrays over the same resampled rows."""
    n = len(a)
    counts = np.bincount(a.astype(np.int64) * 2 + b, minlength=4)
    draws = rng.multinomial(n, counts / n, size=n_boot) / n
    return draws[:, 2] + draws[:, 3], draws[:, 1] + draws[:, 3]
