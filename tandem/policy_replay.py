"""``tandem policy diff OLD NEW --log escalations.sqlite`` as a library: what a policy change
would do, shown before it is applied.

:func:`diff_policies` lists the keys that differ (:func:`tandem.router.policy_diff.policy_changes`)
and, given an escalation log, replays each task's logged requests under both policies: the
pre-route rules on the logged tags, and the gate on the edge model's output (the logged
output when the policy's edge model is the one that logged the row, else that model run again
on the stored input — as ``tandem calibrate`` scores rows, :func:`tandem.calibration.gate_scores`).
The cloud's logged answer is the label, so accuracy is agreement with the cloud.

What the log can replay, and what it cannot (the report says so per task):

* the log holds the requests the edge *escalated*, not the ones it answered itself. Only
  *audited* rows (``audit_rate``: a random share of the traffic the gate decides) are a sample
  of the traffic, so the escalation rate and routed agreement, old and new, with intervals,
  are taken on them; on all logged rows only the flips from cloud to edge are visible;
* budgets (they depend on the timing of every request), audit draws (random) and cascade tiers
  beyond the first cloud are not replayed; deadlines only as a count of logged cloud answers
  that took longer than the new ``deadline_ms``;
* generation tasks are scored on the token log-probs the edge logged, as ``tandem calibrate``
  does; their mode and probe length are not replayed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandem.calibration_rows import Rows, edge_model
from tandem.runtime.errors import ConfigError

MIN_AUDITED_FOR_RATES = 30  # fewer audited rows: the rates are printed with a warning


@dataclass
class TaskReplay:
    """One task's logged requests under both policies (:func:`replay_task`)."""

    task: str
    kind: str
    rows: int  # logged rows replayed
    skipped: int  # logged rows neither policy's edge model could score
    logged: Any | None  # RoutingComparison on every logged row (biased: escalated ones);
    # None: no row both policies' edge models could score (nothing replayed, a note says why)
    audited: Any | None  # RoutingComparison on the audited rows (a sample of traffic)
    over_deadline: tuple[int, int]  # logged cloud answers slower than (old, new) deadline_ms
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "kind": self.kind,
            "rows": self.rows,
            "skipped": self.skipped,
            "all_logged": None if self.logged is None else self.logged.as_dict(),
            "audited": None if self.audited is None else self.audited.as_dict(),
            "over_deadline": {"old": self.over_deadline[0], "new": self.over_deadline[1]},
            "notes": self.notes,
        }


@dataclass
class PolicyDiff:
    old: str
    new: str
    changes: list[Any]  # router.policy_diff.Change
    tasks: dict[str, str]  # task -> added | removed | changed | unchanged
    log: str | None
    replays: dict[str, TaskReplay]
    notes: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "old": self.old,
            "new": self.new,
            "changes": [c.as_dict() for c in self.changes],
            "tasks": self.tasks,
            "log": self.log,
            "replay": {k: v.as_dict() for k, v in self.replays.items()},
            "notes": self.notes,
        }


