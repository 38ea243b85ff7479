"""OpenTelemetry traces for one request across edge → wire → worker → backend.

Off unless configured, and then free: every hook in the request path is one check of the
module global :data:`TRACER` (``None`` while tracing is off), the cost of a module attribute
load and a compare (``benchmarks.serving.tracing_overhead`` measures it). OpenTelemetry
(the ``otel`` extra) is imported only by :func:`configure`.

**Configuration** (:class:`TracingSpec`; the worker config's ``tracing`` key, a policy's
top-level ``tracing`` key for the edge)::

    tracing: {otlp_endpoint: "http://collector:4318/v1/traces", service_name: tandem-worker,
              sample_ratio: 1.0}

Spans go to that OTLP/HTTP endpoint through a ``BatchSpanProcessor`` (export is off the
request path); :func:`shutdown` flushes it (the worker on drain, the edge on ``close()``).
Without ``otlp_endpoint`` the standard variables are read: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
(used as is), else ``OTEL_EXPORTER_OTLP_ENDPOINT`` (+ ``/v1/traces``); the config key wins over
both. Tracing is on only where a ``tracing`` section is present (``tracing: {}`` takes the
endpoint from those variables): an environment variable alone, which operators often inject
into every pod, does not turn it on — a traced message needs a peer of this version or newer
(an older worker refuses its longer header), so tracing is a deliberate choice, made after
the workers are upgraded. ``OTEL_SDK_DISABLED=true`` turns it off. Sampling is
parent-based: a request whose caller sampled it (or not) is traced (or not) here too; a
request without a caller's context starts a trace with probability ``sample_ratio``.

**Spans**

=========================  ==========================================================
``tandem.infer``           edge, root of an ``EdgeRuntime.infer``: ``tandem.task``,
                           ``tandem.stage``, ``tandem.tier``, ``tandem.escalated``,
                           ``tandem.reason``, ``tandem.request_id``
``tandem.generate``        edge, root of a generation (until its stream ends): the same,
                           and ``tandem.tokens``, ``tandem.escalated_at``
``tandem.cloud.request``   client, one per try: ``tandem.endpoint``, ``tandem.attempt``
                           (0: the first), ``tandem.failover`` (attempt > 0),
                           ``tandem.kind``
``tandem.worker.<kind>``   worker, from arrival to answer: ``tandem.model``,
                           ``tandem.batch_rows``, ``tandem.queue_ms``, error status
``tandem.backend.run``     worker, the backend call inside it (a batch's, shared)
=========================  ==========================================================

**Across the wire** the client's span context rides in the envelope header as W3C
``traceparent`` (and ``tracestate``) strings (:class:`~tandem.runtime.wire.Envelope` ``trace``;
see :mod:`tandem.runtime.wire` for the layout and its validation). The worker records its
spans after the fact, on its loop thread, from the times it already keeps (arrival, run
start and end on ``time.monotonic()``), with the request's own context as the parent: so no
OpenTelemetry context ever has to cross the worker's threads, and an untraced request costs
the worker nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from pydantic import Field

from tandem.runtime.config import StrictModel
from tandem.runtime.errors import ConfigError, TandemError, error_from_wire

log = logging.getLogger(__name__)

# The tracer while tracing is on, else None: the one check every hook makes.
TRACER: Any = None

_lock = threading.Lock()
_provider: Any = None
_users = 0  # configure() calls not yet matched by shutdown()
_MONO_TO_EPOCH_NS = time.time_ns() - time.monotonic_ns()  # reset by configure


class TracingSpec(StrictModel):
    """Where and how to export spans. ``otlp_endpoint``: an OTLP/HTTP traces URL (None: the
    ``OTEL_EXPORTER_OTLP_*`` variables); ``service_name``: the ``service.name`` resource
    (default: ``tandem-edge`` / ``tandem-worker``, or ``OTEL_SERVICE_NAME``);
    ``sample_ratio``: the share of new traces recorded, 0 to 1."""

    otlp_endpoint: str | None = Field(default=None, pattern=r"^https?://\S+$", max_length=2048)
    service_name: str | None = Field(default=None, min_length=1, max_length=256)
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)


def resolve_endpoint(spec: TracingSpec | None) -> str | None:
    """The OTLP/HTTP traces URL to export to, or None (tracing off: no ``tracing`` section,
    or ``OTEL_SDK_DISABLED=true``). The config key wins, then
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, then ``OTEL_EXPORTER_OTLP_ENDPOINT`` +
    ``/v1/traces``."""
    if spec is None or os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if spec.otlp_endpoint:
        return spec.otlp_endpoint
    url = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if url:
        return url
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    return base.rstrip("/") + "/v1/traces" if base else None


def configure(spec: TracingSpec | None, default_service: str, *, exporter: Any = None) -> bool:
    """Turn tracing on for this process if ``spec`` or the environment asks for it (or an
    ``exporter`` is given: a span exporter of the OpenTelemetry SDK, e.g. an in-memory one);
    returns whether it is on. Calls nest: tracing stays on until as many :func:`shutdown`
    calls; the first configuration wins (a process has one tracer provider).

    Raises :class:`ConfigError` when tracing is asked for and OpenTelemetry is not installed.
    """
    global TRACER, _provider, _users, _MONO_TO_EPOCH_NS
    endpoint = resolve_endpoint(spec)
    if endpoint is None and exporter is None:
        return False
    with _lock:
        if TRACER is not None:
            _users += 1
            return True
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        except ImportError as e:
            raise ConfigError(
                f"tracing is configured but OpenTelemetry is not installed ({e}): "
                "pip install 'tandem-infer[otel]'"
            ) from None
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=endpoint)
        service = (spec.service_name if spec is not None else None) or os.environ.get(
            "OTEL_SERVICE_NAME", default_service
        )
        ratio = spec.sample_ratio if spec is not None else 1.0
        provider = TracerProvider(
            resource=Resource.create({"service.name": service}),
            sampler=ParentBased(TraceIdRatioBased(ratio)),
        )
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
        _MONO_TO_EPOCH_NS = time.time_ns() - time.monotonic_ns()
        _provider, _users = provider, 1
        TRACER = provider.get_tracer("tandem")
    log.info("tracing on: %s, service %s, sample ratio %g", endpoint or exporter, service, ratio)
    return True


def shutdown() -> None:
    """Undo one :func:`configure`; the last one flushes the spans still queued and turns
    tracing off. Safe to call when tracing is off."""
    global TRACER, _provider, _users
    with _lock:
        if TRACER is None:
            return
        _users -= 1
        if _users > 0:
            return
        provider, _provider, TRACER = _provider, None, None
    try:
        provider.shutdown()  # flushes the batch processor
    except Exception:  # an exporter failing at exit must not fail the caller's close
        log.warning("tracing: flushing spans at shutdown failed", exc_info=True)


def force_flush(timeout_ms: int = 5000) -> bool:
    """Export every finished span now (tests, benchmarks). True when done in time."""
    provider = _provider
    return True if provider is None else bool(provider.force_flush(timeout_ms))


# ---------------------------------------------------------------------- the edge
def traced_infer(infer: Any, default_task: Any = None) -> Any:
    """``infer`` (an ``EdgeRuntime.infer`` bound method) inside a ``tandem.infer`` root span
    that is current while it runs, so the client's spans are its children.
    ``default_task()``: the task a call without one runs (for the span's ``tandem.task``)."""

    def traced(x: Any, task: str | None = None, **kwargs: Any) -> Any:
        tracer = TRACER
        if tracer is None:  # shut down since
            return infer(x, task, **kwargs)
        with tracer.start_as_current_span("tandem.infer") as span:
            r = infer(x, task, **kwargs)
            if task is None and default_task is not None:
                task = default_task()
            span.set_attributes(_result_attributes(r, task))
            return r

    traced.__doc__ = infer.__doc__
    return traced


def start_generate_span(task: str, request_id: bytes) -> Any:
    """A ``tandem.generate`` root span (not current: a stream is read on any thread), or None
    when tracing is off. End it with :func:`end_generate_span`."""
    tracer = TRACER
    if tracer is None:
        return None
    return tracer.start_span(
        "tandem.generate",
        attributes={"tandem.task": task, "tandem.request_id": request_id.hex()},
    )


def end_generate_span(span: Any, result: Any) -> None:
    """End a generation's span with what its :class:`GenerationResult` says (None: it failed)."""
    if result is None:
        _error(span, "the answer ended without a result")
    else:
        tiers = [str(getattr(t, "value", t)) for t in result.tiers]
        span.set_attributes(
            {
                "tandem.tier": ",".join(tiers),
                "tandem.escalated": result.escalated_at is not None,
                "tandem.escalated_at": -1 if result.escalated_at is None else result.escalated_at,
                "tandem.reason": str(result.reason),
                "tandem.tokens": len(result.tokens),
            }
        )
    span.end()


def attach(span: Any) -> Any:
    """Make ``span`` current in this thread (for the calls it should parent); returns the
    token for :func:`detach`."""
    from opentelemetry import context, trace

    return context.attach(trace.set_span_in_context(span))


def detach(token: Any) -> None:
    from opentelemetry import context

    context.detach(token)


def current_context() -> Any:
    """This thread's OpenTelemetry context (to parent spans started later, elsewhere)."""
    from opentelemetry import context

    return context.get_current()


def _result_attributes(r: Any, task: str | None) -> dict[str, Any]:
    tier = getattr(r, "tier", None)
    attrs = {
        "tandem.stage": str(getattr(r, "stage", "")),
        "tandem.tier": str(getattr(tier, "value", tier)),
        "tandem.escalated": str(getattr(tier, "value", tier)) != "edge",  # or degraded
        "tandem.reason": str(getattr(r, "reason", "")),
        "tandem.request_id": str(getattr(r, "request_id", None) or ""),
    }
    if task is not None:
        attrs["tandem.task"] = task
    return attrs


# ---------------------------------------------------------------------- the client
def start_client_span(env: Any, endpoint: str, attempt: int, parent: Any = None) -> Any:
    """A ``tandem.cloud.request`` span for one try of ``env`` (a child of ``parent``, an
    OpenTelemetry context, or of the current one), and ``env.trace`` set to its context so
    the worker's span is its child. End it with :func:`end_span`."""
    from opentelemetry.trace import SpanKind

    span = TRACER.start_span(
        "tandem.cloud.request",
        context=parent,
        kind=SpanKind.CLIENT,
        attributes={
            "tandem.endpoint": endpoint,
            "tandem.attempt": attempt,
            "tandem.failover": attempt > 0,
            "tandem.kind": env.kind.value,
            "tandem.request_id": env.id.hex(),
        },
    )
    env.trace = wire_context(span)
    return span


def wire_context(span: Any) -> tuple[str, str] | None:
    """``(traceparent, tracestate)`` of ``span`` for the envelope header (tracestate ``""``
    when empty), or None for an invalid span context."""
    sc = span.get_span_context()
    if not sc.is_valid:
        return None
    state = sc.trace_state.to_header() if sc.trace_state else ""
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}", state


