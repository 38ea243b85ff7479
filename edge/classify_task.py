"""A classification task on the edge: its policy compiled into an ONNX model, a router and a
cloud client (:class:`ClassifyTask`), and how its rows escalate: to the cloud in one request
within the deadline, then up the policy's ``tiers`` (each tier's gate on the answer of the tier
before: a FrugalGPT cascade), degraded to the last answer on any failure, logged.

A task object is immutable once built: a model swap builds a new one
(:func:`open_classify_task`) and the runtime replaces its reference, so a request that took
the old object finishes on it."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tandem.edge.escalation_log import EscalationLog
from tandem.kernels.confidence import confidence, confidence_row
from tandem.router.drift import DriftAlarm, DriftMonitor
from tandem.router.drift import warm_up as warm_up_drift
from tandem.router.policy import (
    TaskPolicy,
    TierSpec,
)
from tandem.router.routing import ConfidenceGate, Decision, RoutingStats, TaskRouter
from tandem.runtime import logs
from tandem.runtime.backends.onnx import OnnxBackend
from tandem.runtime.client import CloudClient
from tandem.runtime.errors import BadRequest, ConfigError, DeadlineExceeded, TandemError
from tandem.runtime.registry import class_count
from tandem.runtime.types import Result, Tier
from tandem.runtime.wire import new_request_id

log = logging.getLogger(__name__)
Tags = Collection[str]


@dataclass(frozen=True)
class CascadeTier:
    """One tier after the task's cloud: its gate on the answer before, and its worker(s)."""

    stage: str  # "tier:1", "tier:2", ...
    spec: TierSpec
    gate: ConfidenceGate
    client: CloudClient


