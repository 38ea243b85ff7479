"""The ingress of Tandem on Ray Serve: a ZeroMQ ROUTER socket that speaks Tandem's wire protocol
and forwards each ``infer`` and ``experts`` request to its model's Ray Serve deployment, so an
unchanged :class:`~tandem.runtime.client.CloudClient` (an edge's ``cloud.endpoint``) talks to
Ray Serve exactly as to a worker.

One asyncio loop owns the socket: it reads every waiting message, decodes and validates it with
the worker's codec and limits, answers ``health`` and ``echo`` itself, and hands each request
to a task that calls the deployment's handle (:class:`~ray.serve.handle.DeploymentHandle`) and
awaits the replica's answer, so the loop never blocks on a replica. Replies go out without
blocking (``DONTWAIT``, ``ROUTER_MANDATORY``): a peer that does not read cannot stall it.

The worker's promises hold here too. **Bounded**: rows and bytes per request (``limits``),
requests and bytes in flight (``ingress.max_inflight``, ``max_inflight_bytes``; over them, as
over Serve's own ``max_queued_requests``: ``Overloaded`` with a retry-after hint), ZeroMQ's
high-water marks, the reply cache (``idempotency``). **Deadlines**: a request's budget is
counted on this process's clock; the replica gets what is left (and does not run a request
whose budget ran out while it waited); with none left, ``DeadlineExceeded``, and the call is
cancelled. **Exactly one reply per request**: a retry of an id already answered is answered
from the :class:`~tandem.cloud.idempotency.ReplyCache`, one of an id in flight joins it (at most
:data:`~tandem.cloud.idempotency.MAX_JOINED_ROUTES` routes), one asking for something else
under a known id is refused. **Replica failure**: a request whose replica died under it (Ray's
``ActorDiedError``) is sent again — Serve routes it to a live replica — inside its deadline, at
most ``ingress.max_tries`` sends (then ``Unavailable``, on which a client fails over); Serve
starts a replacement meanwhile. **Typed errors**: replicas answer with the worker's error
replies; anything unexpected is an internal error, and the loop keeps serving. **CurveZMQ** as
on the worker (:mod:`tandem.runtime.curve`).

Not served here: ``generate`` and ``verify`` (language models on Ray run on Ray Serve LLM or
vLLM behind the ``openai`` backend, see docs/ray.md): answered ``BadRequest``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)

from tandem.cloud.idempotency import MAX_JOINED_ROUTES, ReplyCache
from tandem.cloud.loading import check_security
from tandem.cloud.ray_config import RayServeConfig
from tandem.cloud.ray_replica import ERROR
from tandem.cloud.ray_routes import Attempt, ModelRoute, experts_attempt, infer_attempt
from tandem.runtime.curve import (
    ClientAllowList,
    configure_server,
    is_loopback,
    start_authenticator,
)
from tandem.runtime.errors import (
    BadRequest,
    DeadlineExceeded,
    LimitExceeded,
    OverloadedError,
    ShuttingDown,
    TandemError,
    Unauthorized,
    Unavailable,
    WireError,
    error_from_wire,
)
from tandem.runtime.wire import (
    PROTOCOL_VERSION,
    Envelope,
    Frame,
    Kind,
    WireCodec,
    frames_nbytes,
)

log = logging.getLogger(__name__)

_NO_ID = bytes(16)
_IDLE_POLL_MS = 50  # the longest the loop waits before it looks at the stop flag again
_MAX_READS_PER_TURN = 256  # messages read before the reply tasks get a turn
_RETRY_PAUSE_S = 0.05  # before a request is sent again after its replica died
_STATUS_EVERY_S = 2.0  # how often health's view of the deployments is refreshed


@dataclass(eq=False)
class _Job:
    """A request forwarded and not answered yet; retries of its id join its routes."""

    env: Envelope
    routes: list[list[Any]]
    nbytes: int
    task: asyncio.Task[None] | None = None
    started: float = field(default_factory=time.monotonic)


class RayIngress:
    """Serves Tandem's wire protocol in front of Ray Serve deployments (see the module
    docstring). ``routes``: model name → how to reach it (:func:`tandem.cloud.ray_serve.deploy`
    makes them)."""

    def __init__(
        self,
        config: RayServeConfig,
        routes: dict[str, ModelRoute],
        *,
        context: zmq.Context | None = None,
    ) -> None:
        check_security(config.security_config())
        self.config = config
        self.routes = routes
        self.codec = WireCodec(config.limits.wire_limits())
        self._max_frames = self.codec.limits.max_frames + 2  # and the routing frames
        self.counters: Counter[str] = Counter()
        idem = config.idempotency
        self.answered = ReplyCache(idem.max_entries, idem.max_bytes, idem.ttl_s)
        self._jobs: dict[bytes, _Job] = {}
        self._inflight_bytes = 0
        self._latency_ms = 1.0  # an average of recent answers' time: the retry-after hint
        self._stop = threading.Event()
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._allow: ClientAllowList | None = None
        self._started = time.monotonic()
        self.deployments: dict[str, Any] = {}  # Serve's status of each deployment
        self.endpoint: str | None = None

    def stop(self) -> None:
        """Start draining. Safe from any thread and from a signal handler."""
        self._stop.set()

    @property
    def draining(self) -> bool:
        return self._stop.is_set()

    @property
    def inflight(self) -> int:
        return len(self._jobs)

    def serve(self, ready: Callable[[str], None] | None = None) -> int:
        """Bind, call ``ready(endpoint)``, serve until :meth:`stop` (or SIGTERM/SIGINT in the
        main thread), drain, return the exit code (0)."""
        restore: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                restore[sig] = signal.signal(sig, lambda *_: self.stop())
        try:
            asyncio.run(self._main(ready))
        finally:
            for sig, handler in restore.items():
                signal.signal(sig, handler)
        log.info("ingress stopped: %s", dict(self.counters))
        return 0

    # ------------------------------------------------------------------ the loop
    async def _main(self, ready: Callable[[str], None] | None) -> None:
        actx = zmq.asyncio.Context.shadow(self._ctx.underlying)
        sock = actx.socket(zmq.ROUTER)
        self.config.socket.configure(sock, self.codec.limits.max_message_bytes)
        auth = None
        bind = self.config.ingress.bind
        try:
            curve = self.config.curve
            if curve is not None:
                auth, self._allow = start_authenticator(self._ctx, curve.allowed_clients, log)
                configure_server(sock, curve.secret_key)
            elif not is_loopback(bind):
                log.warning("bind %s is not loopback and curve is off (insecure)", bind)
            sock.bind(bind)
        except BaseException:
            sock.close(linger=0)
            if auth is not None:
                auth.stop()
            raise
        self._sock = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        watch = asyncio.create_task(self._watch_deployments())
        log.info(
            "ray ingress listening on %s (curve %s), models: %s",
            self.endpoint,
            "on" if curve is not None else "OFF",
            ", ".join(self.routes),
        )
        if ready:
            ready(self.endpoint)
        try:
            await self._loop(sock)
        finally:
            watch.cancel()
            jobs = [j.task for j in self._jobs.values() if j.task is not None]
            for t in jobs:
                t.cancel()
            await asyncio.gather(watch, *jobs, return_exceptions=True)
            sock.close()
            if auth is not None:
                auth.stop()  # after the socket: it must never be open without its handler

    async def _loop(self, sock: zmq.asyncio.Socket) -> None:
        grace_until: float | None = None
        drain_until: float | None = None
        while True:
            now = time.monotonic()
            if self.draining and drain_until is None:
                drain_until = now + self.config.ingress.drain_timeout_s
            drained = not self._jobs or (drain_until is not None and now >= drain_until)
            if drain_until is not None and grace_until is None and drained:
                log.info("drained; refusing new work for %d ms", self.config.drain.grace_ms)
                grace_until = now + self.config.drain.grace_ms / 1e3
            if grace_until is not None and now >= grace_until:
                return
            if not await sock.poll(_IDLE_POLL_MS, zmq.POLLIN):
                self._expire()
                continue
            for _ in range(_MAX_READS_PER_TURN):
                frames, user_id = await self._recv(sock)
                self._on_message(frames, user_id)
                if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    break
            self._expire()
            await asyncio.sleep(0)  # the reply tasks' turn

    async def _recv(self, sock: zmq.asyncio.Socket) -> tuple[list[Frame], bytes | None]:
        """One multipart message: routing and envelope frames copied, array frames zero-copy;
        frames past the codec's limit are read and dropped (the codec answers ``wire.limit``).
        With Curve, also the sender's key (its connection's ``User-Id``)."""
        first = await sock.recv(copy=False)
        user_id = None
        if self._allow is not None:
            try:
                user_id = first.get("User-Id").encode("ascii", "replace")
            except zmq.ZMQError:
                user_id = b""
        frames: list[Frame] = [first.bytes]
        while sock.getsockopt(zmq.RCVMORE):
            f = await sock.recv(copy=False)
            if len(frames) <= self._max_frames:
                frames.append(f.bytes if len(frames) < 2 else f.buffer)
        return frames, user_id

    def _expire(self) -> None:
        if len(self.answered):
            self.answered.expire(time.monotonic())

    async def _watch_deployments(self) -> None:
        """Serve's view of each deployment (status, replicas by state), for ``health``."""
        from ray import serve

        apps = {t.name for r in self.routes.values() for t in r.targets}
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                self.deployments = {
                    name: {
                        "status": str(getattr(d.status, "value", d.status)),
                        "replicas": dict(d.replica_states),
                    }
                    for app, a in status.applications.items()
                    if app in apps
                    for name, d in a.deployments.items()
                }
            except Exception as e:  # the controller is busy or restarting: try again later
                log.debug("serve.status failed: %s", e)
            await asyncio.sleep(_STATUS_EVERY_S)

    # ------------------------------------------------------------------ messages
    def _on_message(self, frames: list[Frame], user_id: bytes | None) -> None:
        # ROUTER prepends the peer identity; a REQ peer adds an empty delimiter after it.
        n_route = 2 if len(frames) > 1 and len(frames[1]) == 0 else 1
        route, body = frames[:n_route], frames[n_route:]
        try:
            env = self.codec.decode(body)
        except WireError as e:
            self.counters["wire_errors"] += 1
            rid = e.request_id or _NO_ID
            self._send(route, self.codec.encode(Envelope(Kind.ERROR, rid, payload=e.to_wire())))
            return
        self.counters[env.kind.value] += 1
        try:
            if user_id is not None and env.kind is not Kind.CANCEL:
                self._check_sender(user_id)
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
            self._send(route, self.codec.encode(reply))

    def _check_sender(self, user_id: bytes) -> None:
        assert self._allow is not None
        if not self._allow.admits(user_id, time.monotonic()):
            self.counters["unauthorized"] += 1
            raise Unauthorized(
                "this client's Curve key is no longer in the ingress's allowed_clients; "
                "nothing was run"
            )

    def _handle(self, route: list[Any], env: Envelope, body: list[Frame]) -> Envelope | None:
        if env.kind is Kind.HEALTH:
            return env.reply(Kind.RESULT, self.health())
        if env.kind is Kind.ECHO:
            size = frames_nbytes(env.body)
            if size > self.config.limits.max_echo_bytes:
                raise BadRequest(
                    f"echo of {size} bytes; at most {self.config.limits.max_echo_bytes}"
                )
            return env.reply(Kind.RESULT, env.payload)
        if env.kind is Kind.CANCEL:  # no stream runs here: nothing to stop, nothing to say
            return None
        if env.kind in (Kind.GENERATE, Kind.VERIFY):
            raise BadRequest(
                f"the Ray Serve ingress does not serve {env.kind.value!r}: language models on "
                "Ray run on Ray Serve LLM or vLLM, reached through the openai backend"
            )
        if env.kind not in (Kind.INFER, Kind.EXPERTS):
            raise BadRequest(f"the ingress does not accept {env.kind.value!r} messages")
        self._admit(route, env, body)
        return None

    # ------------------------------------------------------------------ admission
    def _admit(self, route: list[Any], env: Envelope, body: list[Frame]) -> None:
        """Answer a retry now, or check the request and start its forwarding task. Raises a
        :class:`TandemError` to be answered."""
        now = time.monotonic()
        cached = self.answered.get(env.id, now)
        if cached is not None:
            self._check_retry(cached[1], env)
            self.counters["replayed"] += 1
            self._send(route, cached[0])
            return
        job = self._jobs.get(env.id)
        if job is not None:
            self._check_retry(job.env, env)
            if len(job.routes) >= MAX_JOINED_ROUTES:
                self.counters["joins_refused"] += 1
                raise BadRequest(
                    f"this request id is in flight here with {len(job.routes)} tries waiting "
                    "for its answer; wait for it instead of sending it again"
                )
            self.counters["joined"] += 1
            job.routes.append(route)
            return
        if self.draining:
            raise ShuttingDown("the ingress is draining; send new work elsewhere")
        if env.expired(now):
            raise DeadlineExceeded("no time budget left when the request reached the ingress")
        plan = infer_attempt if env.kind is Kind.INFER else experts_attempt
        attempt = plan(self.routes, env, self.config.limits)
        nbytes = frames_nbytes(body)
        lim = self.config.ingress
        if len(self._jobs) >= lim.max_inflight or self._inflight_bytes + nbytes > (
            lim.max_inflight_bytes
        ):
            raise OverloadedError(
                f"{len(self._jobs)} requests ({self._inflight_bytes} bytes) in flight, the "
                f"ingress's bound is {lim.max_inflight} ({lim.max_inflight_bytes} bytes)",
                retry_after_ms=min(3.6e6, max(1.0, self._latency_ms)),
            )
        job = _Job(env, [route], nbytes)
        self._jobs[env.id] = job
        self._inflight_bytes += nbytes
        job.task = asyncio.get_running_loop().create_task(self._run(job, attempt))

    def _check_retry(self, original: Envelope, retry: Envelope) -> None:
        if not original.same_body(retry):
            self.counters["id_conflicts"] += 1
            raise BadRequest(
                "this request id was used for a different request in the last "
                f"{self.config.idempotency.ttl_s:g} s; use a fresh id for new work"
            )

    # ------------------------------------------------------------------ forwarding
    async def _run(self, job: _Job, attempt: Attempt) -> None:
        """Forward one request and answer it on every route it came on, exactly once."""
        env = job.env
        try:
            payload = await self._call(env, attempt)
            frames = self._result_frames(env, payload)
            ms = (time.monotonic() - job.started) * 1e3
            self._latency_ms += 0.1 * (ms - self._latency_ms)
        except TandemError as e:
            frames = self.codec.encode(env.error_reply(e))
        except asyncio.CancelledError:  # the loop is closing
            frames = self.codec.encode(env.error_reply(ShuttingDown("the ingress stopped")))
            raise
        except Exception as e:  # a bug of ours: answer it, log it, keep serving
            self.counters["internal_errors"] += 1
            log.exception("internal error forwarding a %s request", env.kind.value)
            frames = self.codec.encode(
                env.error_reply(TandemError(f"internal error: {type(e).__name__}: {e}"))
            )
        finally:
            if self._jobs.get(env.id) is job:
                del self._jobs[env.id]
                self._inflight_bytes -= job.nbytes
            routes, job.routes = job.routes, []
            for route in routes:
                self._send(route, frames)

    async def _call(self, env: Envelope, attempt: Attempt) -> Any:
        """The replica's result payload, sending again (inside the deadline) when the replica
        died under the request; raises the typed error the replica or Serve answered."""
        tries = 0
        model = env.payload.get("model") if isinstance(env.payload, dict) else "?"
        while True:
            budget = env.budget_s()
            if budget is not None and budget <= 0:
                self.counters["expired"] += 1
                raise DeadlineExceeded(f"no answer from model {model!r} within the deadline")
            tries += 1
            try:
                kind, value = await asyncio.wait_for(attempt(budget), budget)
            except TimeoutError:
                self.counters["expired"] += 1
                raise DeadlineExceeded(
                    f"no answer from model {model!r} within the deadline"
                ) from None
            except (RayActorError, ReplicaUnavailableError) as e:
                self.counters["replica_lost"] += 1
                if tries >= self.config.ingress.max_tries:
                    raise Unavailable(
                        f"the replicas of model {model!r} died under this request {tries} "
                        f"times: {type(e).__name__}"
                    ) from None
                log.info("a replica of %r died under a request; sending it again", model)
                self.counters["replica_retries"] += 1
                await asyncio.sleep(min(_RETRY_PAUSE_S, max(0.0, env.budget_s() or 0.0)))
                continue
            except BackPressureError as e:
                raise OverloadedError(
                    f"model {model!r}: {e.message}",
                    retry_after_ms=min(3.6e6, max(1.0, self._latency_ms)),
                ) from None
            except DeploymentUnavailableError as e:
                raise Unavailable(e.message) from None
            except RayTaskError as e:  # the replica raised past its own boundary
                log.warning("a replica of %r raised: %s", model, e)
                raise TandemError(f"internal error in a replica of {model!r}") from None
            if kind == ERROR:
                raise error_from_wire(value if isinstance(value, dict) else {})
            return value

    def _result_frames(self, env: Envelope, payload: Any) -> list[Any]:
        """A result reply, encoded once and remembered for retries of the same id."""
        frames = self.codec.encode(env.reply(Kind.RESULT, payload))
        size, limit = frames_nbytes(frames), self.codec.limits.max_message_bytes
        if size > limit:
            raise LimitExceeded(
                f"the reply would be {size} bytes, over the {limit}-byte message limit; "
                "send fewer rows per request"
            )
        self.answered.put(env, frames, time.monotonic())
        return frames

    def _send(self, route: list[Any], frames: list[Any]) -> None:
        """Send without blocking; a reply that cannot go out (the peer left, or does not read)
        is counted, never waited for."""
        assert self._sock is not None
        sent = self._sock.send_multipart([*route, *frames], flags=zmq.DONTWAIT, copy=False)
        if sent.done() and sent.exception() is None:
            return
        n = self.counters["replies_dropped"] = self.counters["replies_dropped"] + 1
        if n & (n - 1) == 0:
            log.warning("%d replies not sent so far: a peer left or does not read", n)

    def health(self) -> dict[str, Any]:
        lim = self.config.limits
        return {
            "state": "draining" if self.draining else "serving",
            "protocol": PROTOCOL_VERSION,
            "models": {name: r.info for name, r in self.routes.items()},
            "queue_depth": len(self._jobs),
            "queue_bytes": self._inflight_bytes,
            "limits": {"max_rows": lim.max_rows, "max_request_bytes": lim.max_request_bytes},
            "uptime_s": round(time.monotonic() - self._started, 3),
            "counters": dict(self.counters),
            "streams": {"active": 0},
            "ray": {"deployments": self.deployments},
        }