def end_span(span: Any, error: BaseException | None = None) -> None:
    if error is not None:
        _error(span, error)
    span.end()


def _error(span: Any, error: BaseException | str) -> None:
    from opentelemetry.trace import Status, StatusCode

    if isinstance(error, TandemError):
        span.set_attribute("tandem.error", error.code)
        message = error.message
    else:
        message = str(error) if isinstance(error, str) else f"{type(error).__name__}: {error}"
    span.set_status(Status(StatusCode.ERROR, message[:512]))


# ---------------------------------------------------------------------- the worker
def record_worker_span(
    env: Any,
    arrived: float,
    ended: float | None = None,
    attributes: dict[str, Any] | None = None,
    *,
    backend: tuple[float, float] | None = None,
    error: BaseException | None = None,
    reply: Any = None,
) -> None:
    """Record ``tandem.worker.<kind>`` for a request answered now, after the fact: from
    ``arrived`` to ``ended`` (``time.monotonic()`` readings; None: now), a child of the
    request's wire context (``env.trace``), and under it ``tandem.backend.run`` over
    ``backend`` (its start and end). ``error``, or ``reply`` (the answer's envelope) of kind
    ``error``: the span's status. Never raises: a tracing fault must not lose an answer."""
    tracer = TRACER
    if tracer is None:
        return
    try:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        end_ns = _epoch_ns(time.monotonic() if ended is None else ended)
        attrs = {"tandem.request_id": env.id.hex()}
        if env.task:
            attrs["tandem.task"] = env.task
        if attributes:
            attrs.update(attributes)
        span = tracer.start_span(
            f"tandem.worker.{env.kind.value}",
            context=extract(env.trace),
            kind=SpanKind.SERVER,
            start_time=_epoch_ns(arrived),
            attributes=attrs,
        )
        if backend is not None:
            run = tracer.start_span(
                "tandem.backend.run",
                context=trace.set_span_in_context(span),
                start_time=_epoch_ns(backend[0]),
                attributes={k: v for k, v in attrs.items() if k != "tandem.request_id"},
            )
            run.end(end_time=_epoch_ns(backend[1]))
        if error is None and reply is not None and reply.kind.value == "error":
            error = error_from_wire(reply.payload if isinstance(reply.payload, dict) else {})
        if error is not None:
            _error(span, error)
        span.end(end_time=end_ns)
    except Exception:
        log.debug("tracing: could not record a worker span", exc_info=True)


def extract(trace: tuple[str, str] | None) -> Any:
    """The OpenTelemetry context of a wire ``trace`` field (None: none, a new trace)."""
    if trace is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {"traceparent": trace[0]}
    if trace[1]:
        carrier["tracestate"] = trace[1]
    return TraceContextTextMapPropagator().extract(carrier)


def _epoch_ns(monotonic_s: float) -> int:
    return int(monotonic_s * 1e9) + _MONO_TO_EPOCH_NS


def current_ids() -> tuple[str, str] | None:
    """``(trace_id, span_id)`` in hex of this thread's current span, or None (tracing off, or
    no span)."""
    if TRACER is None:
        return None
    from opentelemetry import trace

    sc = trace.get_current_span().get_span_context()
    if not sc.is_valid:
        return None
    return f"{sc.trace_id:032x}", f"{sc.span_id:016x}"
