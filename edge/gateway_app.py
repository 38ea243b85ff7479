"""The gateway's ASGI app: the endpoints, a request's path from its body to its answer, and
the streams (see :mod:`tandem.edge.gateway` for the HTTP API).

A generation request is read and parsed (:mod:`~tandem.edge.gateway_requests`), waits for a
slot (:class:`~tandem.edge.gateway_admission.AdmissionQueue`), then its answer is pulled from
the runtime chunk by chunk in worker threads, so the event loop never blocks and a client that
goes away (disconnects, or stops reading a stream for ``write_timeout_s``) has its
generation closed at the next chunk and its slot given back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tandem.edge.gateway_admission import AdmissionQueue
from tandem.edge.gateway_errors import APIError, api_error
from tandem.edge.gateway_metrics import (
    GatewayCollector,
    HttpCounters,
    HttpMetricsMiddleware,
    encode,
    gateway_registry,
)
from tandem.edge.gateway_requests import MAX_BODY_BYTES, GatewayCall, parse_call, read_json
from tandem.edge.gateway_responses import (
    answer_body,
    chunk_event,
    dumps,
    finite,
    last_chunk,
    token_pieces,
    usage_chunk,
)
from tandem.router.policy import GenerateTaskPolicy
from tandem.runtime.errors import ConfigError

if TYPE_CHECKING:
    from tandem.edge.answer_streams import AnswerStream
    from tandem.edge.runtime import EdgeRuntime

log = logging.getLogger("tandem.edge.gateway")
T = TypeVar("T")

MAX_CONCURRENT = 8  # generations in flight; more wait in the queue
MAX_QUEUED = 64  # requests waiting for a generation slot; one more is refused with 429
QUEUE_TIMEOUT_S = 30.0  # a request that waited this long for a slot is refused with 429
WRITE_TIMEOUT_S = 30.0  # a stream whose client takes nothing this long is closed


@dataclass(frozen=True)
class GatewayLimits:
    """The gateway's bounds, in one place (``Gateway``, ``create_app``, ``serve`` and
    ``tandem gateway`` all take them). ``max_concurrent``: generations at once.
    ``max_queued``: requests past that which wait for a slot, first come first served (0:
    refuse at once). ``queue_timeout_s``: the longest one waits; a full queue or a wait past
    it is 429 with ``Retry-After``. ``max_body_bytes``: a larger body is 413.
    ``write_timeout_s``: a stream whose client takes no event for this long is closed and its
    slot given back."""

    max_concurrent: int = MAX_CONCURRENT
    max_body_bytes: int = MAX_BODY_BYTES
    max_queued: int = MAX_QUEUED
    queue_timeout_s: float = QUEUE_TIMEOUT_S
    write_timeout_s: float = WRITE_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.max_concurrent < 1 or self.max_body_bytes < 1:
            raise ConfigError("max_concurrent and max_body_bytes must be at least 1")
        if not self.write_timeout_s > 0:
            raise ConfigError(f"write_timeout_s must be over 0 (got {self.write_timeout_s})")
        if self.max_queued < 0 or not self.queue_timeout_s >= 0:
            raise ConfigError(
                "the gateway's queue needs max_queued >= 0 and a wait limit >= 0 s "
                f"(got {self.max_queued}, {self.queue_timeout_s})"
            )


_END = object()
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class _ClientGone(Exception):
    """The client went away (or stopped reading) before its answer was written."""


class Gateway:
    """The endpoints' state: the runtime, its generation tasks, the admission queue.
    ``active`` (generations running), ``queued`` (requests waiting for a slot), ``served``,
    ``cancelled`` (generations closed before their end: the client went away or stopped
    reading) and ``errors`` (500s and errors after a stream started) are for monitoring.
    The limits are :func:`create_app`'s."""

    def __init__(
        self, runtime: EdgeRuntime, limits: GatewayLimits | None = None, **kw: Any
    ) -> None:
        """``limits``, or its fields as keywords (see :class:`GatewayLimits`)."""
        self.limits = limits = limits or GatewayLimits(**kw)
        self.runtime = runtime
        self.tasks = {
            name: tp
            for name, tp in runtime.policy.tasks.items()
            if isinstance(tp, GenerateTaskPolicy)
        }
        if not self.tasks:
            raise ConfigError("the policy has no 'kind: generate' task: nothing to serve")
        self.max_concurrent, self.max_body_bytes = limits.max_concurrent, limits.max_body_bytes
        self.write_timeout_s = limits.write_timeout_s
        self.admission = AdmissionQueue(
            limits.max_concurrent, limits.max_queued, limits.queue_timeout_s
        )
        self.served = self.cancelled = self.errors = 0
        self.created = int(time.time())
        self._limiter: anyio.CapacityLimiter | None = None
        self.http = HttpCounters()  # requests by route and status (HttpMetricsMiddleware)
        self.registry = gateway_registry(
            lambda: self.runtime.metrics_registry, GatewayCollector(self.http, self._counts)
        )

    def _counts(self) -> dict[str, int]:
        return {
            "active": self.active,
            "queued": self.queued,
            "served": self.served,
            "cancelled": self.cancelled,
            "error": self.errors,
        }

    @property
    def active(self) -> int:
        return self.admission.active

    @property
    def queued(self) -> int:
        return self.admission.queued

    async def _thread(self, fn: Any, *args: Any) -> Any:
        if self._limiter is None:  # made here: it belongs to the server's event loop
            self._limiter = anyio.CapacityLimiter(self.max_concurrent)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # ------------------------------------------------------------------ endpoints
    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model(t) for t in self.tasks]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in self.tasks:
            return APIError(
                404, f"the model {name!r} does not exist", param="model", code="model_not_found"
            ).response()
        return JSONResponse(self._model(name))

    def _model(self, name: str) -> dict[str, Any]:
        tp = self.tasks[name]
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "tandem",
            "tandem": {
                "mode": tp.mode.value,
                "cloud": tp.cloud is not None,
                "max_tokens": tp.max_tokens,
                "deadline_ms": tp.deadline_ms,
            },
        }

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "active": self.active, "queued": self.queued})

    async def ready(self, request: Request) -> Response:
        """200 once every task's model is loaded and warmed, else 503 (same JSON)."""
        ok, body = self.runtime.ready()
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        """The runtime's ``tandem_edge_…`` metrics and the gateway's ``tandem_gateway_…``."""
        body, content_type = await anyio.to_thread.run_sync(
            encode, self.registry, request.headers.get("accept", "")
        )
        return Response(body, headers={"content-type": content_type})

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    # ------------------------------------------------------------------ a request's path
    async def _serve(self, request: Request, *, chat: bool) -> Response:
        try:
            body = await read_json(request, self.max_body_bytes)
            call = parse_call(body, chat=chat, tasks=self.tasks)
            await _while_connected(request.receive, self.admission.enter)
            handed_off = False
            try:
                stream = self._start(call)
                if call.stream:
                    response: Response = await self._start_stream(call, stream)
                    handed_off = True  # the stream gives the slot back when it ends
                else:
                    response = await self._complete(request, call, stream)
            finally:
                if not handed_off:
                    self.admission.leave()
            return response
        except _ClientGone:  # nobody to answer
            return APIError(400, "the client went away before its answer was ready").response()
        except Exception as e:
            err = api_error(e)
            if err.status >= 500:
                self.errors += 1
                log.exception("gateway: %s failed", request.url.path)
            return err.response()

    def _start(self, call: GatewayCall) -> AnswerStream:
        if call.messages is None:
            started = self.runtime.generate(call.prompt, call.task, stream=True, **call.kwargs)
        else:
            started = self.runtime.chat(call.messages, call.task, stream=True, **call.kwargs)
        return cast("AnswerStream", started)

    async def _complete(
        self, request: Request, call: GatewayCall, stream: AnswerStream
    ) -> Response:
        """A non-streamed answer, collected chunk by chunk; a client that disconnects
        meanwhile has its generation closed at the next chunk (:class:`_ClientGone`)."""

        async def collect() -> list[str]:
            pieces: list[str] = []
            while (chunk := await self._thread(next, stream, _END)) is not _END:
                if chunk.restart:
                    pieces = []
                pieces += token_pieces(chunk)
            return pieces

        try:
            pieces = await _while_connected(request.receive, collect)
        except _ClientGone:
            self.cancelled += 1
            log.info("gateway: %s: client gone, generation closed", call.id)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self._thread(stream.close)
        result = stream.result
        assert result is not None
        self.served += 1
        return JSONResponse(finite(answer_body(call, result, pieces)))

    async def _start_stream(self, call: GatewayCall, stream: AnswerStream) -> Response:
        """The first chunk is waited for here, so an error before it (a prompt the model
        cannot take, an overloaded backend) is an HTTP status, not an event."""
        try:
            first = await self._thread(next, stream, _END)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._thread(stream.close)
            raise
        return cast(Response, _EventStream(self, call, stream, first))


