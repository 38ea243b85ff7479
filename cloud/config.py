"""The cloud worker's config file (``tandem cloud serve --config worker.yaml``).

.. code-block:: yaml

    bind: tcp://127.0.0.1:5555       # "tcp://127.0.0.1:*" picks a free port
    models_dir: models               # holds manifest.json; relative to this file
    models: [digits-cloud]           # optional subset of the manifest (default: all)
    experts: {digits-moe: [0, 1, 2, 3]}  # optional: host only these experts of an MoE model
    threads: 0                       # ONNX Runtime intra-op threads (0 = all cores)
    batching: {max_batch: 64, max_wait_us: 0}
    limits: {max_message_bytes: 17825792, max_rows: 1024, max_request_bytes: 16777216}
    queue: {max_requests: 4096, max_bytes: 268435456}
    idempotency: {max_entries: 10000, max_bytes: 67108864, ttl_s: 60}
    socket: {sndhwm: 256, rcvhwm: 256, heartbeat_ivl_ms: 1000, heartbeat_timeout_ms: 3000}
    drain: {grace_ms: 200}
    generation: {max_streams: 8, buffer_tokens: 256, max_prompt_bytes: 65536,
                 stall_timeout_ms: 30000, max_stream_s: 600, parallel: 4}
    speculative: {max_sessions: 64, max_session_bytes: 1073741824, ttl_s: 30, max_gamma: 16,
                  max_support: 4096, max_prompt_tokens: 2048}
    curve: {secret_key: keys/worker.key_secret, allowed_clients: keys/clients}  # default: off
    insecure: false                  # true: allow a non-loopback bind without curve
    tracing: {otlp_endpoint: "http://collector:4318/v1/traces", service_name: tandem-worker,
              sample_ratio: 1.0}     # OpenTelemetry; default off ({}: OTEL_EXPORTER_OTLP_*)
    admin: {enabled: false, allowed_clients: keys/admins}  # model admin messages (default: off)
    http: {bind: "127.0.0.1:9100"}    # /metrics, /health, /ready over HTTP; default: off

Every key is optional; the defaults are the values shown. Each section's class says what its
keys bound and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from tandem.runtime.config import ConfigPath, StrictModel, load_config
from tandem.runtime.errors import ConfigError
from tandem.runtime.ops_http import parse_bind
from tandem.runtime.tracing import TracingSpec
from tandem.runtime.wire import WireLimits

_DEFAULT_LIMITS = WireLimits()


class BatchingSpec(StrictModel):
    """A request that finds its model idle runs at once; requests that arrive while the model
    is busy form the next batch (up to ``max_batch`` rows), as Triton's dynamic batcher does
    with its default queue delay of 0. ``max_wait_us`` > 0 opts in to holding a batch that
    long for more rows (higher throughput under steady load, never lower latency)."""

    max_batch: int = Field(default=64, ge=1, le=65536)
    max_wait_us: int = Field(default=0, ge=0, le=10_000_000)


class LimitsSpec(StrictModel):
    """Per-message limits (the wire codec's, checked before anything is decoded) and
    per-request limits (checked before any work: a request over them gets ``BadRequest``)."""

    max_message_bytes: int = Field(default=_DEFAULT_LIMITS.max_message_bytes, ge=1024)
    max_envelope_bytes: int = Field(default=_DEFAULT_LIMITS.max_envelope_bytes, ge=1024)
    max_containers: int = Field(default=_DEFAULT_LIMITS.max_containers, ge=1)
    max_frames: int = Field(default=_DEFAULT_LIMITS.max_frames, ge=2)
    max_array_elements: int = Field(default=_DEFAULT_LIMITS.max_array_elements, ge=1)
    max_depth: int = Field(default=_DEFAULT_LIMITS.max_depth, ge=1)
    max_tags: int = Field(default=_DEFAULT_LIMITS.max_tags, ge=0)
    # One request's rows bound how long it can hold a model; its bytes bound its memory.
    max_rows: int = Field(default=1024, ge=1)
    max_request_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # An echo's reply is as big as its request: bounded apart, it is only a probe.
    max_echo_bytes: int = Field(default=2 * 1024 * 1024, ge=0)

    def wire_limits(self) -> WireLimits:
        per_request = {"max_rows", "max_request_bytes", "max_echo_bytes"}
        return WireLimits(**self.model_dump(exclude=per_request))


class QueueSpec(StrictModel):
    """Bounds on queued (admitted, not yet run) requests, per model and over all models, in
    requests and in bytes. A request that would cross one is answered ``Overloaded`` at once
    with a ``retry_after_ms`` hint; nothing is queued without bound."""

    max_requests_per_model: int = Field(default=1024, ge=1)
    max_bytes_per_model: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_requests: int = Field(default=4096, ge=1)
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)


class IdempotencySpec(StrictModel):
    """Recently answered request ids and their replies: a retry of an id (the client's
    failover, a reconnect) is answered from here instead of running again. Bounded in entries
    and bytes; an entry lives ``ttl_s``."""

    max_entries: int = Field(default=10_000, ge=0)
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    ttl_s: float = Field(default=60.0, gt=0)


class SocketSpec(StrictModel):
    """ZeroMQ options of the worker's ROUTER socket. High-water marks bound ZeroMQ's own
    queues per peer, in messages: what libzmq may hold is at most, per connected peer,
    ``rcvhwm × limits.max_message_bytes`` received and ``sndhwm ×`` the largest reply sent
    (an echo is at most ``limits.max_echo_bytes``; an infer reply ``limits.max_rows`` output
    rows). Heartbeats (ZMTP PING/PONG) find dead peers and free their queues. A reply to a
    peer whose send queue is full is not waited for: it is counted (``replies_dropped`` in
    health) and logged; the worker never blocks on one peer."""

    sndhwm: int = Field(default=256, ge=1)
    rcvhwm: int = Field(default=256, ge=1)
    heartbeat_ivl_ms: int = Field(default=1000, ge=0)  # 0: no heartbeats
    heartbeat_timeout_ms: int = Field(default=3000, ge=0)

    def configure(self, sock: Any, max_message_bytes: int) -> None:
        """Set these options, and the ones every server ROUTER socket of Tandem has (the
        worker's, the Ray ingress's), on ``sock`` before it binds."""
        import zmq

        sock.setsockopt(zmq.LINGER, 2000)
        # ZeroMQ drops a connection that sends a frame over this size; the codec answers
        # messages whose frames are each under it but together over the limit.
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        sock.setsockopt(zmq.SNDHWM, self.sndhwm)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        # A reply that cannot be routed (peer gone, its queue full) raises instead of
        # vanishing, so it is counted; sent with DONTWAIT it never blocks the server.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self.heartbeat_ivl_ms:
            sock.setsockopt(zmq.HEARTBEAT_IVL, self.heartbeat_ivl_ms)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, self.heartbeat_timeout_ms)
            sock.setsockopt(zmq.HEARTBEAT_TTL, self.heartbeat_timeout_ms)


class DrainSpec(StrictModel):
    """On SIGTERM/SIGINT: finish the queued work, then keep answering new requests with
    ``ShuttingDown`` for ``grace_ms`` so clients learn why, then exit 0."""

    grace_ms: int = Field(default=200, ge=0)


class GenerationSpec(StrictModel):
    """Streaming generation (``generate`` requests) and the engines. Each active stream holds
    a backend slot (a KV cache), so they are bounded: ``max_streams`` at once (one more is
    answered ``Overloaded`` with a retry-after hint); a stream's tokens waiting to be sent are
    at most ``buffer_tokens`` (then the model waits for the reader: backpressure); a prompt is
    at most ``max_prompt_bytes`` of UTF-8. A stream whose reader takes nothing for
    ``stall_timeout_ms`` is cancelled, and none runs longer than ``max_stream_s``, whatever
    budget it was sent with (a stream with no budget still ends).

    ``engine`` (default true): each local language model (gguf, transformers) has one engine
    thread that steps all its streams and speculative sessions together (continuous
    batching, :mod:`tandem.cloud.engine`); beside its decode rows and verify rounds a step
    holds prompt chunks of at most ``prefill_chunk`` tokens up to ``step_tokens``, and prompt
    tokens not yet run are at most ``max_queued_prefill`` per model (a ``generate`` prompt
    counts its UTF-8 bytes until tokenized). false: a thread
    per stream, decoding alone (verify rounds still run on the engine)."""

    max_streams: int = Field(default=8, ge=1, le=4096)
    buffer_tokens: int = Field(default=256, ge=1, le=1 << 16)
    max_prompt_bytes: int = Field(default=64 * 1024, ge=1, le=16 * 1024 * 1024)
    stall_timeout_ms: int = Field(default=30_000, ge=1)
    max_stream_s: float = Field(default=600.0, gt=0)
    # llama.cpp contexts per gguf model (each holds a KV cache): its concurrent streams and
    # speculative sessions together
    parallel: int = Field(default=4, ge=1, le=256)
    engine: bool = True
    step_tokens: int = Field(default=512, ge=1, le=1 << 16)
    prefill_chunk: int = Field(default=256, ge=1, le=1 << 16)
    max_queued_prefill: int = Field(default=1 << 18, ge=1)


class VerifySessionLimits(StrictModel):
    """The YAML section ``speculative``: limits on the worker's speculative-verification
    sessions (``verify`` requests), each of which keeps the cloud model's KV cache for one
    answer between the edge's rounds. At most ``max_sessions`` sessions holding
    at most ``max_session_bytes`` of KV cache together; a session idle for ``ttl_s`` is
    dropped, and when a new one does not fit, the least recently used goes (its edge
    re-sends the prefix: slower, never wrong). A request drafts at most ``max_gamma`` tokens,
    each with at most ``max_support`` draft probabilities. ``max_prompt_tokens`` — the most
    tokens one request may run besides its draft (a new session's prompt) — bounds what one
    request costs the model's engine; a longer prompt is refused (the edge then streams the
    answer with ``generate`` instead)."""

    max_sessions: int = Field(default=64, ge=1, le=4096)
    max_session_bytes: int = Field(default=1 << 30, ge=1)
    ttl_s: float = Field(default=30.0, gt=0)
    max_gamma: int = Field(default=16, ge=1, le=64)
    max_support: int = Field(default=4096, ge=1, le=1 << 20)
    max_prompt_tokens: int = Field(default=2048, ge=1, le=1 << 20)


class CurveSpec(StrictModel):
    """CurveZMQ on the worker's socket (see :mod:`tandem.runtime.curve`): every byte after the
    handshake is encrypted, and only clients whose public key is a ``*.key`` file in
    ``allowed_clients`` are served. Paths are relative to the config file."""

    secret_key: ConfigPath  # the worker's NAME.key_secret (from `tandem keys generate`)
    allowed_clients: ConfigPath  # a directory of the allowed clients' NAME.key files


class AdminSpec(StrictModel):
    """``admin`` messages (``tandem cloud models load|replace|unload|reload``, see
    :mod:`tandem.cloud.model_admin`) change what a running worker serves. Anyone who may send
    work must not be able to unload the models it runs on, so they are refused
    (``Unauthorized``) unless ``enabled``; with ``curve`` on, the sender's key must also be a
    ``*.key`` file in ``allowed_clients`` (a directory like ``curve.allowed_clients``, usually
    a smaller one: the operators', not every robot's). A SIGHUP (a reload) needs neither: who
    can signal the process owns it already."""

    enabled: bool = False
    allowed_clients: ConfigPath | None = None  # required with curve on


class HttpSpec(StrictModel):
    """The operations HTTP port beside the ZeroMQ one (:mod:`tandem.runtime.ops_http`):
    ``/metrics`` (Prometheus), ``/health`` (liveness) and ``/ready`` (every model loaded and
    warmed, serving). ``bind``: ``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (every interface;
    the metrics are unauthenticated and carry no request data). It starts before the models
    load, so a probe sees ``/ready`` 503 ``{"state": "loading"}`` meanwhile.

    ``stall_s``: once serving, the worker's loop turns at least every 50 ms when idle; when
    its last turn is older than this (a backend call that never returns holds it), ``/health``
    answers 503 ``{"status": "stalled", "loop_idle_s": ...}`` (a liveness probe restarts the
    pod) and ``/ready`` 503. Set it longer than the longest batch a model may run."""

    bind: str = "127.0.0.1:9100"
    stall_s: float = Field(default=60.0, gt=0, le=86400)

    @field_validator("bind")
    @classmethod
    def _parses(cls, v: str) -> str:
        try:
            parse_bind(v)
        except ConfigError as e:
            raise ValueError(e.message) from None
        return v


class WorkerConfig(StrictModel):
    bind: str = "tcp://127.0.0.1:5555"
    models_dir: ConfigPath | None = None  # None: no models (health and echo only)
    models: list[str] | None = None
    # Expert sharding: for an MoE model, the experts this worker hosts (default: all of them).
    experts: dict[str, list[int]] | None = None
    threads: int = Field(default=0, ge=0)
    batching: BatchingSpec = BatchingSpec()
    limits: LimitsSpec = LimitsSpec()
    queue: QueueSpec = QueueSpec()
    idempotency: IdempotencySpec = IdempotencySpec()
    socket: SocketSpec = SocketSpec()
    drain: DrainSpec = DrainSpec()
    generation: GenerationSpec = GenerationSpec()
    speculative: VerifySessionLimits = VerifySessionLimits()
    curve: CurveSpec | None = None
    # A bind that other hosts can reach needs curve, or this set (`--insecure`) on purpose.
    insecure: bool = False
    admin: AdminSpec = AdminSpec()
    # OpenTelemetry export (tandem.runtime.tracing); None: off ({}: the OTEL_EXPORTER_OTLP_* endpoint)
    tracing: TracingSpec | None = None
    # /metrics, /health, /ready over HTTP (tandem.runtime.ops_http); None: no server, no metrics
    http: HttpSpec | None = None

    @model_validator(mode="after")
    def _one_prompt_fits_the_queue(self) -> WorkerConfig:
        gen, spec = self.generation, self.speculative
        for key, size in (
            ("generation.max_prompt_bytes", gen.max_prompt_bytes),
            ("speculative.max_prompt_tokens", spec.max_prompt_tokens),
        ):
            if size > gen.max_queued_prefill:
                raise ValueError(
                    f"generation.max_queued_prefill ({gen.max_queued_prefill}) must be at least "
                    f"{key} ({size}): a prompt that size could never be queued"
                )
        return self


def with_http(config: WorkerConfig, bind: str) -> WorkerConfig:
    """``config`` with its ops HTTP server on ``bind`` (``tandem cloud serve --http``).
    Raises ConfigError if ``bind`` is not ``HOST:PORT``."""
    parse_bind(bind)
    return config.model_copy(update={"http": HttpSpec(bind=bind)})


def load_worker_config(path: str | Path) -> WorkerConfig:
    p = Path(path)
    return load_config(p, WorkerConfig, base_dir=p.parent)
