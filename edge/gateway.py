"""An OpenAI-compatible HTTP gateway in front of :class:`~tandem.edge.EdgeRuntime`, so any
process on the robot (a C++ ROS node, ``curl``) uses Tandem without Python.

.. code-block:: console

    $ tandem gateway --policy policy.yaml --port 8000
    $ curl -N localhost:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"model": "sort", "prompt": "sort: cab =", "max_tokens": 8, "stream": true}'

In Python: ``serve("policy.yaml", port=8000)``, or ``create_app(runtime)`` for any ASGI server.

**Endpoints.** ``GET /v1/models``: each ``kind: generate`` task of the policy is a model (the
task's name is a request's ``model``); ``GET /v1/models/{task}``; ``GET /health``.
``POST /v1/completions`` and ``POST /v1/chat/completions``: OpenAI's request and response
shapes; ``stream: true`` answers with Server-Sent Events (``data: {...}\\n\\n`` per chunk in
OpenAI's chunk format, then ``data: [DONE]\\n\\n``).

**Parameters.** ``max_tokens`` (chat: also ``max_completion_tokens``; default: the task's),
``temperature`` (0..2; default **0**, greedy, as in :meth:`EdgeRuntime.generate` — OpenAI's is
1), ``top_p`` (default 1), ``seed``, ``stop`` (a string or a list; default: the task's),
``logprobs`` (completions: 0..5; chat: ``logprobs: true``, ``top_logprobs`` 0..20),
``stream_options: {include_usage: true}``. Unknown fields are ignored, as OpenAI does; known
ones Tandem cannot honour (``n`` > 1, ``best_of``, ``echo``, ``suffix``, penalties,
``logit_bias``, ``tools``, ``functions``, a ``response_format`` other than text) are refused
with 400 rather than silently dropped. A ``top_logprobs`` entry holds the sampled token only:
the runtime keeps no alternatives. ``usage.prompt_tokens`` counts the edge model's tokens
(null where its backend cannot tokenize); ``completion_tokens`` the answer's tokens, whichever
tier produced them.

**Chat is rendered by the model's own template.** ``/v1/chat/completions`` hands the messages
to :meth:`EdgeRuntime.chat`: the edge model renders them with its chat template (the GGUF's
``tokenizer.chat_template``, the Hugging Face tokenizer's, or the policy's
``local.chat_template``), and an escalation sends the messages, which the cloud model renders
with its own. ``usage.prompt_tokens`` is the edge's rendering's length. A model without a
template (Tandem's reference models, trained on raw prompts) gets the messages' text contents
concatenated. Text parts of a ``content`` list are joined (:func:`chat_messages`).

**Tandem's extension.** Request: ``"tandem": {"tags": ["private"], "deadline_ms": 200}``
(routing tags for the policy's rules; the cloud's budget in ms, default the task's). Response:
``"tandem": {"tier", "tiers", "confidence", "reason", "request_id", "timings_ms",
"escalated_at", "model_versions", "finish_reason"}``: ``tier`` is ``edge-degraded`` when the
cloud was wanted but failed, else the tier that produced the answer's last tokens; ``tiers``
all tiers used, in order; ``confidence`` the gate's score (null when a rule decided);
``request_id`` the escalation log's key (null when never escalated); ``timings_ms`` the
runtime's ``ttft``, ``total``, ``local`` and ``cloud`` (ms). Each stream chunk carries
``{"tier": the tier of that chunk's text, "restart": bool}`` (and in ``mode: speculative``
``"drafted"``: per token, whether the edge drafted it), and the last (the one with
``finish_reason``) the whole answer's fields (``speculation``: rounds, drafted and accepted
tokens, γ per round; null outside speculative decoding). A chunk with ``restart: true`` withdraws all
text streamed before it (a ``midstream`` hand-off with ``handoff: restart``); a plain OpenAI
client that concatenates deltas shows both.

**Errors** are OpenAI's ``{"error": {"message", "type", "param", "code"}}``: 400 bad JSON or
parameters, or a prompt the model cannot take (:class:`~tandem.runtime.errors.BadRequest`);
404 unknown model (``model_not_found``); 413 a body over ``max_body_bytes`` (checked while
reading, before parsing); 429 over ``max_concurrent`` generations or an overloaded backend
(with ``Retry-After``); 500 anything else, with a message, never a traceback. An error after a
stream has started is sent as a last event ``data: {"error": {...}}``, then ``data: [DONE]``.

**Threads.** Generation runs in worker threads, at most ``max_concurrent`` at once (one more is
refused with 429, not queued), so the event loop never blocks. A client that disconnects
mid-stream has its :class:`~tandem.edge.generation.GenerationStream` closed: local decoding
and the cloud's stream stop at the next token. A non-streaming request runs to its end.
"""