class _EventStream:
    """The ASGI response of a streaming request: Server-Sent Events from a
    :class:`AnswerStream`, each chunk pulled in a worker thread, while the client is
    watched: if it disconnects, or takes no event for ``write_timeout_s``, the stream is
    closed (generation stops) and the slot given back."""

    def __init__(self, gw: Gateway, call: GatewayCall, stream: AnswerStream, first: Any):
        self.gw, self.call, self.stream, self.first = gw, call, stream, first
        self.finished = False  # the last event was sent (the answer's end, or an error)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        why = "client gone"
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            await _while_connected(receive, lambda: self._pump(send))
        except (_ClientGone, OSError) as e:  # OSError: the connection broke under us
            why = str(e) or why
        finally:
            with anyio.CancelScope(shield=True):
                if not self.finished:
                    self.gw.cancelled += 1
                    log.info("gateway: %s: %s, generation closed", self.call.id, why)
                await self.gw._thread(self.stream.close)
                self.gw.admission.leave()

    async def _send(self, send: Send, data: Any) -> None:
        payload = data if isinstance(data, bytes) else dumps(data)
        msg = b"data: " + payload + b"\n\n"
        try:
            # a client that stops reading must not hold a slot (and the model) for ever
            with anyio.fail_after(self.gw.write_timeout_s):
                await send({"type": "http.response.body", "body": msg, "more_body": True})
        except TimeoutError:
            t = self.gw.write_timeout_s
            raise _ClientGone(f"client took nothing for {t:g} s") from None
        except OSError as e:
            raise _ClientGone(f"connection broken: {e}") from None

    async def _pump(self, send: Send) -> None:
        gw, call = self.gw, self.call
        try:
            chunk = self.first
            while chunk is not _END:
                await self._send(send, chunk_event(call, chunk))
                chunk = await gw._thread(next, self.stream, _END)
            result = self.stream.result
            assert result is not None
            await self._send(send, last_chunk(call, result))
            if call.include_usage:
                await self._send(send, usage_chunk(call, result))
            gw.served += 1
        except _ClientGone:  # nobody to tell
            raise
        except Exception as e:  # after the headers: the error is the last event
            err = api_error(e)
            gw.errors += 1
            log.warning("gateway: %s: error mid-stream: %s", call.id, err.message, exc_info=True)
            await self._send(send, err.body())
        self.finished = True
        await self._send(send, b"[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _while_connected(receive: Receive, work: Callable[[], Awaitable[T]]) -> T:
    """``await work()`` while watching the client: if it disconnects first, ``work`` is
    cancelled and :class:`_ClientGone` raised. ``work``'s own exception comes out as itself,
    not in the ``ExceptionGroup`` anyio 4's task group wraps it in."""
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_disconnect, receive, tg.cancel_scope)
            result = await work()
            tg.cancel_scope.cancel()
            return result
    except ExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    raise _ClientGone("client gone")