@dataclass
class ClassifyTask:
    """A classification task's policy compiled into the objects that serve it."""

    name: str
    policy: TaskPolicy
    router: TaskRouter
    backend: OnnxBackend
    client: CloudClient | None
    labels: list[str] | None
    n_classes: int
    versions: dict[str, str]
    row_ndim: int
    probabilities: bool  # the local model emits probabilities (logged to logits here)
    tiers: list[CascadeTier] = field(default_factory=list)
    stats: RoutingStats = field(default_factory=RoutingStats)  # the runtime's, kept on swaps
    drift: DriftMonitor | None = None
    serving: str | None = None  # the model store's version name (or swap_model's) it serves

    def label(self, index: int) -> Any:
        if index < 0:
            return None
        return self.labels[index] if self.labels else index

    def edge_result(
        self,
        logits: np.ndarray,
        top1: int,
        score: float,
        reason: str,
        timings: dict[str, float],
        shadow: bool | None = None,
    ) -> Result:
        return Result(
            output=logits,
            index=top1,
            label=self.label(top1),
            tier=Tier.EDGE,
            confidence=score,
            reason=reason,
            timings=timings,
            model_versions=dict(self.versions),
            shadow_escalate=shadow,
        )

    def observe(self, stage: str, score: float, gate_escalates: bool, shadow: bool | None) -> None:
        """Count one answer (its stage, the two gates' verdicts) and feed the drift alarm."""
        self.stats.record(stage, gate_escalates, shadow)
        if self.drift is not None:
            self.drift.observe(score, gate_escalates)

    def local(self, batch: np.ndarray) -> np.ndarray:
        """The local model's logits for ``batch`` (log of its probabilities, if it gives those)."""
        out = self.backend.predict(batch)
        if self.probabilities:
            with np.errstate(divide="ignore"):
                out = np.log(out)
        return out

    def escalate(
        self,
        inputs: np.ndarray,
        edge_logits: np.ndarray,
        top1: list[int],
        scores: list[float],
        decisions: list[Decision],
        tags: Tags,
        t0: float,
        t1: float,
        t2: float,
        budget_ms: float,
        escalation_log: EscalationLog | None,
        shadows: Sequence[bool | None] | None = None,
    ) -> list[Result]:
        """Send ``inputs`` to the cloud within what is left of ``budget_ms``, then up the
        tiers; fall back to the last answer (the edge's: degraded) on any failure; log every
        row with its final answer."""
        n = len(inputs)
        assert self.client is not None and self.policy.cloud is not None
        wire_id = new_request_id()  # the request's id on the wire too: one id end to end
        request_id = wire_id.hex()
        logged = logs.CURRENT_REQUEST.set(logs.RequestTag(wire_id))  # log lines name it
        try:
            left_s = budget_ms / 1e3 - (time.perf_counter() - t0)
            cloud_out: np.ndarray | None = None
            error: TandemError | None = None
            versions = dict(self.versions)
            worker_ms: dict[str, float] = {}  # the worker's own clock: its queue and its model run
            try:
                if left_s <= 0:
                    raise DeadlineExceeded("deadline spent before the cloud could be asked")
                reply = self.client.infer(
                    self.policy.cloud.model,
                    inputs,
                    task=self.name,
                    tags=tuple(sorted(tags)),
                    timeout_s=left_s,
                    request_id=wire_id,
                )
                if reply["outputs"].shape != edge_logits.shape:
                    raise BadRequest(
                        f"cloud answered shape {reply['outputs'].shape}, the edge model "
                        f"{edge_logits.shape}"
                    )
                cloud_out = reply["outputs"]
                for ours, theirs in (("cloud_queue", "queue_ms"), ("cloud_compute", "run_ms")):
                    v = reply.get(theirs)
                    if isinstance(v, int | float) and math.isfinite(v) and v >= 0:
                        worker_ms[ours] = float(v)
                versions["cloud"] = _model_version(reply, self.policy.cloud.model)
            except TandemError as e:
                error = e
                log.info("task %s: cloud failed (%s), answering on the edge", self.name, e.code)
            t3 = time.perf_counter()
            timings = {
                "local": (t1 - t0) * 1e3,
                "route": (t2 - t1) * 1e3,
                "cloud": (t3 - t2) * 1e3,
                **worker_ms,
                "total": (t3 - t0) * 1e3,
            }
            stages = ["cloud"] * n
            notes = [""] * n
            row_versions: list[dict[str, str]] = [versions] * n
            if cloud_out is not None and self.tiers:
                cloud_out, tv = self._climb(
                    inputs, cloud_out, tags, t0, budget_ms, stages, notes, timings
                )
                row_versions = [_versions_upto(versions, tv, st) for st in stages]
                t3 = time.perf_counter()
                timings["total"] = (t3 - t0) * 1e3
            results = []
            for i in range(n):
                if cloud_out is not None:
                    out, tier, reason = cloud_out[i], Tier.CLOUD, decisions[i].reason + notes[i]
                    index = int(np.argmax(out))
                    stage = stages[i]
                else:
                    out, tier, index = edge_logits[i], Tier.EDGE_DEGRADED, top1[i]
                    reason = f"{decisions[i].reason}; cloud-{error.code if error else 'error'}"
                    stage = "edge"
                results.append(
                    Result(
                        output=out,
                        index=index,
                        label=self.label(index),
                        tier=tier,
                        confidence=scores[i],
                        reason=reason,
                        timings=dict(timings),
                        model_versions=dict(row_versions[i]),
                        request_id=f"{request_id}:{i}" if n > 1 else request_id,
                        stage=stage,
                        shadow_escalate=None if shadows is None else shadows[i],
                    )
                )
            if escalation_log is not None:
                try:  # only queues the rows; storage failures are counted in stats(), never raised
                    self._log_rows(
                        escalation_log, inputs, edge_logits, cloud_out, top1, results, tags, error
                    )
                except Exception:  # the answer still goes back: a robot must not stall on a log
                    log.exception("task %s: escalation log append failed", self.name)
                t4 = time.perf_counter()
                for r in results:
                    r.timings["log"] = (t4 - t3) * 1e3
                    r.timings["total"] = (t4 - t0) * 1e3
        finally:
            logs.CURRENT_REQUEST.reset(logged)
        return results

    def _climb(
        self,
        inputs: np.ndarray,
        outputs: np.ndarray,
        tags: Tags,
        t0: float,
        budget_ms: float,
        stages: list[str],
        notes: list[str],
        timings: dict[str, float],
    ) -> tuple[np.ndarray, dict[str, str]]:
        """The cascade: each tier's gate on the rows' current answers; the rows it does not
        accept go to that tier's cloud (in requests of its ``max_rows``) within what is left of
        the deadline. A tier that fails leaves its rows with the answer before, notes why, and
        ends the climb. Returns the final outputs and the versions of the tiers that answered;
        ``stages``, ``notes`` and ``timings`` (``tier:N`` ms) are filled in."""
        rows = np.arange(len(inputs))
        versions: dict[str, str] = {}
        reached_top = 0
        for tier in self.tiers:
            top1, sc = tier.gate.evaluate_batch(outputs[rows])
            ok = [t >= 0 and tier.gate.accepts(float(s)) for t, s in zip(top1, sc, strict=True)]
            climb = rows[~np.asarray(ok, bool)]
            if tier is self.tiers[-1]:
                reached_top = len(climb)
            if not len(climb):
                break
            ta = time.perf_counter()
            try:
                got = []
                step = tier.spec.cloud.max_rows
                for k in range(0, len(climb), step):
                    part = climb[k : k + step]
                    left_s = budget_ms / 1e3 - (time.perf_counter() - t0)
                    if left_s <= 0:
                        raise DeadlineExceeded(f"deadline spent before {tier.stage} was asked")
                    reply = tier.client.infer(
                        tier.spec.cloud.model,
                        inputs[part],
                        task=self.name,
                        tags=tuple(sorted(tags)),
                        timeout_s=left_s,
                        request_id=new_request_id(),
                    )
                    if reply["outputs"].shape != (len(part), outputs.shape[1]):
                        raise BadRequest(
                            f"{tier.stage} answered shape {reply['outputs'].shape}, expected "
                            f"{(len(part), outputs.shape[1])}"
                        )
                    got.append(reply)
            except TandemError as e:
                log.info("task %s: %s failed (%s)", self.name, tier.stage, e.code)
                for i in climb:
                    notes[i] += f"; {tier.stage}-{e.code}"
                timings[tier.stage] = (time.perf_counter() - ta) * 1e3
                break
            outputs = np.array(outputs)  # the worker's arrays are read-only: one copy per tier
            outputs[climb] = np.concatenate([r["outputs"] for r in got])
            for i in climb:
                stages[i] = tier.stage
            timings[tier.stage] = (time.perf_counter() - ta) * 1e3
            versions[tier.stage] = _model_version(got[0], tier.spec.cloud.model)
            rows = climb
        self.stats.record_cascade(len(inputs), reached_top)
        return outputs, versions

    def _log_rows(
        self,
        escalation_log: EscalationLog,
        inputs: np.ndarray,
        edge_logits: np.ndarray,
        cloud_out: np.ndarray | None,
        top1: list[int],
        results: list[Result],
        tags: Tags,
        error: TandemError | None,
    ) -> None:
        """Queue the rows for the log's writer thread (copies of the writeable arrays, no
        per-row objects): this is all an escalated request pays for the log. The final
        answer's output is the row's cloud output; rows that stopped at a tier say so in their
        reason; with a shadow gate, its verdict is ``model_versions["shadow"]`` (``escalate`` or
        ``accept``), so a batch whose rows differ is logged as two groups."""
        shadows = [r.shadow_escalate for r in results]
        groups = [None] if len(set(shadows)) <= 1 else [True, False]
        versions: dict[str, str] = {}
        for r in results:
            versions.update(r.model_versions)
        for g in groups:
            idx = slice(None) if g is None else [i for i, s in enumerate(shadows) if s is g]
            rs = results[idx] if g is None else [results[i] for i in idx]  # type: ignore[index]
            shadow = rs[0].shadow_escalate
            mv = dict(versions)
            if shadow is not None:
                mv["shadow"] = "escalate" if shadow else "accept"
            escalation_log.append_batch(
                ts_ms=time.time_ns() // 1_000_000,  # wall clock: a log timestamp, not a deadline
                task=self.name,
                tier=rs[0].tier.value,
                request_ids=[r.request_id or "" for r in rs],
                reasons=[
                    r.reason if r.stage in ("cloud", "edge") else f"{r.reason}; {r.stage}"
                    for r in rs
                ],
                tags=sorted(tags),
                inputs=inputs[idx],
                edge_outputs=edge_logits[idx],
                edge_labels=[
                    i if i >= 0 else None for i in (top1 if g is None else [top1[i] for i in idx])
                ],
                edge_confidences=[r.confidence for r in rs],
                cloud_outputs=None if cloud_out is None else cloud_out[idx],
                cloud_labels=None if cloud_out is None else [r.index for r in rs],
                error=f"{error.code}: {error.message}" if error else None,
                timings_ms=rs[0].timings,
                model_versions=mv,
            )