def diff_policies(
    old_path: str | Path,
    new_path: str | Path,
    *,
    log: str | Path | None = None,
    task: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> PolicyDiff:
    """What differs between the policy files, and with ``log`` what the change does to the
    logged traffic of each task both policies have (or only ``task``)."""
    from tandem.router.policy import load_policy
    from tandem.router.policy_diff import policy_changes, task_changes

    old, new = load_policy(old_path), load_policy(new_path)
    kinds = task_changes(old, new)
    if task is not None and task not in kinds:
        raise ConfigError(f"--task: no task {task!r} in either policy ({', '.join(kinds)})")
    changes = policy_changes(old, new)
    if task is not None:
        changes = [c for c in changes if c.path.split(".")[:2] == ["tasks", task]]
    out = PolicyDiff(str(old_path), str(new_path), changes, kinds, None, {}, [])
    if log is None:
        return out
    out.log = str(log)
    names = [task] if task is not None else list(kinds)
    for name in names:
        if kinds[name] in ("added", "removed"):
            out.notes.append(f"task {name!r} is {kinds[name]}: nothing to replay")
            continue
        out.replays[name] = replay_task(
            Path(log), name, old.tasks[name], new.tasks[name], n_boot=n_boot, seed=seed
        )
    return out


def replay_task(
    log_path: Path, task: str, old: Any, new: Any, *, n_boot: int = 1000, seed: int = 0
) -> TaskReplay:
    """Route ``task``'s logged rows under the task policies ``old`` and ``new``."""
    from tandem.router.policy_diff import compare_routings

    if not log_path.is_file():
        raise ConfigError(f"--log: {log_path} does not exist")
    if old.kind != new.kind:
        raise ConfigError(f"task {task!r} changes kind ({old.kind} -> {new.kind}): no replay")
    recs = _read_log(log_path, task)
    if not recs:
        raise ConfigError(f"{log_path}: no logged row of task {task!r}")
    notes: list[str] = []
    if old.kind == "generate":
        right_o, esc_o, ok_o = _generation(recs, old)
        right_n, esc_n, ok_n = _generation(recs, new)
        notes.append("generation: scored on the logged token log-probs; mode not replayed")
    else:
        right_o, esc_o, ok_o = _classify(recs, old, notes)
        right_n, esc_n, ok_n = (
            (right_o, esc_o, ok_o)
            if new.local == old.local and new.gate == old.gate and new.rules == old.rules
            and (new.cloud is None) == (old.cloud is None)
            else _classify(recs, new, notes)
        )  # fmt: skip
    keep = ok_o & ok_n
    audited = np.array([r.reason.startswith("audit") for r in recs]) & keep
    logged = audit_cmp = None
    if not keep.any():
        notes.append(
            f"none of the {len(recs)} logged rows could be scored by both policies' edge "
            "models (a model other than the logging one, and no stored input it can run on, "
            "or outputs of another size): nothing replayed"
        )
    else:
        logged = compare_routings(
            esc_o[keep], esc_n[keep], right_o[keep], right_n[keep], n_boot=n_boot, seed=seed
        )
    if audited.any():
        audit_cmp = compare_routings(
            esc_o[audited], esc_n[audited], right_o[audited], right_n[audited],
            n_boot=n_boot, seed=seed,
        )  # fmt: skip
        if audited.sum() < MIN_AUDITED_FOR_RATES:
            notes.append(f"only {int(audited.sum())} audited rows: the intervals are wide")
    elif keep.any():
        notes.append(
            "no audited rows (audit_rate 0 when logged): escalation rates and accuracy over "
            "all traffic cannot be estimated; only flips among the logged rows are shown"
        )
    notes.extend(_not_replayed(old, new))
    took = np.array([float(r.timings_ms.get("total", np.nan)) for r in recs if r.tier == "cloud"])
    return TaskReplay(
        task=task,
        kind=old.kind,
        rows=int(keep.sum()),
        skipped=int((~keep).sum()),
        logged=logged,
        audited=audit_cmp,
        over_deadline=(int((took > old.deadline_ms).sum()), int((took > new.deadline_ms).sum())),
        notes=notes,
    )


SQLITE_HEADER = b"SQLite format 3\x00"


def _read_log(log_path: Path, task: str) -> list[Any]:
    """``task``'s rows of the escalation log at ``log_path``; a file that is not one is a
    :class:`ConfigError` naming it (and is left as it was: an empty file is not made a log)."""
    import sqlite3

    from tandem.edge.escalation_log import EscalationLog

    try:
        with log_path.open("rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError as e:
        raise ConfigError(f"--log: {log_path}: cannot read: {e.strerror or e}") from None
    if header != SQLITE_HEADER:
        raise ConfigError(
            f"--log: {log_path} is not an escalation log (SQLite): "
            + ("the file is empty" if not header else "no SQLite header")
        )
    try:
        with EscalationLog(log_path) as elog:
            return list(elog.records(task))
    except sqlite3.Error as e:
        raise ConfigError(f"--log: {log_path} is not an escalation log (SQLite): {e}") from None


def _rule(tp: Any, tags: Any) -> bool | None:
    """The first matching rule's verdict (escalate?), None when no rule matches."""
    for rule in tp.rules:
        if rule.tag in tags:
            return rule.route.value == "cloud"
    return None


def _route(tp: Any, recs: list[Any], escalate_by_gate: np.ndarray) -> np.ndarray:
    if tp.cloud is None:
        return np.zeros(len(recs), bool)
    rules = [_rule(tp, set(r.tags)) for r in recs]
    return np.array(
        [g if v is None else v for v, g in zip(rules, escalate_by_gate, strict=True)], bool
    )


def _right(edge_right: np.ndarray, escalate: np.ndarray, known: np.ndarray) -> np.ndarray:
    """1/0: the answer the row ends with agrees with the cloud's; NaN: no cloud answer."""
    out = np.where(escalate, 1.0, edge_right.astype(np.float64))
    return np.where(known, out, np.nan)


def _classify(recs: list[Any], tp: Any, notes: list[str]) -> tuple[np.ndarray, ...]:
    from tandem.calibration import accept_threshold, gate_scores

    edge = edge_model(tp)
    n = len(recs)
    c = max(len(np.asarray(r.edge_output).reshape(-1)) for r in recs)
    logits = np.full((n, c), np.nan)
    ok = np.zeros(n, bool)
    rerun = [
        i
        for i, r in enumerate(recs)
        if r.model_versions.get("edge") != edge.version and r.input is not None and r.input.size
    ]
    for i, r in enumerate(recs):
        out = np.asarray(r.edge_output, np.float64).reshape(-1)
        if r.model_versions.get("edge") == edge.version and len(out) == c:
            logits[i], ok[i] = out, True
    if rerun:
        shape = recs[rerun[0]].input.shape
        rerun = [i for i in rerun if recs[i].input.shape == shape]
        out = edge.predict(np.stack([recs[i].input for i in rerun]))
        if tp.local.output == "probabilities":
            with np.errstate(divide="ignore"):
                out = np.log(out)
        if out.shape[1] == c:
            logits[rerun], ok[rerun] = out, True
        notes.append(f"{len(rerun)} rows run again through edge model {edge.version}")
    labels = np.array([-1 if r.cloud_label is None else r.cloud_label for r in recs])
    known = labels >= 0
    safe = np.where(np.isfinite(logits), logits, 0.0)
    edge_right = np.argmax(safe, axis=1) == labels
    rows = Rows(edge_right, known, ok, "log", "", {"edge": edge.version}, logits=safe)
    scores = gate_scores(rows, tp.gate)
    esc = _route(tp, recs, ~(np.nan_to_num(scores, nan=-np.inf) >= accept_threshold(tp.gate)))
    return _right(edge_right, esc, known & ok), esc, ok


def _generation(recs: list[Any], tp: Any) -> tuple[np.ndarray, ...]:
    from tandem.calibration import accept_threshold, gate_scores

    def norm(text: Any) -> str:
        return " ".join(str(text or "").split())

    gens = [r.generation or {} for r in recs]
    known = np.array([g.get("cloud") is not None for g in gens])
    edge_right = np.array(
        [
            norm((g.get("edge") or {}).get("text")) == norm((g.get("cloud") or {}).get("text"))
            for g in gens
        ]
    )
    n = len(recs)
    rows = Rows(
        edge_right,
        known,
        np.ones(n, bool),
        "log",
        "",
        {},
        logprobs=[np.asarray(r.edge_output, np.float64).reshape(-1) for r in recs],
        logged_scores=np.array(
            [np.nan if r.edge_confidence is None else r.edge_confidence for r in recs]
        ),
    )
    scores = gate_scores(rows, tp.gate)
    esc = _route(tp, recs, ~(np.nan_to_num(scores, nan=-np.inf) >= accept_threshold(tp.gate)))
    return _right(edge_right, esc, known), esc, np.ones(n, bool)


def _not_replayed(old: Any, new: Any) -> list[str]:
    out = []
    for key, what in (
        ("budget", "budget: not replayed (it depends on the timing of every request)"),
        ("audit_rate", "audit_rate: not replayed (random draws); audited rows stay a sample"),
        ("tiers", "tiers: only the first cloud is replayed"),
    ):
        if getattr(old, key, None) != getattr(new, key, None):
            out.append(f"changed {what}")
    if old.cloud != new.cloud and old.cloud is not None and new.cloud is not None:
        out.append("changed cloud target: its answers are not in the log; the logged ones are used")
    return out
