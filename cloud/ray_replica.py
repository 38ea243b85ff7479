"""One replica of a Ray Serve deployment of Tandem: one model, or one expert shard of an MoE
model, loaded the way a worker loads it (:func:`~tandem.cloud.loading.load_backends`: the
manifest, digests checked, warmed up) and answering the ingress's calls
(:mod:`tandem.cloud.ray_ingress`).

``infer`` calls that arrive while the replica is busy are joined into one backend call by Ray
Serve's ``@serve.batch``, counted in rows (at most ``max_batch_rows``; a request with more rows
runs alone); requests of different row shapes in one batch run as one call per shape, and a
failing call of several requests is re-run one request at a time, so only the request that
fails gets the error — the worker's batch rules (:mod:`tandem.cloud.requests`). Backend code
runs on a thread, through :class:`~tandem.cloud.boundary.BackendBoundary`, so the replica's
event loop keeps taking requests (they form the next batch).

Every call returns ``(RESULT, payload)`` or ``(ERROR, {code, message, ...})``, a typed error
as it travels on the wire, never an exception: what a replica answers reaches the client as the
same error class a worker would send. A budget (seconds left, or None) comes with each call and
is counted on this process's own clock from arrival; a request whose budget ran out while it
waited for its batch is answered ``DeadlineExceeded`` and not run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from tandem.cloud.boundary import BackendBoundary, checked_rows, run_rows
from tandem.cloud.config import WorkerConfig
from tandem.cloud.loading import load_backends
from tandem.cloud.streams import is_generation_backend
from tandem.runtime.backends import ExpertsBackend
from tandem.runtime.errors import BadRequest, ConfigError, DeadlineExceeded, TandemError

log = logging.getLogger(__name__)

RESULT, ERROR = "result", "error"
Reply = tuple[str, Any]  # (RESULT, payload) or (ERROR, the error's wire map)


@dataclass(slots=True)
class _Rows:
    """One ``infer`` request in a replica: its checked rows and its deadline (monotonic)."""

    rows: np.ndarray
    deadline: float | None
    arrived: float


def _rows_in(items: list[_Rows]) -> int:
    return sum(len(i.rows) for i in items)


def _error(err: TandemError) -> Reply:
    return ERROR, err.to_wire()


class ModelReplica:
    """The class each replica of a Tandem deployment instantiates (see the module docstring).
    ``config``: what to load (one model, its experts for a shard); ``max_reply_bytes``: the
    wire's message limit (an answer over it is refused here, as a worker would)."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        max_batch_rows: int = 64,
        batch_wait_timeout_s: float = 0.0,
        max_reply_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        backends = load_backends(config)
        if len(backends) != 1:
            raise ConfigError(f"a replica serves one model, config names {list(backends)}")
        ((self.name, self.backend),) = backends.items()
        if is_generation_backend(self.backend):
            raise ConfigError(
                f"model {self.name!r} is a language model: on Ray, serve it with Ray Serve LLM "
                "or vLLM behind the openai backend (docs/ray.md), not as a Tandem deployment"
            )
        self.max_batch_rows = max_batch_rows
        self.max_reply_bytes = max_reply_bytes
        self.counters: Counter[str] = Counter()
        self.boundary = BackendBoundary(self.counters)
        self._batch.set_max_batch_size(max_batch_rows)
        self._batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Serve (a test, a script)
            self.replica_id = "local"
        log.info("replica %s serving %s (%s)", self.replica_id, self.name, self.backend.version)

    def describe(self) -> dict[str, Any]:
        """What the ingress reports in ``health`` for this model (as a worker does)."""
        b = self.backend
        info: dict[str, Any] = {
            "version": b.version,
            "kind": "array",
            "input": b.input_spec.model_dump(),
            "output": b.output_spec.model_dump(),
        }
        if isinstance(b, ExpertsBackend):
            info["n_experts"] = b.n_experts
            info["experts"] = list(b.hosted)
            info["hidden"] = b.hidden
        return info

    def stats(self) -> dict[str, Any]:
        return {"replica": self.replica_id, "counters": dict(self.counters)}

    # ------------------------------------------------------------------ infer
    async def infer(self, rows: np.ndarray, budget_s: float | None) -> Reply:
        """The model's output rows for ``rows`` (N, ...), batched with other requests."""
        now = time.monotonic()
        item = None
        try:
            checked = self.boundary.call(self.name, checked_rows, self.backend, rows)
            item = _Rows(checked, None if budget_s is None else now + budget_s, now)
        except TandemError as e:
            return _error(e)
        if len(item.rows) > self.max_batch_rows:  # over a batch alone: run it alone
            return (await self._run([item]))[0]
        return await self._batch(item)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0, batch_size_fn=_rows_in)
    async def _batch(self, items: list[_Rows]) -> list[Reply]:
        return await self._run(items)

    async def _run(self, items: list[_Rows]) -> list[Reply]:
        """Answer each request of a batch: expired ones ``DeadlineExceeded``; the others in
        groups of one row shape and dtype, one backend call per group."""
        out: list[Reply | None] = [None] * len(items)
        now = time.monotonic()
        groups: dict[tuple[tuple[int, ...], np.dtype], list[int]] = {}
        for i, item in enumerate(items):
            if item.deadline is not None and now >= item.deadline:
                self.counters["expired"] += 1
                out[i] = _error(DeadlineExceeded("deadline passed while queued in a replica"))
            else:
                groups.setdefault((item.rows.shape[1:], item.rows.dtype), []).append(i)
        for group in groups.values():
            replies = await asyncio.to_thread(self._predict, [items[i] for i in group])
            for i, reply in zip(group, replies, strict=True):
                out[i] = reply
        return [r if r is not None else _error(TandemError("internal error")) for r in out]

    def _predict(self, live: list[_Rows]) -> list[Reply]:
        """One backend call for requests of one row shape (on a thread). If it fails, a group
        of several runs again one request at a time."""
        started = time.monotonic()
        try:
            outs = self.boundary.call(
                self.name, run_rows, self.backend, [i.rows for i in live], self.max_reply_bytes
            )
        except TandemError as e:
            if len(live) > 1:
                return [r for item in live for r in self._predict([item])]
            return [_error(e)]
        run_s = time.monotonic() - started
        n_rows = sum(len(i.rows) for i in live)
        self.counters["batches"] += 1
        self.counters["rows"] += n_rows
        return [
            (
                RESULT,
                {
                    "outputs": out,
                    "model": self.name,
                    "version": self.backend.version,
                    "queue_ms": (started - item.arrived) * 1e3,
                    "run_ms": run_s * 1e3,
                    "batch_rows": n_rows,
                    "replica": self.replica_id,
                },
            )
            for item, out in zip(live, outs, strict=True)
        ]

    # ------------------------------------------------------------------ experts
    async def experts(
        self, experts: list[int], counts: list[int], rows: np.ndarray, budget_s: float | None
    ) -> Reply:
        """An expert shard's rows (already one group per expert, in order): not batched, as on
        a worker. The ingress has checked the payload's shape and size."""
        deadline = None if budget_s is None else time.monotonic() + budget_s
        backend = self.backend
        if not isinstance(backend, ExpertsBackend):
            return _error(BadRequest(f"model {self.name!r} has no experts"))

        def call() -> Reply:
            if deadline is not None and time.monotonic() >= deadline:
                return _error(DeadlineExceeded("deadline passed while queued in a replica"))
            try:
                out = self.boundary.call(self.name, backend.run_experts, experts, counts, rows)
            except TandemError as e:
                return _error(e)
            self.counters["expert_rows"] += len(rows)
            return RESULT, {"rows": out, "version": backend.version}

        return await asyncio.to_thread(call)