def _model_version(reply: dict[str, Any], model: str) -> str:
    return f"{reply.get('model', model)}@{reply.get('version', '?')}"


def _versions_upto(base: dict[str, str], tiers: dict[str, str], stage: str) -> dict[str, str]:
    """The versions of the models that answered a row which stopped at ``stage``."""
    if stage == "cloud":
        return base
    top = int(stage.split(":")[1])
    return {**base, **{k: v for k, v in tiers.items() if int(k.split(":")[1]) <= top}}


def open_classify_task(
    name: str,
    tp: TaskPolicy,
    client: CloudClient | None,
    *,
    tier_clients: Sequence[CloudClient] = (),
    stats: RoutingStats | None = None,
    on_drift: Callable[[DriftAlarm], None] | None = None,
    seed: int | None = None,
    serving: str | None = None,
) -> ClassifyTask:
    """Load a classification task's ONNX model, check its labels and gates against the
    model's class axis (run on a zero row if the axis is dynamic), and warm it up, so the
    task is ready to serve the moment it is returned (a hot swap builds one off the request
    path). ``tier_clients``: one per ``tp.tiers``; ``stats``: counters to keep (a swap passes
    the old task's)."""
    backend = OnnxBackend(tp.local.path, version=tp.local.version, threads=tp.local.threads)
    n_classes = class_count(backend)
    if tp.local.labels and len(tp.local.labels) != n_classes:
        raise TandemError(
            f"task {name!r}: {len(tp.local.labels)} labels for a model with "
            + (f"{n_classes} classes" if n_classes else "no class axis")
        )
    router = TaskRouter(tp, seed=seed)
    router.gate.check_classes(n_classes or 0, task=name)
    if router.shadow is not None:
        router.shadow.check_classes(n_classes or 0, task=name)
    tiers = [
        CascadeTier(f"tier:{j}", spec, ConfidenceGate(spec.gate), c)
        for j, (spec, c) in enumerate(zip(tp.tiers, tier_clients, strict=True), 1)
    ]
    versions = {"edge": backend.version}
    if router.gate.version is not None:
        versions["router"] = router.gate.version
    drift = None
    if tp.drift is not None:
        drift = DriftMonitor(tp.drift, tp.calibration, task=name, on_alarm=on_drift)
        warm_up_drift()
    task = ClassifyTask(
        name=name,
        policy=tp,
        router=router,
        backend=backend,
        client=client,
        labels=tp.local.labels,
        n_classes=n_classes or 0,
        versions=versions,
        row_ndim=len(backend.input_spec.shape) - 1,
        probabilities=tp.local.output == "probabilities",
        tiers=tiers,
        stats=stats if stats is not None else RoutingStats(len(tiers)),
        drift=drift,
        serving=serving,
    )
    warm_up(task)
    return task


