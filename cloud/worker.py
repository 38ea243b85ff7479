"""The cloud worker: a ZeroMQ ROUTER socket in front of model backends.

One thread owns the socket and the clock. Its loop: poll; read every waiting message, validate
it and admit it to the :class:`MicroBatcher` (or answer at once: a typed error, ``Overloaded``,
a cached reply); run one batch per model that is ready; answer every request individually.
An idle model runs a request the moment it arrives; requests that arrive while it is busy wait
in the queue and form the next batch.

**Nothing a client sends ends or stalls the loop.** Backend code (``check_batch``,
``run``, ``run_experts``), and everything that touches a request's rows on the way to and from
it (joining requests into one batch, checking what ``run`` returned, cutting it into each
request's rows), is only ever called through :meth:`CloudWorker._backend`, the one place that
turns any exception it raises into a typed :class:`BackendFailure` reply (``backend.error``,
with the exception's class and message) and counts it in ``health``. What ``run`` returns must
be one array of as many rows as it was given, of a wire dtype, without NaN or inf; anything
else is :class:`BadOutput`. A failing batch of several requests is re-run one request at a time
so only the request that fails gets the error. Everything else that can go wrong on a message
is caught once in :meth:`CloudWorker._on_message`, and on a batch once in
:meth:`CloudWorker._run_batch`, and answered as a typed error. What a request can cost is
bounded before it runs: rows and bytes per request (``limits``), queued requests and bytes per
model and in total (``queue``; over them: ``Overloaded`` with a retry-after hint), ZeroMQ's
high-water marks, and the reply cache (``idempotency``). Replies are sent without blocking:
a peer that does not read them cannot stall the worker.

Every message is answered exactly once, with a result or a typed error. A retry of a request
id already answered (within ``idempotency.ttl_s``) gets the same reply again without running;
a retry of one still queued is answered together with it. A queued request's routes are
forgotten as it is answered, so nothing can answer it twice.

**Only like rows are joined.** A ready batch is split by row shape (``shape[1:]``) and dtype,
in order of arrival, and each group is one backend call: a sequence model with a dynamic
length axis gets requests of several lengths, and rows of different shapes cannot be
concatenated (nor different dtypes without changing them). The batcher's bounds hold for the
whole batch; ``health`` counts ``mixed_batches``.

**Generation streams** (``generate`` → ``chunk``... → ``end`` or ``error``; ``cancel``) live in
:class:`~tandem.cloud.streams.StreamTable`: each runs its backend on a thread of its own and
wakes this loop through a pipe, so while any stream is active the loop polls the socket and
that pipe together (with none, the idle path stays one blocking receive), and each turn sends
every stream's ready tokens as one chunk, without blocking. A backend's exception becomes a
typed reply in :meth:`CloudWorker._backend_failure`, the same place as for ``infer``. Bounds:
``generation`` in the config; ``health`` reports ``streams``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import zmq

from tandem.cloud.batching import MicroBatcher, Pending
from tandem.cloud.config import WorkerConfig
from tandem.cloud.idempotency import ReplyCache
from tandem.cloud.loading import check_security, load_backends
from tandem.cloud.speculation import VerifyTable
from tandem.cloud.streams import BLOCKED, GONE, SENT, StreamTable, is_generation_backend
from tandem.kernels.confidence import all_finite
from tandem.runtime.backends import ModelBackend
from tandem.runtime.curve import (
    configure_server,
    is_loopback,
    start_authenticator,
)
from tandem.runtime.errors import (
    BackendError,
    BackendFailure,
    BadRequest,
    DeadlineExceeded,
    LimitExceeded,
    OverloadedError,
    ShuttingDown,
    TandemError,
    UnknownModel,
    WireError,
)
from tandem.runtime.wire import (
    MAX_NDIM,
    PROTOCOL_VERSION,
    WIRE_DTYPES,
    Envelope,
    Frame,
    Kind,
    WireCodec,
    frames_nbytes,
    recv_frames,
    send_frames,
)

log = logging.getLogger(__name__)

_NO_ID = bytes(16)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_EAGAIN = int(zmq.EAGAIN)
_DONTWAIT = int(zmq.DONTWAIT)
_IDLE_POLL_MS = 50  # the longest the loop waits before it looks at the stop flag again
_MAX_READS_PER_TURN = 256  # messages read before ready batches get a chance to run
_WORK = (Kind.INFER, Kind.EXPERTS, Kind.VERIFY)
_MAX_ERROR_CHARS = 2000  # of a backend exception's message in a reply (some print arrays)


class BadOutput(Exception):
    """Backend code returned something the worker cannot answer with (not an array, the
    wrong number of rows, a dtype the wire does not carry, NaN or inf). Raised inside
    :meth:`CloudWorker._backend`, so it reaches the client as ``backend.error`` with
    ``exception='BadOutput'``."""


class CloudWorker:
    def __init__(
        self,
        config: WorkerConfig,
        backends: dict[str, ModelBackend] | None = None,
        *,
        context: zmq.Context | None = None,
    ) -> None:
        check_security(config)  # before loading any model: fail fast
        self.config = config
        self.backends = backends if backends is not None else load_backends(config)
        # language models take generate, not infer (known once: a Protocol check is slow)
        self._generators = {n for n, b in self.backends.items() if is_generation_backend(b)}
        self.codec = WireCodec(config.limits.wire_limits())
        self._max_frames = self.codec.limits.max_frames + 2  # and the routing frames
        self.batcher = MicroBatcher(
            config.batching.max_batch, config.batching.max_wait_us / 1e6, config.queue
        )
        idem = config.idempotency
        self.answered = ReplyCache(idem.max_entries, idem.max_bytes, idem.ttl_s)
        self._queued: dict[bytes, Pending] = {}  # request id → its queued entry
        self.streams: StreamTable | None = None  # made by serve(): it holds a pipe
        self.verifier = VerifyTable(config.speculative, self.backends)
        self.counters: Counter[str] = Counter()
        self.endpoint: str | None = None
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._stop = threading.Event()
        self._started = time.monotonic()

    def stop(self) -> None:
        """Start draining. Safe from any thread and from a signal handler."""
        self._stop.set()

    @property
    def draining(self) -> bool:
        return self._stop.is_set()

    def serve(self, ready: Callable[[str], None] | None = None) -> int:
        """Bind, call ``ready(endpoint)``, serve until :meth:`stop` (or SIGTERM/SIGINT when
        run in the main thread), drain, return the exit code (0)."""
        sock = self._ctx.socket(zmq.ROUTER)
        so = self.config.socket
        sock.setsockopt(zmq.LINGER, 2000)
        # ZeroMQ drops a connection that sends a frame over this size; the codec answers
        # messages whose frames are each under it but together over the limit.
        sock.setsockopt(zmq.MAXMSGSIZE, self.codec.limits.max_message_bytes)
        sock.setsockopt(zmq.SNDHWM, so.sndhwm)
        sock.setsockopt(zmq.RCVHWM, so.rcvhwm)
        # A reply that cannot be routed (peer gone, its queue full) raises instead of vanishing,
        # so it is counted; with DONTWAIT it never blocks the loop.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.RCVTIMEO, _IDLE_POLL_MS)  # the idle wait in _loop
        if so.heartbeat_ivl_ms:
            sock.setsockopt(zmq.HEARTBEAT_IVL, so.heartbeat_ivl_ms)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, so.heartbeat_timeout_ms)
            sock.setsockopt(zmq.HEARTBEAT_TTL, so.heartbeat_timeout_ms)
        auth = None
        try:
            curve = self.config.curve
            if curve is not None:
                # the ZAP handler runs before the socket binds: without one, Curve admits anyone
                auth, allow = start_authenticator(self._ctx, curve.allowed_clients, log)
                configure_server(sock, curve.secret_key)
                security = f"curve on ({len(allow.keys)} allowed client keys in {allow.directory})"
            else:
                security = "curve OFF (plain text, any client)"
                if not is_loopback(self.config.bind):
                    log.warning(
                        "bind %s is not loopback and curve is off (insecure)", self.config.bind
                    )
            sock.bind(self.config.bind)
        except BaseException:
            sock.close(linger=0)
            if auth is not None:
                auth.stop()
            raise
        self._sock = sock
        self.streams = StreamTable(
            self.config.generation,
            self.backends,
            self.codec,
            self._try_send,
            self._backend_failure,
        )
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        restore = self._install_signal_handlers()
        log.info(
            "worker listening on %s, %s, models: %s",
            self.endpoint,
            security,
            ", ".join(self.backends),
            extra={"curve": curve is not None},
        )
        if ready:
            ready(self.endpoint)
        try:
            self._loop(sock)
        finally:
            for sig, handler in restore.items():
                signal.signal(sig, handler)
            self.streams.close()
            self.verifier.close()
            sock.close()
            if auth is not None:
                auth.stop()  # after the socket: it must never be open without its handler
        log.info("worker stopped: %s", dict(self.counters))
        return 0

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: self.stop())
        return previous

    def _loop(self, sock: zmq.Socket) -> None:
        streams = self.streams
        assert streams is not None
        wake_fd = streams.wake_fd
        grace_until: float | None = None
        while True:
            now = time.monotonic()
            # Draining: every queued request still runs and every stream ends (ShuttingDown);
            # once no request is left, new ones are answered ShuttingDown for grace_ms, then
            # the loop ends.
            if self.draining and grace_until is None and streams.active:
                streams.shutdown()
            if self.draining and grace_until is None and self.batcher.depth == 0:
                log.info("drained; refusing new work for %d ms", self.config.drain.grace_ms)
                grace_until = now + self.config.drain.grace_ms / 1e3
            if grace_until is not None and now >= grace_until:
                return
            due = self.batcher.next_due(now)
            timeout = _IDLE_POLL_MS
            if due is not None:
                timeout = max(0, min(timeout, int((due - now) * 1e3 + 0.999)))
            if grace_until is not None:
                timeout = min(timeout, max(0, int((grace_until - now) * 1e3)))
            streaming = streams.active > 0
            if streaming:
                sdue = streams.next_due(now)
                if sdue is not None:
                    timeout = max(0, min(timeout, int((sdue - now) * 1e3 + 0.999)))
            # Idle: one blocking receive (RCVTIMEO = _IDLE_POLL_MS) instead of a poll and a
            # receive, a syscall less on the idle round trip. Otherwise poll up to when due;
            # with streams active, their wake pipe too.
            try:
                if streaming:
                    ready = zmq.zmq_poll([(sock, _POLLIN), (wake_fd, _POLLIN)], timeout)
                    readable = any(s is sock for s, _ in ready)
                else:
                    readable = timeout == _IDLE_POLL_MS or zmq.zmq_poll([(sock, _POLLIN)], timeout)
                if readable:
                    for _ in range(_MAX_READS_PER_TURN):
                        # peer identity and envelope are copied; array frames arrive zero-copy
                        self._on_message(recv_frames(sock, 2, self._max_frames))
                        if not cast(int, sock.getsockopt(_EVENTS)) & _POLLIN:
                            break
            except zmq.Again:  # the idle receive timed out: look at the clock and the flags
                pass
            now = time.monotonic()
            for model, batch in self.batcher.take_ready(now, flush=self.draining):
                self._run_batch(model, batch)
            if streams.active:
                streams.clear_wake()  # before pump: a producer appending after it wakes again
                streams.pump(time.monotonic())
            if len(self.answered):
                self.answered.expire(now)
            if len(self.verifier):
                self.verifier.expire(now)

    # ------------------------------------------------------------------ messages
    def _on_message(self, frames: list[Frame]) -> None:
        # ROUTER prepends the peer identity; a REQ peer adds an empty delimiter after it.
        n_route = 2 if len(frames) > 1 and len(frames[1]) == 0 else 1
        route, body = frames[:n_route], frames[n_route:]
        try:
            env = self.codec.decode(body)
        except WireError as e:
            self.counters["wire_errors"] += 1
            log.debug("bad message: %s", e)
            rid = e.request_id or _NO_ID
            self._reply(route, Envelope(kind=Kind.ERROR, id=rid, payload=e.to_wire()))
            return
        self.counters[env.kind.value] += 1
        try:
            reply = self._handle(route, env, body)
        except TandemError as e:
            if isinstance(e, OverloadedError):
                self.counters["overloaded"] += 1
            reply = env.error_reply(e)
        except Exception as e:  # a bug of ours: answer it, log it, keep serving
            self.counters["internal_errors"] += 1
            log.exception("internal error on %s request", env.kind.value)
            reply = env.error_reply(TandemError(f"internal error: {type(e).__name__}: {e}"))
        if reply is not None:
            self._reply(route, reply)

    def _handle(self, route: list[Any], env: Envelope, body: list[Frame]) -> Envelope | None:
        """The reply to send now, or None when the request was queued (or answered)."""
        if env.kind is Kind.HEALTH:
            return env.reply(Kind.RESULT, self.health())
        if env.kind is Kind.ECHO:
            size = frames_nbytes(env.body)
            if size > self.config.limits.max_echo_bytes:
                raise BadRequest(
                    f"echo of {size} bytes; at most {self.config.limits.max_echo_bytes}"
                )
            return env.reply(Kind.RESULT, env.payload)
        if env.kind is Kind.CANCEL:  # answered by the stream's end, if it is still running
            assert self.streams is not None
            self.streams.cancel(route, env.id)
            return None
        if env.kind is Kind.GENERATE:
            assert self.streams is not None
            if self.draining:
                raise ShuttingDown("worker is draining; send new work elsewhere")
            if env.expired():
                raise DeadlineExceeded("no time budget left when the request reached the worker")
            p = env.payload
            model = p.get("model") if isinstance(p, dict) else None
            if isinstance(model, str) and model in self._generators:
                self.verifier.make_room(model, self.backends[model])
            self.streams.start(route, env)
            return None
        if env.kind not in _WORK:
            raise BadRequest(f"a worker does not accept {env.kind.value!r} messages")
        # a retry of a request already answered, or still queued: never run twice
        cached = self.answered.get(env.id, time.monotonic())
        if cached is not None:
            self._check_retry(cached[1], env)
            self.counters["replayed"] += 1
            self._send(route, cached[0])
            return None
        queued = self._queued.get(env.id)
        if queued is not None:
            self._check_retry(queued.env, env)
            self.counters["joined"] += 1
            queued.routes.append(route)
            return None
        # both kinds of work: refused while draining, and never run past their deadline
        if self.draining:
            raise ShuttingDown("worker is draining; send new work elsewhere")
        if env.expired():
            raise DeadlineExceeded("no time budget left when the request reached the worker")
        if env.kind is Kind.EXPERTS:
            self._send(route, self._result_frames(env, self._run_experts(env)))
            return None
        if env.kind is Kind.VERIFY:  # at once, on this thread: one forward over the draft
            p = env.payload
            model = str(p.get("model")) if isinstance(p, dict) else "?"
            self._send(route, self._result_frames(env, self._backend(model, self.verifier.run, p)))
            return None
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
        inputs = self._backend(backend.name, _checked_rows, backend, inputs)
        item = Pending([route], env, inputs, sum(len(f) for f in body), time.monotonic())
        self.batcher.admit(backend.name, item)
        self._queued[env.id] = item
        return None

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

    def _backend(self, model: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call backend code. The one place where a backend's exception becomes a typed
        reply: TandemErrors pass through (a :class:`BackendError`, the backend's own word
        that it failed, counted in ``backend_errors``); anything else becomes
        ``backend.error``."""
        try:
            return fn(*args)
        except BackendError:
            self.counters["backend_errors"] += 1
            raise
        except TandemError:
            raise
        except Exception as e:
            raise self._backend_failure(model, e) from None

    def _backend_failure(self, model: str, e: Exception) -> BackendFailure:
        """The typed error for an exception that backend code raised (a batch's ``run``, or a
        stream's producer thread, reported on the loop's thread); counted and logged. The
        message is cut to ``_MAX_ERROR_CHARS``: a reply must stay small whatever was raised."""
        self.counters["backend_errors"] += 1
        text = str(e)
        if len(text) > _MAX_ERROR_CHARS:
            text = text[:_MAX_ERROR_CHARS] + "..."
        log.warning("model %r raised %s: %s", model, type(e).__name__, text)
        return BackendFailure(
            f"model {model!r} failed: {type(e).__name__}: {text}", exception=type(e).__name__
        )

    def _run_experts(self, env: Envelope) -> dict[str, Any]:
        """An expert-shard request: run at once (its rows are already one batch per expert)."""
        p = env.payload
        shape = "experts payload: {model, experts: [int], counts: [int], rows: array}"
        if not isinstance(p, dict):
            raise BadRequest(shape)
        backend = self.backends.get(str(p.get("model")))
        run = getattr(backend, "run_experts", None)
        if backend is None or run is None:
            raise UnknownModel(f"no MoE model {p.get('model')!r} here")
        n_experts = int(getattr(backend, "n_experts", 0))
        experts, counts = p.get("experts"), p.get("counts")
        if not (
            isinstance(experts, list)
            and isinstance(counts, list)
            and isinstance(p.get("rows"), np.ndarray)
            and len(experts) == len(counts) <= n_experts  # bounded before any loop over them
            and all(type(v) is int for v in (*experts, *counts))
        ):
            raise BadRequest(f"{shape}, one count per expert, at most {n_experts}")
        self._check_size(p["rows"])
        out = self._backend(backend.name, run, experts, counts, p["rows"])
        self.counters["expert_rows"] += len(p["rows"])
        return {"rows": out, "version": backend.version}

    def _run_batch(self, model: str, batch: list[Pending]) -> None:
        """Answer every request of a ready batch exactly once. Expired ones get
        ``DeadlineExceeded``; the others run in groups of one row shape and dtype (in order of
        arrival), one backend call per group. Whatever still escapes (a bug of ours, as in
        :meth:`_on_message`) is answered as an internal error to the requests not yet
        answered, and the loop keeps serving."""
        for item in batch:
            self._queued.pop(item.env.id, None)
        try:
            now = time.monotonic()
            groups: dict[tuple[tuple[int, ...], np.dtype], list[Pending]] = {}
            for item in batch:
                if item.env.expired(now):
                    self.counters["expired"] += 1
                    self._reply_error(item, DeadlineExceeded("deadline passed while queued"))
                else:  # an array of >= 1 row: checked on admission (_checked_rows)
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
        its rows. Joining, running and cutting happen inside :meth:`_backend`; if that fails,
        a batch of several is re-run one request at a time, so only a failing request gets
        the error."""
        backend = self.backends[model]
        inputs, limit = [i.inputs for i in live], self.codec.limits.max_message_bytes
        started = time.monotonic()
        try:
            outs = self._backend(model, _run_rows, backend, inputs, limit)
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
                frames = self._result_frames(item.env, payload)
            except TandemError as e:  # its rows are too big for a reply: this request alone
                self._reply_error(item, e)
                continue
            self._reply_all(item, frames)

    # ------------------------------------------------------------------ replies
    def _result_frames(self, env: Envelope, payload: Any) -> list[Any]:
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

    def _reply(self, route: list[Any], env: Envelope) -> None:
        self._send(route, self.codec.encode(env))

    def _send(self, route: list[Any], frames: list[Any]) -> None:
        """Send without blocking. A reply that cannot go out (the peer left, or its queue is
        at the high-water mark because it does not read) is counted and logged, never waited
        for."""
        if self._try_send(route, frames) != SENT:
            n = self.counters["replies_dropped"] = self.counters["replies_dropped"] + 1
            if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th...: a flood of these is one story
                log.warning("%d replies not sent so far: a peer left or does not read", n)

    def _try_send(self, route: list[Any], frames: list[Any]) -> int:
        """Send without blocking: ``SENT``, ``BLOCKED`` (the peer's queue is at its high-water
        mark) or ``GONE`` (no such peer; any other error counts as gone too). Under
        ROUTER_MANDATORY both errors come on the routing frame, so nothing is half sent."""
        assert self._sock is not None
        try:
            send_frames(self._sock, [*route, *frames], _DONTWAIT)
        except zmq.ZMQError as e:
            return BLOCKED if e.errno == _EAGAIN else GONE
        return SENT

    def health(self) -> dict[str, Any]:
        lim = self.config.limits
        return {
            "state": "draining" if self.draining else "serving",
            "protocol": PROTOCOL_VERSION,
            "models": {name: _model_health(b) for name, b in self.backends.items()},
            "queue_depth": self.batcher.depth,
            "queue_bytes": self.batcher.nbytes,
            "limits": {"max_rows": lim.max_rows, "max_request_bytes": lim.max_request_bytes},
            "uptime_s": round(time.monotonic() - self._started, 3),
            "counters": dict(self.counters),
            "streams": self.streams.health() if self.streams is not None else {"active": 0},
            "speculative": self.verifier.health(),
        }


def _checked_rows(backend: ModelBackend, inputs: np.ndarray) -> np.ndarray:
    """``check_batch``, and a check of its answer: the batcher counts rows and the worker
    groups requests by row shape and dtype, so it must be an array with the rows sent."""
    rows = backend.check_batch(inputs)
    if not (isinstance(rows, np.ndarray) and rows.ndim >= 1 and len(rows) == len(inputs)):
        raise BadOutput(f"check_batch returned {_describe(rows)} for {len(inputs)} rows")
    return rows


def _run_rows(backend: ModelBackend, inputs: list[np.ndarray], max_bytes: int) -> list[np.ndarray]:
    """Each request's output rows from one ``run`` over all their rows (requests of one row
    shape and dtype), each at most ``max_bytes`` (a reply must fit in a message). Only called
    through :meth:`CloudWorker._backend`: every step touches request data or backend output,
    and any of them may raise."""
    x = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
    out = backend.run(x)
    if not (isinstance(out, np.ndarray) and 1 <= out.ndim <= MAX_NDIM and len(out) == len(x)):
        raise BadOutput(f"run returned {_describe(out)} for {len(x)} rows")
    if out.dtype.byteorder == ">":
        out = out.astype(out.dtype.newbyteorder("<"))
    if out.dtype not in WIRE_DTYPES:
        raise BadOutput(f"run returned dtype {out.dtype}, which the wire does not carry")
    if not all_finite(out):
        bad = np.flatnonzero(~np.isfinite(out.reshape(len(out), -1)).all(axis=1))
        raise BadOutput(f"run returned NaN or inf in output rows {bad.tolist()[:10]}")
    outs = [out] if len(inputs) == 1 else np.split(out, np.cumsum([len(i) for i in inputs[:-1]]))
    big = max(o.nbytes for o in outs)
    if big > max_bytes:
        raise BadOutput(
            f"run returned {big} bytes for one request, over the {max_bytes}-byte message "
            "limit; send fewer rows per request"
        )
    return outs


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array shaped {value.shape}"
    return f"a {type(value).__name__}"


def _model_health(b: Any) -> dict[str, Any]:
    if is_generation_backend(b):
        return {"version": b.version, "kind": "generation"}
    return {
        "version": b.version,
        "kind": "array",
        "input": b.input_spec.model_dump(),
        "output": b.output_spec.model_dump(),
    }