from __future__ import annotations

import json
import logging
import math
import re
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, cast

try:
    import anyio
    import anyio.to_thread
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
    from starlette.types import Receive, Scope, Send
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the Tandem gateway needs starlette and uvicorn ({e.name} is missing): "
        "pip install starlette uvicorn"
    ) from e
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from tandem.edge.generation import GenerationStream
from tandem.edge.runtime import EdgeRuntime
from tandem.router.policy import GenerateTaskPolicy, Policy
from tandem.runtime.errors import BadRequest, ConfigError, OverloadedError, TandemError
from tandem.runtime.types import GenerationChunk, GenerationResult, Tier

log = logging.getLogger(__name__)
WRITE_TIMEOUT_S = 30.0  # a stream whose client takes nothing this long is closed

MAX_BODY_BYTES = 1 << 20  # a request body over this is refused (413) before it is parsed
MAX_DRAIN_BYTES = 64 << 20  # of an oversized body, read (and drop) at most this much, so the
# client sees the 413 instead of a connection reset
MAX_CONCURRENT = 8  # generations in flight; one more is refused with 429
MAX_TAGS, MAX_TAG_CHARS = 16, 64
_END = object()
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


# ---------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.retry_after_s = param, code, retry_after_s

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        headers = {} if self.retry_after_s is None else {"retry-after": str(self.retry_after_s)}
        return JSONResponse(self.body(), self.status, headers=headers)


_PARAMS = ("max_tokens", "temperature", "top_p", "seed", "stop", "prompt", "messages")


def api_error(e: BaseException) -> APIError:
    """The HTTP error an exception from parsing or generation becomes."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, BadRequest):
        m = re.match(r"(\w+)", e.message)
        param = m.group(1) if m and m.group(1) in _PARAMS else None
        return APIError(400, e.message, param=param, code=e.code)
    if isinstance(e, OverloadedError):
        retry = max(1, math.ceil((e.retry_after_ms or 0.0) / 1e3))
        msg = e.message or "overloaded"
        return APIError(429, msg, type="rate_limit_error", code=e.code, retry_after_s=retry)
    if isinstance(e, TandemError):
        return APIError(500, e.message or e.code, type="server_error", code=e.code)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")


def _validation_error(e: ValidationError) -> APIError:
    errors = e.errors()
    where = [".".join(str(x) for x in err["loc"]) for err in errors]
    msg = "; ".join(f"{w}: {err['msg']}" for w, err in list(zip(where, errors, strict=True))[:3])
    return APIError(400, msg, param=str(errors[0]["loc"][0]) if errors[0]["loc"] else None)


# ---------------------------------------------------------------------------------- requests
class TandemOptions(BaseModel):
    """The request's ``tandem`` field."""

    model_config = ConfigDict(extra="forbid", strict=True)
    tags: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_TAG_CHARS)]] = Field(
        default_factory=list, max_length=MAX_TAGS
    )
    deadline_ms: float | None = Field(default=None, gt=0, le=3_600_000)


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool | None = None


