"""The worker's one-shot requests — ``infer``, ``experts``, ``verify`` — from admission to their
one answer. Everything here runs on the worker loop's thread (:mod:`tandem.cloud.worker`),
which owns the socket and the clock and hands each decoded request to :meth:`WorkerRequests.admit`
and each ready batch to :meth:`WorkerRequests.run_batch`.

**Admission.** A request is answered at once when it can be: a retry of an id already answered
(within ``idempotency.ttl_s``) gets the same reply again without running (``replayed``); a
retry of one still queued joins it (``joined``), up to :data:`MAX_JOINED_ROUTES` routes per
request (a retry past them is answered ``BadRequest`` at once: nothing a client resends grows
the worker without bound); a retry that asks for something else under a known id is refused.
New work is refused while draining (``ShuttingDown``) and when it arrives with no budget left
(``DeadlineExceeded``). ``experts`` and ``verify`` then run at once; ``infer`` is checked
(rows and bytes per request: ``limits``; the backend's ``check_batch``) and queued in the
:class:`~tandem.cloud.batching.MicroBatcher` (over its bounds: ``Overloaded``).

**Batches.** A ready batch is answered request by request, exactly once: a request whose
deadline passed while it was queued gets ``DeadlineExceeded`` and is not run; the others are
split by row shape (``shape[1:]``) and dtype, in order of arrival, and each group is one
backend call (``health`` counts ``mixed_batches``). A failing group of several is re-run one
request at a time, so only the request that fails gets the error. A queued request's routes are
forgotten as it is answered, so nothing can answer it twice. Backend code is only called
through :class:`~tandem.cloud.boundary.BackendBoundary`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from tandem.cloud.batching import MicroBatcher, Pending
from tandem.cloud.boundary import BackendBoundary, checked_rows, run_rows
from tandem.cloud.config import WorkerConfig
from tandem.cloud.engine import Mailbox, Offload
from tandem.cloud.idempotency import MAX_JOINED_ROUTES, ReplyCache
from tandem.cloud.metrics import WorkerMetrics
from tandem.cloud.streams import is_generation_backend
from tandem.cloud.verify import VerifyTable
from tandem.runtime import tracing
from tandem.runtime.backends import ExpertsBackend
from tandem.runtime.errors import (
    BadRequest,
    DeadlineExceeded,
    LimitExceeded,
    ShuttingDown,
    TandemError,
    UnknownModel,
)
from tandem.runtime.wire import Envelope, Frame, Kind, WireCodec, frames_nbytes

log = logging.getLogger("tandem.cloud.worker")

SendFn = Callable[[list[Any], list[Any]], None]  # (route, frames): without blocking


class WorkerRequests:
    """Admits, queues, runs and answers the worker's one-shot requests (see the module
    docstring). ``send(route, frames)`` sends a reply without blocking; ``stopping`` is set
    while the worker drains. ``metrics``: set by the worker when metrics are on."""

    metrics: WorkerMetrics | None = None

    def __init__(
        self,
        config: WorkerConfig,
        backends: dict[str, Any],
        codec: WireCodec,
        counters: Counter[str],
        boundary: BackendBoundary,
        verifier: VerifyTable,
        send: SendFn,
        stopping: threading.Event,
        mailbox: Mailbox,
    ) -> None:
        self.config = config
        self.backends = backends
        self.codec = codec
        self.counters = counters
        self.boundary = boundary
        self.verifier = verifier
        self._send = send
        self._stopping = stopping
        self.batcher = MicroBatcher(
            config.batching.max_batch, config.batching.max_wait_us / 1e6, config.queue
        )
        idem = config.idempotency
        self.answered = ReplyCache(idem.max_entries, idem.max_bytes, idem.ttl_s)
        self._queued: dict[bytes, Pending] = {}  # request id → its queued entry
        # known once: a runtime Protocol check costs microseconds per call
        self._generators = {n for n, b in backends.items() if is_generation_backend(b)}
        self._experts = {n for n, b in backends.items() if isinstance(b, ExpertsBackend)}
        self._post = mailbox.post
        self._mailbox = mailbox
        max_queued = config.queue.max_requests_per_model
        max_bytes = config.queue.max_bytes_per_model
        self._offloads = {n: Offload(n, mailbox, max_queued, max_bytes) for n in self._experts}
        self.inflight = 0  # requests running off this thread (experts, verify rounds)

    # ------------------------------------------------------------------ admission
    def admit(self, route: list[Any], env: Envelope, body: list[Frame]) -> None:
        """Answer ``env`` (an ``infer``, ``experts`` or ``verify``) now, or queue it. Raises a
        :class:`TandemError` for the worker to answer with."""
        # a retry of a request already answered, or still queued: never run twice
        cached = self.answered.get(env.id, time.monotonic())
        if cached is not None:
            self._check_retry(cached[1], env)
            self.counters["replayed"] += 1
            self._send(route, cached[0])
            return
        queued = self._queued.get(env.id)
        if queued is not None:
            self._check_retry(queued.env, env)
            if len(queued.routes) >= MAX_JOINED_ROUTES:
                self.counters["joins_refused"] += 1
                raise BadRequest(
                    f"this request id is queued here with {len(queued.routes)} tries waiting "
                    "for its answer; wait for it instead of sending it again"
                )
            self.counters["joined"] += 1
            queued.routes.append(route)
            return
        # every kind of work: refused while draining, and never run past its deadline
        if self._stopping.is_set():
            raise ShuttingDown("worker is draining; send new work elsewhere")
        if env.expired():
            raise DeadlineExceeded("no time budget left when the request reached the worker")
        if env.kind is Kind.EXPERTS:  # on the model's offload thread
            name, call, nbytes = self._experts_call(env)
            item = self._hold(route, env)
            try:
                done = partial(self._done, item, name)
                self._offloads[name].submit(call, done, nbytes)
            except BaseException:
                self._release(item)
                raise
            return
        if env.kind is Kind.VERIFY:  # a round on the model's engine
            p = env.payload
            model = str(p.get("model")) if isinstance(p, dict) else "?"
            item = self._hold(route, env)
            try:
                # route: the session's owner
                out = self.boundary.call(
                    model,
                    self.verifier.begin,
                    p,
                    route,
                    self._post,
                    partial(self._done, item, model),
                )
            except BaseException:
                self._release(item)
                raise
            if out is not None:  # answered at once (an end)
                self._done(item, model, out, None)
            return
        p = env.payload
        if not isinstance(p, dict) or not isinstance(p.get("model"), str):
            raise BadRequest("infer payload must be a map with a 'model' string")
        backend = self.backends.get(p["model"])
        if backend is None:
            raise UnknownModel(f"no model {p['model']!r} here; serving: {', '.join(self.backends)}")
        if p["model"] in self._generators:
            raise BadRequest(f"model {p['model']!r} is a language model: send it generate")
        inputs = p.get("inputs")
        if not isinstance(inputs, np.ndarray):
            raise BadRequest("infer payload needs an 'inputs' array shaped (N, ...)")
        self._check_size(inputs)
        inputs = self.boundary.call(backend.name, checked_rows, backend, inputs)
        item = Pending([route], env, inputs, sum(len(f) for f in body), time.monotonic())
        self.batcher.admit(backend.name, item)
        self._queued[env.id] = item

    def _check_retry(self, original: Envelope, retry: Envelope) -> None:
        """A retry must ask for exactly what its id first asked for: an id alone never fetches
        someone else's reply."""
        if not original.same_body(retry):
            self.counters["id_conflicts"] += 1
            raise BadRequest(
                "this request id was used for a different request in the last "
                f"{self.config.idempotency.ttl_s:g} s; use a fresh id for new work"
            )

    def _check_size(self, rows: np.ndarray) -> None:
        lim = self.config.limits
        if rows.ndim == 0 or len(rows) == 0:
            raise BadRequest(
                f"inputs must be shaped (N, ...) with at least one row, got {rows.shape}"
            )
        if len(rows) > lim.max_rows or rows.nbytes > lim.max_request_bytes:
            raise BadRequest(
                f"request of {len(rows)} rows, {rows.nbytes} bytes; this worker takes at most "
                f"{lim.max_rows} rows and {lim.max_request_bytes} bytes per request: split it"
            )

    def _experts_call(self, env: Envelope) -> tuple[str, Callable[[], dict[str, Any]], int]:
        """An expert-shard request, checked: its model, the call that runs it (its rows are
        already one batch per expert; not run once its deadline has passed) and its rows'
        bytes."""
        p = env.payload
        shape = "experts payload: {model, experts: [int], counts: [int], rows: array}"
        if not isinstance(p, dict):
            raise BadRequest(shape)
        name = p.get("model")
        if not isinstance(name, str) or name not in self._experts:
            raise UnknownModel(f"no MoE model {name!r} here")
        backend: ExpertsBackend = self.backends[name]
        n_experts = backend.n_experts
        experts, counts, rows = p.get("experts"), p.get("counts"), p.get("rows")
        if not (
            isinstance(experts, list)
            and isinstance(counts, list)
            and isinstance(rows, np.ndarray)
            and len(experts) == len(counts) <= n_experts  # bounded before any loop over them
            and all(type(v) is int for v in (*experts, *counts))
        ):
            raise BadRequest(f"{shape}, one count per expert, at most {n_experts}")
        self._check_size(rows)

        self.counters["expert_rows"] += len(rows)

        def call() -> dict[str, Any]:
            if env.expired():
                raise DeadlineExceeded("deadline passed while queued")
            return {"rows": backend.run_experts(experts, counts, rows), "version": backend.version}

        return name, call, rows.nbytes

    # ------------------------------------------------------------------ work off this thread
    def _hold(self, route: list[Any], env: Envelope) -> Pending:
        """Remember a request whose answer comes later (retries of its id join it)."""
        item = Pending([route], env, None, 0, time.monotonic())
        self._queued[env.id] = item
        self.inflight += 1
        return item

    def _release(self, item: Pending) -> None:
        if self._queued.get(item.env.id) is item:
            del self._queued[item.env.id]
            self.inflight -= 1

    def _done(self, item: Pending, model: str, out: Any, error: BaseException | None) -> None:
        """The answer of a request that ran elsewhere (on this thread, posted back)."""
        self._release(item)
        if error is not None:
            self._reply_error(item, self.boundary.as_error(model, error))
            return
        try:
            frames = self.result_frames(item.env, out)
        except TandemError as e:
            self._reply_error(item, e)
            return
        self._reply_all(item, frames)
        if self.metrics is not None:
            self.metrics.request(model, item.env.kind.value, "ok")
        if tracing.TRACER is not None:
            tracing.record_worker_span(item.env, item.arrived, None, {"tandem.model": model})

    # ------------------------------------------------------------------ batches
    def run_batch(self, model: str, batch: list[Pending]) -> None:
        """Answer every request of a ready batch exactly once. Expired ones get
        ``DeadlineExceeded``; the others run in groups of one row shape and dtype (in order of
        arrival), one backend call per group. Whatever still escapes (a bug of ours) is
        answered as an internal error to the requests not yet answered, and the loop keeps
        serving."""
        for item in batch:
            self._queued.pop(item.env.id, None)
        try:
            now = time.monotonic()
            groups: dict[tuple[tuple[int, ...], np.dtype], list[Pending]] = {}
            for item in batch:
                if item.env.expired(now):
                    self.counters["expired"] += 1
                    self._reply_error(item, DeadlineExceeded("deadline passed while queued"))
                else:  # an array of >= 1 row: checked on admission (checked_rows)
                    key = (item.inputs.shape[1:], item.inputs.dtype)
                    groups.setdefault(key, []).append(item)
            if len(groups) > 1:
                self.counters["mixed_batches"] += 1
            for group in groups.values():
                self._predict(model, group)
        except Exception as e:
            self.counters["internal_errors"] += 1
            log.exception("internal error running a batch of model %r", model)
            err = TandemError(f"internal error: {type(e).__name__}: {e}")
            for item in batch:
                if item.routes:  # not answered yet
                    self._reply_error(item, err)

    def _predict(self, model: str, live: list[Pending]) -> None:
        """Run requests of one row shape and dtype as one backend call and answer each with
        its rows. Joining, running and cutting happen inside the boundary; if that fails, a
        batch of several is re-run one request at a time, so only a failing request gets the
        error."""
        backend = self.backends[model]
        inputs, limit = [i.inputs for i in live], self.codec.limits.max_message_bytes
        started = time.monotonic()
        try:
            outs = self.boundary.call(model, run_rows, backend, inputs, limit)
        except TandemError as e:
            if len(live) > 1:
                for item in live:
                    self._predict(model, [item])
            else:
                self._reply_error(live[0], e)
            return
        run_s = time.monotonic() - started
        n_rows = sum(len(i.inputs) for i in live)
        self.batcher.record_run(model, n_rows, run_s)
        self.counters["batches"] += 1
        self.counters["rows"] += n_rows
        too_big = 0
        for item, out in zip(live, outs, strict=True):
            payload = {
                "outputs": out,
                "model": model,
                "version": backend.version,
                "queue_ms": (started - item.arrived) * 1e3,
                "run_ms": run_s * 1e3,
                "batch_rows": n_rows,
            }
            try:
                frames = self.result_frames(item.env, payload)
            except TandemError as e:  # its rows are too big for a reply: this request alone
                self._reply_error(item, e)
                too_big += 1
                continue
            self._reply_all(item, frames)
            if tracing.TRACER is not None:
                attrs = {"tandem.model": model, "tandem.batch_rows": n_rows}
                attrs["tandem.queue_ms"] = payload["queue_ms"]
                run = (started, started + run_s)
                tracing.record_worker_span(item.env, item.arrived, None, attrs, backend=run)
        if self.metrics is not None:
            arrivals = [i.arrived for i in live]
            self.metrics.infer_batch(model, arrivals, started, run_s, n_rows, len(live) - too_big)

    # ------------------------------------------------------------------ replies
    def result_frames(self, env: Envelope, payload: Any) -> list[Any]:
        """A result reply, encoded once and remembered for retries of the same request id.
        :class:`LimitExceeded` if it is over the wire's message limit (a client's socket
        would drop the connection instead of reading it)."""
        frames = self.codec.encode(env.reply(Kind.RESULT, payload))
        size, limit = frames_nbytes(frames), self.codec.limits.max_message_bytes
        if size > limit:
            raise LimitExceeded(
                f"the reply would be {size} bytes, over the {limit}-byte message limit; "
                "send fewer rows per request"
            )
        self.answered.put(env, frames, time.monotonic())
        return frames

    def _reply_all(self, item: Pending, frames: list[Any]) -> None:
        """Answer a queued request on every route it came on (retries of its id join it) and
        forget the routes, so nothing can answer it a second time."""
        routes, item.routes = item.routes, []
        for route in routes:
            self._send(route, frames)

    def _reply_error(self, item: Pending, err: TandemError) -> None:
        self._reply_all(item, self.codec.encode(item.env.error_reply(err)))
        if self.metrics is not None:
            p = item.env.payload
            model = p.get("model") if isinstance(p, dict) else None
            self.metrics.request(model, item.env.kind.value, err.code)
        if tracing.TRACER is not None:
            tracing.record_worker_span(item.env, item.arrived, error=err)

    def close(self) -> None:
        """Stop the offload threads (what they hold queued runs first)."""
        for offload in self._offloads.values():
            offload.close()

    # ------------------------------------------------------------------ model admin
    def run_queued(self, model: str) -> None:
        """Run every queued ``infer`` request of ``model`` now, on the backend it was admitted
        for: the model admin calls this just before it replaces or unloads ``model``."""
        for batch in self.batcher.take_all(model):
            self.run_batch(model, batch)

    def model_changed(self, model: str) -> Offload | None:
        """``self.backends[model]`` was set, replaced or removed (by the model admin, on this
        thread): learn its kind again. Returns the model's :class:`Offload` if it no longer
        needs one (unloaded, or no longer an MoE): its caller closes it off this thread (what
        it holds still runs, on the backend each call took)."""
        backend = self.backends.get(model)
        self._generators.discard(model)
        self._experts.discard(model)
        if backend is not None and is_generation_backend(backend):
            self._generators.add(model)
        if backend is not None and isinstance(backend, ExpertsBackend):
            self._experts.add(model)
            if model not in self._offloads:
                queue = self.config.queue
                self._offloads[model] = Offload(
                    model, self._mailbox, queue.max_requests_per_model, queue.max_bytes_per_model
                )
            return None
        return self._offloads.pop(model, None)

    def expire(self, now: float) -> None:
        """Forget replies and verify sessions past their time (the loop's housekeeping)."""
        if len(self.answered):
            self.answered.expire(now)
        if len(self.verifier):
            self.verifier.expire(now)