async def _watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    return APIError(status, str(getattr(exc, "detail", "")) or "error").response()


def create_app(runtime: EdgeRuntime, limits: GatewayLimits | None = None, **kw: Any) -> Starlette:
    """The gateway as a Starlette (ASGI) app serving ``runtime``'s generation tasks; the
    :class:`Gateway` (counters) is ``app.state.gateway``. The caller owns ``runtime``.
    ``GET /metrics`` turns the runtime's metrics on at its first scrape if they were off
    (``EdgeRuntime(metrics=True)``, or :func:`~tandem.edge.gateway.serve`, records from the
    start); ``GET /ready`` is :meth:`EdgeRuntime.ready` (503 while not ready).
    ``limits``, or its fields as keywords: :class:`GatewayLimits`."""
    gw = Gateway(runtime, limits, **kw)
    app = Starlette(
        routes=[
            Route("/v1/models", gw.models, methods=["GET"]),
            Route("/v1/models/{model:path}", gw.model, methods=["GET"]),
            Route("/v1/completions", gw.completions, methods=["POST"]),
            Route("/v1/chat/completions", gw.chat_completions, methods=["POST"]),
            Route("/health", gw.health, methods=["GET"]),
            Route("/ready", gw.ready, methods=["GET"]),
            Route("/metrics", gw.metrics, methods=["GET"]),
        ],
        middleware=[Middleware(HttpMetricsMiddleware, counters=gw.http)],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.gateway = gw
    return app