def warm_up(t: ClassifyTask) -> None:
    """Load the kernels (JIT or on-disk cache) and run the model and the gates once, so the
    first request meets its deadline: a cold first call costs hundreds of ms."""
    t.backend.warm_up()
    row = np.zeros(max(t.n_classes, 1), np.float32)
    confidence_row(row)
    confidence(row[None])
    for gate in (t.router.gate, t.router.shadow, *(c.gate for c in t.tiers)):
        if gate is not None and t.n_classes:
            gate.evaluate_row(row, t.n_classes)
            gate.evaluate_batch(row[None])


def check_same_shape(old: ClassifyTask, new: ClassifyTask) -> None:
    """A swapped-in model must take the same inputs and give the same classes as the one it
    replaces: requests in flight were shaped for it, and labels come from the policy."""
    if new.n_classes != old.n_classes:
        raise ConfigError(
            f"task {old.name!r}: the new model {new.backend.path} has {new.n_classes} classes, "
            f"the serving one {old.n_classes}"
        )
    a, b = old.backend.input_spec, new.backend.input_spec
    if list(a.shape[1:]) != list(b.shape[1:]) or a.dtype != b.dtype:
        raise ConfigError(
            f"task {old.name!r}: the new model {new.backend.path} takes {b.dtype}{list(b.shape)}, "
            f"the serving one {a.dtype}{list(a.shape)}"
        )
