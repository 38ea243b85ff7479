"""The cloud worker: a ZeroMQ ROUTER socket in front of model backends. (Over 500 lines: the
loop thread's whole life — start-up, serve, drain, dispatch by kind, replies, health — in one
place; what happens to each kind of request lives in the modules named below.)

One thread owns the socket and the clock, and this module is that thread's loop: poll; read
every waiting message, decode and validate it, and hand it on by kind; run one batch per model
that is ready; answer every request individually, without blocking. What happens to a request
lives beside it, one module per idea:

* ``infer``, ``experts``, ``verify`` — :class:`~tandem.cloud.requests.WorkerRequests`:
  retries (the reply cache, joins), deadlines, the :class:`MicroBatcher` queue, the batches.
  An idle model runs a request the moment it arrives; requests that arrive while it is busy
  wait in the queue and form the next batch.
* ``generate``, ``cancel`` — :class:`~tandem.cloud.streams.WorkerStreams`: each stream runs
  its backend on a thread of its own and wakes this loop through a pipe, so while any stream is
  active the loop polls the socket and that pipe together (with none, the idle path stays one
  blocking receive), and each turn sends every stream's ready tokens as one chunk. Bounds:
  ``generation`` in the config; ``health`` reports ``streams``.
* ``health``, ``echo`` — answered here.

**Nothing a client sends ends or stalls the loop.** Backend code is only ever called through
:class:`~tandem.cloud.boundary.BackendBoundary`, the one place that turns any exception it
raises into a typed ``backend.error`` reply. Everything else that can go wrong on a message is
caught once in :meth:`CloudWorker._on_message`, and on a batch once in
:meth:`~tandem.cloud.requests.WorkerRequests.run_batch`, and answered as a typed error. What a
request can cost is bounded before it runs: rows and bytes per request (``limits``), queued
requests and bytes per model and in total (``queue``; over them: ``Overloaded`` with a
retry-after hint), ZeroMQ's high-water marks, and the reply cache (``idempotency``). Replies
are sent without blocking: a peer that does not read them cannot stall the worker. Every
message is answered exactly once, with a result or a typed error (a ``cancel`` by its stream's
end).

**CurveZMQ.** With ``curve`` set, the handshake admits only the keys of ``allowed_clients``,
and every message's sender key (the connection's ``User-Id``) is checked again against that
directory as it is now (:meth:`~tandem.runtime.curve.ClientAllowList.admits`): a key removed
from it is answered :class:`~tandem.runtime.errors.Unauthorized`, on connections opened before
too, within :data:`~tandem.runtime.curve.REVOCATION_CHECK_S` (1 s). A ``cancel`` is still
taken (it only frees work); what was queued or streaming before runs to its end.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import zmq

from tandem.cloud.boundary import BackendBoundary, BadOutput
from tandem.cloud.config import WorkerConfig
from tandem.cloud.engine import Engine, Mailbox
from tandem.cloud.loading import check_security, load_backends
from tandem.cloud.metrics import WorkerMetrics
from tandem.cloud.model_admin import ModelAdmin
from tandem.cloud.requests import WorkerRequests
from tandem.cloud.streams import BLOCKED, GONE, SENT, WorkerStreams, is_generation_backend
from tandem.cloud.verify import VerifyTable
from tandem.kernels.autotune import choices as kernel_choices
from tandem.runtime import logs, tracing
from tandem.runtime.backends import LocalGenerationBackend, ModelBackend
from tandem.runtime.curve import (
    ClientAllowList,
    configure_server,
    is_loopback,
    start_authenticator,
)
from tandem.runtime.errors import (
    BadRequest,
    DeadlineExceeded,
    OverloadedError,
    ShuttingDown,
    TandemError,
    Unauthorized,
    WireError,
)
from tandem.runtime.ops_http import OpsHttpServer
from tandem.runtime.wire import (
    PROTOCOL_VERSION,
    Envelope,
    Frame,
    Kind,
    WireCodec,
    frames_nbytes,
    recv_frames,
    recv_frames_with_user_id,
    send_frames,
)

__all__ = ["BadOutput", "CloudWorker"]

log = logging.getLogger(__name__)

_NO_ID = bytes(16)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_EAGAIN = int(zmq.EAGAIN)
_DONTWAIT = int(zmq.DONTWAIT)
_IDLE_POLL_MS = 50  # the longest the loop waits before it looks at the stop flag again
_MAX_READS_PER_TURN = 256  # messages read before ready batches get a chance to run
_WORK = (Kind.INFER, Kind.EXPERTS, Kind.VERIFY)
_COUNTED = (*_WORK, Kind.GENERATE)  # in tandem_worker_requests_total
_SWITCH_INTERVAL_S = 0.001  # the GIL's, while serving (see serve)


class CloudWorker:
    def __init__(
        self,
        config: WorkerConfig,
        backends: dict[str, ModelBackend] | None = None,
        *,
        context: zmq.Context | None = None,
        config_path: str | Path | None = None,
    ) -> None:
        check_security(config)  # before loading any model: fail fast
        self.config = config
        # With ``http``: metrics, and the ops HTTP server up before the models load, so a
        # probe sees /health 200 and /ready 503 {"state": "loading"} meanwhile.
        self._state = "loading"
        self._loop_turn: float | None = None  # monotonic s of the loop's last turn: liveness
        self.metrics: WorkerMetrics | None = None
        self.ops: OpsHttpServer | None = None
        if config.http is not None:
            self.metrics = WorkerMetrics()
            self.ops = OpsHttpServer(
                config.http.bind,
                registry=self.metrics.registry,
                ready=self._ready_probe,
                health=self.liveness,
            ).start()
        try:
            self.backends = backends if backends is not None else load_backends(config)
        except BaseException:
            self.close_ops()
            raise
        self.codec = WireCodec(config.limits.wire_limits())
        self._max_frames = self.codec.limits.max_frames + 2  # and the routing frames
        self.counters: Counter[str] = Counter()
        self._stop = threading.Event()
        self.boundary = BackendBoundary(self.counters)
        self.mailbox = Mailbox()
        gen = config.generation
        self.engines = {
            name: Engine(
                name,
                b,
                step_tokens=gen.step_tokens,
                prefill_chunk=gen.prefill_chunk,
                max_queued_prefill=gen.max_queued_prefill,
            )
            for name, b in self.backends.items()
            if isinstance(b, LocalGenerationBackend)
        }
        self.verifier = VerifyTable(config.speculative, self.backends, self.engines)
        self.requests = WorkerRequests(
            config,
            self.backends,
            self.codec,
            self.counters,
            self.boundary,
            self.verifier,
            self._send,
            self._stop,
            self.mailbox,
        )
        self.batcher = self.requests.batcher
        self.streams: WorkerStreams | None = None  # made by serve(): it holds a pipe
        self.endpoint: str | None = None
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._allow: ClientAllowList | None = None  # with curve: the senders to serve
        self._started = time.monotonic()
        # load/replace/unload models while serving (SIGHUP, admin messages); config_path: the
        # file a reload reads again
        self.admin = ModelAdmin(self, config_path)
        self._state = "starting"  # loaded and warmed up; "serving" once serve() has bound
        if self.metrics is not None:
            self.requests.metrics = self.metrics
            self.metrics.attach(self)

    def stop(self) -> None:
        """Start draining. Safe from any thread and from a signal handler."""
        self._stop.set()

    @property
    def draining(self) -> bool:
        return self._stop.is_set()

    @property
    def state(self) -> str:
        """``loading`` (models), ``starting`` (binding), ``serving``, ``draining``,
        ``stopped``."""
        if self._state == "serving" and self.draining:
            return "draining"
        return self._state

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """What ``GET /ready`` answers: ready while serving (every model it serves is loaded
        and warmed up before it is served), and per model ``{"ready", "version", "kind"}``.
        A model being loaded for the first time or unloaded shows ``ready: false`` without
        taking the worker out of readiness: the models it serves still answer. Safe from
        any thread."""
        state = self.state
        if state == "loading":
            return False, {"state": state, "models": {}}
        models = {
            name: {"ready": True, "version": str(b.version), "kind": _model_kind(b)}
            for name, b in list(self.backends.items())
        }
        self.admin.annotate(models, in_flight=False)  # loading: not ready; both while replacing
        return state == "serving", {"state": state, "models": models}

    def loop_idle_s(self) -> float | None:
        """Seconds since the loop's last turn (it turns at least every 50 ms when idle); None
        before the loop starts and after it ends. Safe from any thread."""
        turn = self._loop_turn
        return None if turn is None else time.monotonic() - turn

    def stalled(self) -> float | None:
        """:meth:`loop_idle_s` when it is over ``http.stall_s`` (a backend call that never
        returns holds the loop), else None."""
        idle = self.loop_idle_s()
        if idle is None or self.config.http is None or idle <= self.config.http.stall_s:
            return None
        return idle

    def liveness(self) -> dict[str, Any]:
        """What ``GET /health`` adds to ``{"status": "ok"}``: ``{"status": "stalled",
        "loop_idle_s": ...}`` (answered 503) once the loop is :meth:`stalled`; nothing while
        loading, before the loop runs."""
        idle = self.stalled()
        return {} if idle is None else {"status": "stalled", "loop_idle_s": round(idle, 3)}

    def _ready_probe(self) -> tuple[bool, dict[str, Any]]:
        """``GET /ready``: :meth:`readiness`, and not ready while the loop is stalled."""
        ok, body = self.readiness()
        idle = self.stalled()
        if idle is not None:
            return False, {**body, "stalled": True, "loop_idle_s": round(idle, 3)}
        return ok, body

    def close_ops(self) -> None:
        """Stop the ops HTTP server, if any (serve() does once it has drained)."""
        if self.ops is not None:
            self.ops.close()

    def serve(self, ready: Callable[[str], None] | None = None) -> int:
        """Bind, call ``ready(endpoint)``, serve until :meth:`stop` (or SIGTERM/SIGINT when
        run in the main thread), drain, return the exit code (0)."""
        sock = self._ctx.socket(zmq.ROUTER)
        self.config.socket.configure(sock, self.codec.limits.max_message_bytes)
        sock.setsockopt(zmq.RCVTIMEO, _IDLE_POLL_MS)  # the idle wait in _loop
        auth = None
        try:
            curve = self.config.curve
            if curve is not None:
                # the ZAP handler runs before the socket binds: without one, Curve admits anyone
                auth, allow = start_authenticator(self._ctx, curve.allowed_clients, log)
                configure_server(sock, curve.secret_key)
                self._allow = allow
                security = f"curve on ({len(allow.keys)} allowed client keys in {allow.directory})"
            else:
                security = "curve OFF (plain text, any client)"
                if not is_loopback(self.config.bind):
                    log.warning(
                        "bind %s is not loopback and curve is off (insecure)", self.config.bind
                    )
            sock.bind(self.config.bind)
            traced = tracing.configure(self.config.tracing, "tandem-worker")
        except BaseException:
            sock.close(linger=0)
            if auth is not None:
                auth.stop()
            self._close_compute()
            raise
        self._sock = sock
        self.streams = WorkerStreams(
            self.config.generation,
            self.backends,
            self.codec,
            self._try_send,
            self.boundary.failure,
            self.mailbox.wake,
            self.engines if self.config.generation.engine else None,
        )
        self.streams.metrics = self.metrics
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        restore = self._install_signal_handlers()
        # The engines' threads run Python between kernels; a thread that wants the GIL waits
        # up to the switch interval (5 ms by default) for it: this loop answers within 1 ms.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, _SWITCH_INTERVAL_S))
        log.info(
            "worker listening on %s, %s, models: %s",
            self.endpoint,
            security,
            ", ".join(self.backends),
            extra={"curve": curve is not None},
        )
        self._state = "serving"
        if ready:
            ready(self.endpoint)
        try:
            self._loop(sock)
        finally:
            self._loop_turn = None  # the loop has ended: liveness no longer follows it
            sys.setswitchinterval(switch)
            for sig, handler in restore.items():
                signal.signal(sig, handler)
            self.streams.close()
            self._close_compute()
            sock.close()
            if auth is not None:
                auth.stop()  # after the socket: it must never be open without its handler
            if traced:
                tracing.shutdown()  # flushes the spans still queued
        self._state = "stopped"
        self.close_ops()
        log.info("worker stopped: %s", dict(self.counters))
        return 0

    def _close_compute(self) -> None:
        """Stop the offload threads (what they hold runs first) and the engines (what they
        hold fails: ShuttingDown), answer what they posted, free the sessions."""
        self.requests.close()
        for engine in self.engines.values():
            engine.close()
        self.admin.close()  # the versions retiring, and their engines
        self.mailbox.drain()
        self.verifier.close()
        self.mailbox.close()

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: self.stop())
        reload = self.admin.signal_reload  # SIGHUP: reload the models (model_admin)
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: reload())
        return previous

    def _loop(self, sock: zmq.Socket) -> None:
        streams, requests, batcher = self.streams, self.requests, self.batcher
        assert streams is not None
        mailbox = self.mailbox
        wake_fd = mailbox.fd
        authenticated = self._allow is not None
        grace_until: float | None = None
        while True:
            now = self._loop_turn = time.monotonic()
            # Draining: every queued request still runs and every stream ends (ShuttingDown);
            # once no request is left, new ones are answered ShuttingDown for grace_ms, then
            # the loop ends.
            if self.draining and grace_until is None and streams.active:
                streams.shutdown()
            if (
                self.draining
                and grace_until is None
                and batcher.depth == 0
                and requests.inflight == 0
            ):
                log.info("drained; refusing new work for %d ms", self.config.drain.grace_ms)
                grace_until = now + self.config.drain.grace_ms / 1e3
            if grace_until is not None and now >= grace_until:
                return
            due = batcher.next_due(now)
            timeout = _IDLE_POLL_MS
            if due is not None:
                timeout = max(0, min(timeout, int((due - now) * 1e3 + 0.999)))
            if grace_until is not None:
                timeout = min(timeout, max(0, int((grace_until - now) * 1e3)))
            streaming = streams.active > 0 or requests.inflight > 0 or self.admin.working
            if streams.active:
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
                        if authenticated:
                            self._on_message(*recv_frames_with_user_id(sock, 2, self._max_frames))
                        else:
                            self._on_message(recv_frames(sock, 2, self._max_frames))
                        if not cast(int, sock.getsockopt(_EVENTS)) & _POLLIN:
                            break
            except zmq.Again:  # the idle receive timed out: look at the clock and the flags
                pass
            now = time.monotonic()
            for model, batch in batcher.take_ready(now, flush=self.draining):
                requests.run_batch(model, batch)
            if streaming:
                mailbox.drain()  # before pump: a producer appending after it wakes again
                streams.pump(time.monotonic())
            requests.expire(now)
            if self.admin.due:  # a SIGHUP's reload to start, old model versions to retire
                self.admin.turn()

    # ------------------------------------------------------------------ messages
    def _on_message(self, frames: list[Frame], user_id: bytes | None = None) -> None:
        """Decode one message and answer it, or hand it on. ``user_id``: the sender's Curve
        key (None without Curve)."""
        # ROUTER prepends the peer identity; a REQ peer adds an empty delimiter after it.
        n_route = 2 if len(frames) > 1 and len(frames[1]) == 0 else 1
        route, body = frames[:n_route], frames[n_route:]
        try:
            env = self.codec.decode(body)
        except WireError as e:
            self.counters["wire_errors"] += 1
            rid = e.request_id or _NO_ID
            log.debug("bad message: %s", e, extra={"request_id": rid.hex(), "error": e.code})
            self._reply(route, Envelope(kind=Kind.ERROR, id=rid, payload=e.to_wire()))
            return
        self.counters[env.kind.value] += 1
        arrived = 0.0 if tracing.TRACER is None else time.monotonic()
        logged = logs.CURRENT_REQUEST.set(env)  # log lines name the request (its id, trace)
        try:
            if user_id is not None and env.kind is not Kind.CANCEL:
                self._check_sender(user_id)
            reply = self._handle(route, env, body, user_id)
        except TandemError as e:
            if isinstance(e, OverloadedError):
                self.counters["overloaded"] += 1
            reply = env.error_reply(e)
            if self.metrics is not None and env.kind in _COUNTED:
                self.metrics.request(_payload_model(env), env.kind.value, e.code)
        except Exception as e:  # a bug of ours: answer it, log it, keep serving
            self.counters["internal_errors"] += 1
            log.exception("internal error on %s request", env.kind.value)
            reply = env.error_reply(TandemError(f"internal error: {type(e).__name__}: {e}"))
            if self.metrics is not None and env.kind in _COUNTED:
                self.metrics.request(_payload_model(env), env.kind.value, TandemError.code)
        try:
            if reply is not None:
                self._reply(route, reply)
                if tracing.TRACER is not None:  # answered at once: health, echo, refusals
                    tracing.record_worker_span(env, arrived, reply=reply)
        finally:
            logs.CURRENT_REQUEST.reset(logged)

    def _check_sender(self, user_id: bytes) -> None:
        """:class:`Unauthorized` if the sender's Curve key is no longer allowed."""
        assert self._allow is not None
        if not self._allow.admits(user_id, time.monotonic()):
            n = self.counters["unauthorized"] = self.counters["unauthorized"] + 1
            if n & (n - 1) == 0:  # the 1st, 2nd, 4th...: a client retrying is one story
                log.warning(
                    "refused a message from revoked Curve key %s (%d so far)",
                    user_id.decode("ascii", "replace"),
                    n,
                    extra={"client_key": user_id.decode("ascii", "replace")},
                )
            raise Unauthorized(
                "this client's Curve key is no longer in the worker's allowed_clients; "
                "nothing was run"
            )

    def _handle(
        self, route: list[Any], env: Envelope, body: list[Frame], user_id: bytes | None = None
    ) -> Envelope | None:
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
            # a verify session gives its backend slot up only to a stream that will start
            self.streams.start(route, env, make_room=self.verifier.make_room)
            return None
        if env.kind is Kind.ADMIN:  # answered once done (model_admin)
            return self.admin.on_message(route, env, user_id)
        if env.kind not in _WORK:
            raise BadRequest(f"a worker does not accept {env.kind.value!r} messages")
        self.requests.admit(route, env, body)
        return None

    # ------------------------------------------------------------------ replies
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
            "models": self._models_health(),
            "queue_depth": self.batcher.depth,
            "queue_bytes": self.batcher.nbytes,
            "limits": {"max_rows": lim.max_rows, "max_request_bytes": lim.max_request_bytes},
            "uptime_s": round(time.monotonic() - self._started, 3),
            "counters": dict(self.counters),
            "streams": self.streams.health() if self.streams is not None else {"active": 0},
            "speculative": self.verifier.health(),
            "engines": {name: e.health() for name, e in self.engines.items()},
            "kernels": kernel_choices(),
            "admin": self.admin.health(),
        }

    def _models_health(self) -> dict[str, Any]:
        """Each model's version; while one changes, also the one loading (``next``) or
        retiring (``previous``, with its requests in flight)."""
        models = {name: _model_health(b) for name, b in self.backends.items()}
        self.admin.annotate(models)
        return models


def _payload_model(env: Envelope) -> Any:
    p = env.payload
    return p.get("model") if isinstance(p, dict) else None


def _model_kind(b: Any) -> str:
    return "generation" if is_generation_backend(b) else "array"


def _model_health(b: Any) -> dict[str, Any]:
    if is_generation_backend(b):
        return {"version": b.version, "kind": "generation"}
    return {
        "version": b.version,
        "kind": "array",
        "input": b.input_spec.model_dump(),
        "output": b.output_spec.model_dump(),
    }
