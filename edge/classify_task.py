"""A classification task on the edge: its policy compiled into an ONNX model, a router and a
cloud client (:class:`ClassifyTask`), and how its rows escalate: to the cloud in one request
within the deadline, degraded to the edge's answer on any failure, logged."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from tandem.edge.escalation_log import EscalationLog
from tandem.router.policy import TaskPolicy
from tandem.router.routing import Decision, TaskRouter
from tandem.runtime.backends.onnx import OnnxBackend
from tandem.runtime.client import CloudClient
from tandem.runtime.errors import BadRequest, DeadlineExceeded, TandemError
from tandem.runtime.registry import class_count
from tandem.runtime.types import Result, Tier
from tandem.runtime.wire import new_request_id

log = logging.getLogger(__name__)
Tags = Collection[str]


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

    def label(self, index: int) -> Any:
        if index < 0:
            return None
        return self.labels[index] if self.labels else index

    def edge_result(
        self, logits: np.ndarray, top1: int, score: float, reason: str, timings: dict[str, float]
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
        )

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
    ) -> list[Result]:
        """Send ``inputs`` to the cloud within what is left of ``budget_ms``; fall back to the
        edge answers (degraded) on any failure; log every row."""
        n = len(inputs)
        assert self.client is not None and self.policy.cloud is not None
        wire_id = new_request_id()  # the request's id on the wire too: one id end to end
        request_id = wire_id.hex()
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
            versions["cloud"] = (
                f"{reply.get('model', self.policy.cloud.model)}@{reply.get('version', '?')}"
            )
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
        results = []
        for i in range(n):
            if cloud_out is not None:
                out, tier, reason = cloud_out[i], Tier.CLOUD, decisions[i].reason
                index = int(np.argmax(out))
            else:
                out, tier, index = edge_logits[i], Tier.EDGE_DEGRADED, top1[i]
                reason = f"{decisions[i].reason}; cloud-{error.code if error else 'error'}"
            results.append(
                Result(
                    output=out,
                    index=index,
                    label=self.label(index),
                    tier=tier,
                    confidence=scores[i],
                    reason=reason,
                    timings=dict(timings),
                    model_versions=dict(versions),
                    request_id=f"{request_id}:{i}" if n > 1 else request_id,
                )
            )
        if escalation_log is not None:
            try:  # only queues the rows; storage failures are counted in stats(), never raised
                self._log(
                    escalation_log,
                    inputs,
                    edge_logits,
                    cloud_out,
                    top1,
                    scores,
                    results,
                    tags,
                    error,
                )
            except Exception:  # the answer still goes back: a robot must not stall on a log
                log.exception("task %s: escalation log append failed", self.name)
            t4 = time.perf_counter()
            for r in results:
                r.timings["log"] = (t4 - t3) * 1e3
                r.timings["total"] = (t4 - t0) * 1e3
        return results

    def _log(
        self,
        escalation_log: EscalationLog,
        inputs: np.ndarray,
        edge_logits: np.ndarray,
        cloud_out: np.ndarray | None,
        top1: list[int],
        scores: list[float],
        results: list[Result],
        tags: Tags,
        error: TandemError | None,
    ) -> None:
        """Queue the rows for the log's writer thread (copies of the writeable arrays, no
        per-row objects): this is all an escalated request pays for the log."""
        escalation_log.append_batch(
            ts_ms=time.time_ns() // 1_000_000,  # wall clock: a log timestamp, not a deadline
            task=self.name,
            tier=results[0].tier.value,
            request_ids=[r.request_id or "" for r in results],
            reasons=[r.reason for r in results],
            tags=sorted(tags),
            inputs=inputs,
            edge_outputs=edge_logits,
            edge_labels=[i if i >= 0 else None for i in top1],
            edge_confidences=scores,
            cloud_outputs=cloud_out,  # None unless the cloud answered
            cloud_labels=None if cloud_out is None else [r.index for r in results],
            error=f"{error.code}: {error.message}" if error else None,
            timings_ms=results[0].timings,
            model_versions=results[0].model_versions,
        )


def open_classify_task(name: str, tp: TaskPolicy, client: CloudClient | None) -> ClassifyTask:
    """Load a classification task's ONNX model and check its labels and gate against the
    model's class axis (run on a zero row if the axis is dynamic)."""
    backend = OnnxBackend(tp.local.path, version=tp.local.version, threads=tp.local.threads)
    n_classes = class_count(backend)
    if tp.local.labels and len(tp.local.labels) != n_classes:
        raise TandemError(
            f"task {name!r}: {len(tp.local.labels)} labels for a model with "
            + (f"{n_classes} classes" if n_classes else "no class axis")
        )
    router = TaskRouter(tp)
    router.gate.check_classes(n_classes or 0, task=name)
    return ClassifyTask(
        name=name,
        policy=tp,
        router=router,
        backend=backend,
        client=client,
        labels=tp.local.labels,
        n_classes=n_classes or 0,
        versions={"edge": backend.version},
        row_ndim=len(backend.input_spec.shape) - 1,
        probabilities=tp.local.output == "probabilities",
    )
