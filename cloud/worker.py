"""The cloud worker: a ZeroMQ ROUTER socket in front of ONNX Runtime models.

One thread owns the socket and the clock. Its loop: poll; read every waiting message, validate
it and queue it in the :class:`MicroBatcher`; run the batches that are due (full, or whose
oldest request has waited ``max_wait_us``) as one ONNX Runtime call each; answer every request
individually. While a batch runs, new requests wait in ZeroMQ's queue and join the next batch.

Every message is answered exactly once: with a result, or with a typed error (bad frames,
unknown model, deadline passed, shutting down). Nothing a client sends can crash the loop.
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
from tandem.runtime.backends import ModelBackend, OnnxBackend
from tandem.runtime.errors import (
    BadRequest,
    DeadlineExceeded,
    ShuttingDown,
    TandemError,
    UnknownModel,
    WireError,
)
from tandem.runtime.manifest import load_manifest, verify_entry
from tandem.runtime.wire import (
    PROTOCOL_VERSION,
    Envelope,
    Frame,
    Kind,
    WireCodec,
    now_epoch_ms,
    recv_frames,
    send_frames,
)

log = logging.getLogger(__name__)

_NO_ID = bytes(16)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_IDLE_POLL_MS = 50  # the longest the loop waits before it looks at the stop flag again
_MAX_READS_PER_TURN = 1024  # messages read before due batches get a chance to run


def _moe_backend(*args: Any, **kwargs: Any) -> ModelBackend:
    from tandem.cloud.moe_classifier import MoEBackend  # imports torch: only when needed

    return MoEBackend(*args, **kwargs)


# Manifest `format` → backend constructor (path, name=, version=, threads=).
BACKEND_FORMATS: dict[str, Callable[..., ModelBackend]] = {
    "onnx": OnnxBackend,
    "tandem-moe": _moe_backend,
}


def load_backends(config: WorkerConfig) -> dict[str, ModelBackend]:
    """The manifest's models (or the config's subset), digests checked."""
    if config.models_dir is None:
        return {}
    manifest = load_manifest(config.models_dir)
    names = config.models if config.models is not None else [m.name for m in manifest.models]
    backends: dict[str, ModelBackend] = {}
    for name in names:
        try:
            entry = manifest.get(name)
        except KeyError:
            raise UnknownModel(
                f"model {name!r} is not in {config.models_dir}/manifest.json "
                f"(it has: {', '.join(m.name for m in manifest.models)})"
            ) from None
        path = verify_entry(config.models_dir, entry)
        opener = BACKEND_FORMATS.get(entry.format)
        if opener is None:
            raise UnknownModel(
                f"model {name!r} has format {entry.format!r}; known: {', '.join(BACKEND_FORMATS)}"
            )
        hosted = (config.experts or {}).get(name)
        extra = {"experts": hosted} if hosted is not None else {}
        backend = opener(path, name=name, version=entry.version, threads=config.threads, **extra)
        backend.warm_up()
        backends[name] = backend
    return backends


class CloudWorker:
    def __init__(
        self,
        config: WorkerConfig,
        backends: dict[str, ModelBackend] | None = None,
        *,
        context: zmq.Context | None = None,
    ) -> None:
        self.config = config
        self.backends = backends if backends is not None else load_backends(config)
        self.codec = WireCodec(config.limits.wire_limits())
        self.batcher = MicroBatcher(config.batching.max_batch, config.batching.max_wait_us / 1e6)
        self.counters: Counter[str] = Counter()
        self.endpoint: str | None = None
        self._ctx = context or zmq.Context.instance()
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
        sock.setsockopt(zmq.LINGER, 2000)
        # ZeroMQ drops a connection that sends a frame over this size; the codec answers
        # messages whose frames are each under it but together over the limit.
        sock.setsockopt(zmq.MAXMSGSIZE, self.codec.limits.max_message_bytes)
        sock.bind(self.config.bind)
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        restore = self._install_signal_handlers()
        log.info("worker listening on %s, models: %s", self.endpoint, ", ".join(self.backends))
        if ready:
            ready(self.endpoint)
        try:
            self._loop(sock)
        finally:
            for sig, handler in restore.items():
                signal.signal(sig, handler)
            sock.close()
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
        grace_until: float | None = None
        while True:
            now = time.monotonic()
            # Draining: the flush below runs every queued request; once none is left, new ones
            # are answered ShuttingDown for grace_ms, then the loop ends.
            if self.draining and grace_until is None and self.batcher.depth == 0:
                log.info("drained; refusing new work for %d ms", self.config.drain.grace_ms)
                grace_until = now + self.config.drain.grace_ms / 1e3
            if grace_until is not None and now >= grace_until:
                return
            due = self.batcher.next_due()
            timeout = (
                _IDLE_POLL_MS if due is None else max(0, min(_IDLE_POLL_MS, int((due - now) * 1e3)))
            )
            if grace_until is not None:
                timeout = min(timeout, max(0, int((grace_until - now) * 1e3)))
            if zmq.zmq_poll([(sock, _POLLIN)], timeout):
                for _ in range(_MAX_READS_PER_TURN):
                    # peer identity and envelope are copied; array frames arrive zero-copy
                    self._on_message(sock, recv_frames(sock, n_copied=2))
                    if not cast(int, sock.getsockopt(_EVENTS)) & _POLLIN:
                        break
            for model, batch in self.batcher.take_ready(time.monotonic(), flush=self.draining):
                self._run_batch(sock, model, batch)

    # ------------------------------------------------------------------ messages
    def _on_message(self, sock: zmq.Socket, frames: list[Frame]) -> None:
        # ROUTER prepends the peer identity; a REQ peer adds an empty delimiter after it.
        n_route = 2 if len(frames) > 1 and len(frames[1]) == 0 else 1
        route, body = frames[:n_route], frames[n_route:]
        try:
            env = self.codec.decode(body)
        except WireError as e:
            self.counters["wire_errors"] += 1
            log.debug("bad message: %s", e)
            rid = e.request_id or _NO_ID
            self._send(sock, route, Envelope(kind=Kind.ERROR, id=rid, payload=e.to_wire()))
            return
        self.counters[env.kind.value] += 1
        try:
            reply = self._handle(route, env)
        except TandemError as e:
            reply = env.error_reply(e)
        except Exception as e:  # never let one request take the worker down
            log.exception("internal error on %s request", env.kind.value)
            reply = env.error_reply(TandemError(f"internal error: {type(e).__name__}: {e}"))
        if reply is not None:
            self._send(sock, route, reply)

    def _handle(self, route: list[Any], env: Envelope) -> Envelope | None:
        if env.kind is Kind.HEALTH:
            return env.reply(Kind.RESULT, self.health())
        if env.kind is Kind.ECHO:
            return env.reply(Kind.RESULT, env.payload)
        if env.kind not in (Kind.INFER, Kind.EXPERTS):
            raise BadRequest(f"a worker does not accept {env.kind.value!r} messages")
        # both kinds of work: refused while draining, and never run past their deadline
        if self.draining:
            raise ShuttingDown("worker is draining; send new work elsewhere")
        if env.expired():
            raise DeadlineExceeded("deadline passed before the request reached the worker")
        if env.kind is Kind.EXPERTS:
            return env.reply(Kind.RESULT, self._run_experts(env))
        p = env.payload
        if not isinstance(p, dict) or not isinstance(p.get("model"), str):
            raise BadRequest("infer payload must be a map with a 'model' string")
        backend = self.backends.get(p["model"])
        if backend is None:
            raise UnknownModel(f"no model {p['model']!r} here; serving: {', '.join(self.backends)}")
        inputs = p.get("inputs")
        if not isinstance(inputs, np.ndarray):
            raise BadRequest("infer payload needs an 'inputs' array shaped (N, ...)")
        inputs = backend.check_batch(inputs)
        self.batcher.add(backend.name, Pending(route, env, inputs, time.monotonic()))
        return None

    def _run_experts(self, env: Envelope) -> dict[str, Any]:
        """An expert-shard request: run at once (its rows are already one batch per expert)."""
        p = env.payload
        ok = (
            isinstance(p, dict)
            and isinstance(p.get("experts"), list)
            and isinstance(p.get("counts"), list)
            and isinstance(p.get("rows"), np.ndarray)
            and all(type(v) is int for v in (*p["experts"], *p["counts"]))
        )
        if not ok:
            raise BadRequest("experts payload: {model, experts: [int], counts: [int], rows: array}")
        backend = self.backends.get(p.get("model", ""))
        run = getattr(backend, "run_experts", None)
        if run is None:
            raise UnknownModel(f"no MoE model {p.get('model')!r} here")
        self.counters["expert_rows"] += len(p["rows"])
        return {"rows": run(p["experts"], p["counts"], p["rows"]), "version": backend.version}

    def _run_batch(self, sock: zmq.Socket, model: str, batch: list[Pending]) -> None:
        now_ms = now_epoch_ms()
        live = []
        for item in batch:
            if item.env.expired(now_ms):
                self.counters["expired"] += 1
                err = DeadlineExceeded("deadline passed while queued")
                self._send(sock, item.route, item.env.error_reply(err))
            else:
                live.append(item)
        if not live:
            return
        backend = self.backends[model]
        started = time.monotonic()
        try:
            x = live[0].inputs if len(live) == 1 else np.concatenate([i.inputs for i in live])
            out = backend.predict(x)
        except TandemError as e:
            for item in live:
                self._send(sock, item.route, item.env.error_reply(e))
            return
        run_ms = (time.monotonic() - started) * 1e3
        self.counters["batches"] += 1
        self.counters["rows"] += len(x)
        start = 0
        for item in live:
            rows = len(item.inputs)
            payload = {
                "outputs": out[start : start + rows],
                "model": model,
                "version": backend.version,
                "queue_ms": (started - item.arrived) * 1e3,
                "run_ms": run_ms,
                "batch_rows": len(x),
            }
            start += rows
            self._send(sock, item.route, item.env.reply(Kind.RESULT, payload))

    def _send(self, sock: zmq.Socket, route: list[Any], env: Envelope) -> None:
        try:
            send_frames(sock, [*route, *self.codec.encode(env)])
        except zmq.ZMQError as e:  # the peer is gone: nobody left to answer
            log.debug("reply to a departed peer dropped: %s", e)

    def health(self) -> dict[str, Any]:
        return {
            "state": "draining" if self.draining else "serving",
            "protocol": PROTOCOL_VERSION,
            "models": {
                name: {
                    "version": b.version,
                    "input": b.input_spec.model_dump(),
                    "output": b.output_spec.model_dump(),
                }
                for name, b in self.backends.items()
            },
            "queue_depth": self.batcher.depth,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "counters": dict(self.counters),
        }