class _Body(BaseModel):
    """What both endpoints take (``prompt`` and ``messages`` are checked by hand: clearer
    errors than a union's)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=(1 << 63) - 1)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    tandem: TandemOptions | None = None


class _CompletionBody(_Body):
    logprobs: int | None = Field(default=None, ge=0, le=5)


class _ChatBody(_Body):
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


# fields OpenAI defines that Tandem cannot honour: refused unless null or one of these values
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "functions": ([],),
    "response_format": ({"type": "text"},),
}
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def chat_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI's messages as ``{role, content[, name]}`` string maps for
    :meth:`EdgeRuntime.chat`. ``content`` may be a string, a list of
    ``{"type": "text", "text": ...}`` parts (joined), or null. Raises :class:`BadRequest`."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: expected a non-empty list of messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise BadRequest(f"messages[{i}]: expected an object with a role in {sorted(_ROLES)}")
        message = {"role": m["role"]}
        if isinstance(m.get("name"), str):
            message["name"] = m["name"]
        out.append(message)
        content = m.get("content")
        if content is None or isinstance(content, str):
            message["content"] = content or ""
            continue
        if not isinstance(content, list):
            raise BadRequest(f"messages[{i}].content: expected a string or a list of parts")
        for j, part in enumerate(content):
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise BadRequest(
                    f"messages[{i}].content[{j}]: only text parts are supported "
                    '({"type": "text", "text": ...})'
                )
        message["content"] = "".join(part["text"] for part in content)
    return out


def _completion_prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raise BadRequest(f"prompt: one prompt per request, got a list of {len(prompt)}")
    if not isinstance(prompt, str):
        raise BadRequest("prompt: expected a string (or a list of one string)")
    return prompt


@dataclass
class _Call:
    """One request, parsed: what to generate and how to answer it."""

    id: str
    created: int
    chat: bool
    task: str
    prompt: str
    messages: list[dict[str, str]] | None  # a chat: rendered by each tier's own template
    kwargs: dict[str, Any]
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: not asked; else the top_logprobs entries wanted (0: none)
    offset: int = 0  # the answer's characters so far (completions' text_offset)
    role_sent: bool = False  # a chat stream's first delta carries the role


# ---------------------------------------------------------------------------------- the gateway
class Gateway:
    """The endpoints' state: the runtime, its generation tasks, the in-flight count.
    ``active``, ``served``, ``cancelled`` (streams closed before their end) and ``errors``
    (500s and errors after a stream started) are counters for monitoring."""

    def __init__(
        self,
        runtime: EdgeRuntime,
        *,
        max_concurrent: int = MAX_CONCURRENT,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.runtime = runtime
        self.tasks = {
            name: tp
            for name, tp in runtime.policy.tasks.items()
            if isinstance(tp, GenerateTaskPolicy)
        }
        if not self.tasks:
            raise ConfigError("the policy has no 'kind: generate' task: nothing to serve")
        if max_concurrent < 1 or max_body_bytes < 1:
            raise ConfigError("max_concurrent and max_body_bytes must be at least 1")
        self.max_concurrent, self.max_body_bytes = max_concurrent, max_body_bytes
        self.active = self.served = self.cancelled = self.errors = 0
        self.created = int(time.time())
        self._limiter: anyio.CapacityLimiter | None = None

    # ------------------------------------------------------------------ plumbing
    async def _thread(self, fn: Any, *args: Any) -> Any:
        if self._limiter is None:  # made here: it belongs to the server's event loop
            self._limiter = anyio.CapacityLimiter(self.max_concurrent)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _pieces(self, task: str, chunk: GenerationChunk) -> list[str]:
        """Each token's text in ``chunk``: the edge's chunks say; a cloud chunk of several
        tokens carries only their joined text, which then goes on its first token."""
        n = len(chunk.tokens)
        if chunk.token_texts is not None and len(chunk.token_texts) == n:
            return list(chunk.token_texts)
        return [chunk.text] + [""] * (n - 1) if n else []

    async def _read_json(self, request: Request) -> Any:
        limit = self.max_body_bytes
        too_large = APIError(
            413, f"the request body is over {limit} bytes", code="request_too_large"
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._drain(request, 0)
            raise too_large
        body = bytearray()
        try:
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    await self._drain(request, len(body))
                    raise too_large
        except ClientDisconnect:  # nobody to answer: not a server error
            raise APIError(400, "the client went away while sending its request") from None
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None

    async def _drain(self, request: Request, seen: int) -> None:
        try:
            async for part in request.stream():
                seen += len(part)
                if seen > MAX_DRAIN_BYTES:
                    return
        except Exception:  # the client went away: nothing to answer
            return

    def _parse(self, body: Any, chat: bool) -> _Call:
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        for name, allowed in _UNSUPPORTED.items():
            v = body.get(name)
            if v is not None and v not in allowed:
                raise APIError(
                    400, f"{name}={v!r} is not supported by the Tandem gateway", param=name
                )
        try:
            req = (_ChatBody if chat else _CompletionBody).model_validate(body)
        except ValidationError as e:
            raise _validation_error(e) from None
        if req.model not in self.tasks:
            raise APIError(
                404,
                f"the model {req.model!r} does not exist; this gateway serves: "
                + ", ".join(self.tasks),
                param="model",
                code="model_not_found",
            )
        max_tokens = req.max_tokens
        if isinstance(req, _ChatBody):
            prompt, messages = "", chat_messages(body.get("messages"))
            if req.top_logprobs is not None and not req.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
            max_tokens = req.max_completion_tokens or max_tokens
        else:
            assert isinstance(req, _CompletionBody)
            prompt, messages = _completion_prompt(body.get("prompt")), None
            logprobs = req.logprobs
        ext = req.tandem or TandemOptions()
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        return _Call(
            id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            created=int(time.time()),
            chat=chat,
            task=req.model,
            prompt=prompt,
            messages=messages,
            kwargs={
                "max_tokens": max_tokens,
                "temperature": 0.0 if req.temperature is None else req.temperature,
                "top_p": 1.0 if req.top_p is None else req.top_p,
                "seed": req.seed,
                "stop": stop,
                "tags": frozenset(ext.tags),
                "deadline_ms": ext.deadline_ms,
            },
            stream=bool(req.stream),
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            logprobs=logprobs,
        )

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
        return JSONResponse({"status": "ok", "active": self.active})

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, *, chat: bool) -> Response:
        handed_off = False
        try:
            call = self._parse(await self._read_json(request), chat)
            if self.active >= self.max_concurrent:
                raise APIError(
                    429,
                    f"the gateway is serving {self.max_concurrent} generations already",
                    type="rate_limit_error",
                    code="overloaded",
                    retry_after_s=1,
                )
            self.active += 1
            try:
                if call.messages is None:
                    started = self.runtime.generate(
                        call.prompt, call.task, stream=True, **call.kwargs
                    )
                else:
                    started = self.runtime.chat(
                        call.messages, call.task, stream=True, **call.kwargs
                    )
                stream = cast(GenerationStream, started)
                if call.stream:
                    response: Response = await self._start_stream(call, stream)
                    handed_off = True
                else:
                    response = await self._complete(call, stream)
            finally:
                if not handed_off:
                    self.active -= 1
            return response
        except Exception as e:
            err = api_error(e)
            if err.status >= 500:
                self.errors += 1
                log.exception("gateway: %s failed", request.url.path)
            return err.response()

    async def _complete(self, call: _Call, stream: GenerationStream) -> Response:
        result, pieces = await self._thread(self._collect, call, stream)
        self.served += 1
        return JSONResponse(_finite(self._answer(call, result, pieces)))

    def _collect(self, call: _Call, stream: GenerationStream) -> tuple[GenerationResult, list[str]]:
        pieces: list[str] = []
        with stream:
            for chunk in stream:
                if chunk.restart:
                    pieces = []
                pieces += self._pieces(call.task, chunk)
        assert stream.result is not None
        return stream.result, pieces

    async def _start_stream(self, call: _Call, stream: GenerationStream) -> Response:
        """The first chunk is waited for here, so an error before it (a prompt the model
        cannot take, an overloaded backend) is an HTTP status, not an event."""
        try:
            first = await self._thread(self._first, call, stream)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._thread(stream.close)
            raise
        return _EventStream(self, call, stream, first)

    def _first(self, call: _Call, stream: GenerationStream) -> Any:
        return next(stream, _END)

    # ------------------------------------------------------------------ response bodies
    def _answer(self, call: _Call, result: GenerationResult, pieces: list[str]) -> dict[str, Any]:
        lp = None
        if call.logprobs is not None:
            lp = self._logprobs(call, pieces, result.logprobs)
        choice: dict[str, Any] = {"index": 0, "logprobs": lp, "finish_reason": _finish(result)}
        if call.chat:
            choice["message"] = {"role": "assistant", "content": result.text, "refusal": None}
        else:
            choice["text"] = result.text
        return {
            **self._head(call, "chat.completion" if call.chat else "text_completion"),
            "choices": [choice],
            "usage": _usage(call, result),
            "tandem": _extension(result),
        }

    def _head(self, call: _Call, obj: str) -> dict[str, Any]:
        return {"id": call.id, "object": obj, "created": call.created, "model": call.task}

    def _chunk(
        self,
        call: _Call,
        text: str | None,
        logprobs: dict[str, Any] | None,
        finish_reason: str | None,
        tandem: dict[str, Any],
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if call.chat:
            delta: dict[str, Any] = {}
            if text is not None:
                delta = (
                    {"content": text} if call.role_sent else {"role": "assistant", "content": text}
                )
                call.role_sent = True
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish_reason
        return {**self._head(call, _obj(call)), "choices": [choice], "tandem": tandem}

    def _chunk_event(self, call: _Call, chunk: GenerationChunk) -> dict[str, Any]:
        if chunk.restart:
            call.offset = 0
        lp = None
        if call.logprobs is not None:
            lp = self._logprobs(call, self._pieces(call.task, chunk), chunk.logprobs)
        ext: dict[str, Any] = {"tier": chunk.tier.value, "restart": chunk.restart}
        if chunk.drafted is not None:
            ext["drafted"] = chunk.drafted
        body = self._chunk(call, chunk.text, lp, None, ext)
        call.offset += len(chunk.text)
        return body

    def _logprobs(self, call: _Call, pieces: list[str], lps: list[float]) -> dict[str, Any]:
        """OpenAI's ``logprobs`` for these tokens: the legacy shape for completions (with
        ``text_offset`` counted from the prompt's start, as OpenAI does), ``content`` for
        chat. Unknown log-probs (NaN) are null."""
        top = call.logprobs or 0
        values = [_num(x) for x in lps]
        if call.chat:
            entries = []
            for p, x in zip(pieces, values, strict=True):
                entry = {"token": p, "logprob": x, "bytes": list(p.encode())}
                entries.append({**entry, "top_logprobs": [entry] if top else []})
            return {"content": entries, "refusal": None}
        offsets, at = [], len(call.prompt) + call.offset
        for p in pieces:
            offsets.append(at)
            at += len(p)
        return {
            "tokens": pieces,
            "token_logprobs": values,
            "top_logprobs": [{p: x} for p, x in zip(pieces, values, strict=True)] if top else None,
            "text_offset": offsets,
        }


class _EventStream:
    """The ASGI response of a streaming request: Server-Sent Events from a
    :class:`GenerationStream`, each chunk pulled in a worker thread, while a second task
    watches for the client's disconnect (then the stream is closed: generation stops)."""

    def __init__(self, gw: Gateway, call: _Call, stream: GenerationStream, first: Any) -> None:
        self.gw, self.call, self.stream, self.first = gw, call, stream, first
        self.finished = False  # the last event was sent (the answer's end, or an error)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_disconnect, receive, tg.cancel_scope)
                await self._pump(send)
                tg.cancel_scope.cancel()
        except OSError:  # the connection broke under us: same as a disconnect
            pass
        finally:
            with anyio.CancelScope(shield=True):
                if not self.finished:
                    self.gw.cancelled += 1
                    log.info("gateway: %s: client gone, generation closed", self.call.id)
                await self.gw._thread(self.stream.close)
                self.gw.active -= 1

    async def _pump(self, send: Send) -> None:
        gw, call = self.gw, self.call

        async def event(data: Any) -> None:
            payload = data if isinstance(data, bytes) else _dumps(data)
            msg = b"data: " + payload + b"\n\n"
            # a client that stops reading must not hold a slot (and the model) for ever
            with anyio.fail_after(WRITE_TIMEOUT_S):
                await send({"type": "http.response.body", "body": msg, "more_body": True})

        try:
            chunk = self.first
            while chunk is not _END:
                await event(gw._chunk_event(call, chunk))
                chunk = await gw._thread(next, self.stream, _END)
            result = self.stream.result
            assert result is not None
            await event(gw._chunk(call, None, None, _finish(result), _extension(result)))
            if call.include_usage:
                await event(
                    {**gw._head(call, _obj(call)), "choices": [], "usage": _usage(call, result)}
                )
            gw.served += 1
        except Exception as e:  # after the headers: the error is the last event
            err = api_error(e)
            gw.errors += 1
            log.warning("gateway: %s: error mid-stream: %s", call.id, err.message, exc_info=True)
            await event(err.body())
        self.finished = True
        await event(b"[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def _obj(call: _Call) -> str:
    return "chat.completion.chunk" if call.chat else "text_completion"


def _finish(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _usage(call: _Call, result: GenerationResult) -> dict[str, Any]:
    n = len(result.tokens)
    p = result.prompt_tokens
    return {
        "prompt_tokens": p,
        "completion_tokens": n,
        "total_tokens": None if p is None else p + n,
    }


def _extension(result: GenerationResult) -> dict[str, Any]:
    if result.degraded:
        tier = Tier.EDGE_DEGRADED
    else:
        tier = result.tiers[-1] if result.tiers else Tier.EDGE
    return {
        "tier": tier.value,
        "restart": False,
        "tiers": [t.value for t in result.tiers],
        "confidence": result.confidence,
        "reason": result.reason,
        "request_id": result.request_id,
        "escalated_at": result.escalated_at,
        "timings_ms": dict(result.timings),
        "model_versions": dict(result.model_versions),
        "finish_reason": result.finish_reason,
        "speculation": result.speculation,
    }


def _num(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return _num(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _dumps(obj: Any) -> bytes:
    return json.dumps(_finite(obj), separators=(",", ":"), ensure_ascii=False).encode()


# ---------------------------------------------------------------------------------- the app
async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    return APIError(status, str(getattr(exc, "detail", "")) or "error").response()


def create_app(
    runtime: EdgeRuntime,
    *,
    max_concurrent: int = MAX_CONCURRENT,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Starlette:
    """The gateway as a Starlette (ASGI) app serving ``runtime``'s generation tasks; the
    :class:`Gateway` (counters) is ``app.state.gateway``. The caller owns ``runtime``."""
    gw = Gateway(runtime, max_concurrent=max_concurrent, max_body_bytes=max_body_bytes)
    app = Starlette(
        routes=[
            Route("/v1/models", gw.models, methods=["GET"]),
            Route("/v1/models/{model:path}", gw.model, methods=["GET"]),
            Route("/v1/completions", gw.completions, methods=["POST"]),
            Route("/v1/chat/completions", gw.chat_completions, methods=["POST"]),
            Route("/health", gw.health, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.gateway = gw
    return app


def serve(
    policy: str | Path | Policy | EdgeRuntime,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    max_concurrent: int = MAX_CONCURRENT,
    max_body_bytes: int = MAX_BODY_BYTES,
    log_level: str = "info",
) -> None:
    """Serve the gateway with uvicorn; returns after SIGINT or SIGTERM (a graceful shutdown:
    streams still open get 5 s). ``policy``: a policy file, a :class:`Policy`, or a running
    :class:`EdgeRuntime` (which the caller keeps and closes; one made here is closed before
    this returns, so its escalation log is flushed)."""
    import uvicorn

    owned = not isinstance(policy, EdgeRuntime)
    if isinstance(policy, EdgeRuntime):
        runtime = policy
    elif isinstance(policy, Policy):
        runtime = EdgeRuntime(policy)
    else:
        runtime = EdgeRuntime.from_policy(policy)
    try:
        app = create_app(runtime, max_concurrent=max_concurrent, max_body_bytes=max_body_bytes)
        config = uvicorn.Config(
            app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5
        )
        _run_until_signal(uvicorn.Server(config))
    finally:
        if owned:
            runtime.close()


def _run_until_signal(server: Any) -> None:
    """``server.run()``, returning normally after SIGINT/SIGTERM: uvicorn shuts down, then
    raises the signal again under the handlers it found, which are no-ops here (Python's
    default handler for SIGTERM would kill the process before the runtime is closed)."""
    if threading.current_thread() is not threading.main_thread():
        server.run()  # no signals off the main thread: the owner sets should_exit
        return
    ignore = {sig: signal.signal(sig, lambda *_: None) for sig in _SIGNALS}
    try:
        server.run()
    finally:
        for sig, handler in ignore.items():
            signal.signal(sig, handler)
