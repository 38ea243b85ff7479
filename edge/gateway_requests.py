"""What a gateway request may say, and how it is read: the body (bounded in bytes while it
arrives, and in nesting), OpenAI's fields validated into one :class:`GatewayCall`. Everything
here raises :class:`~tandem.edge.gateway_errors.APIError` or
:class:`~tandem.runtime.errors.BadRequest` (400, 404, 413), never anything that becomes a 500.
"""

from __future__ import annotations

import json
import reprlib
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from starlette.requests import ClientDisconnect, Request

from tandem.edge.gateway_errors import APIError, validation_error
from tandem.runtime.errors import BadRequest

MAX_BODY_BYTES = 1 << 20  # a request body over this is refused (413) before it is parsed
MAX_DRAIN_BYTES = 64 << 20  # of an oversized body, read (and drop) at most this much, so the
# client sees the 413 instead of a connection reset
MAX_TAGS, MAX_TAG_CHARS = 16, 64
TOO_DEEP = "the body's JSON is nested too deeply (past Python's recursion limit)"


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
_SHORT = reprlib.Repr()  # a refused value, quoted in the error: a few levels, a few items
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring = 3, 4, 4, 60


@dataclass
class GatewayCall:
    """One request, parsed: what to generate and how to answer it. ``offset`` and
    ``role_sent`` are the answer's progress, advanced as its chunks are written."""

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


async def read_json(request: Request, limit: int) -> Any:
    """The request's body, parsed; over ``limit`` bytes is 413 (checked while reading), bad
    JSON or JSON nested past the recursion limit 400."""
    too_large = APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await _drain(request, 0)
        raise too_large
    body = bytearray()
    try:
        async for part in request.stream():
            body += part
            if len(body) > limit:
                await _drain(request, len(body))
                raise too_large
    except ClientDisconnect:  # nobody to answer: not a server error
        raise APIError(400, "the client went away while sending its request") from None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, TOO_DEEP) from None


async def _drain(request: Request, seen: int) -> None:
    try:
        async for part in request.stream():
            seen += len(part)
            if seen > MAX_DRAIN_BYTES:
                return
    except Exception:  # the client went away: nothing to answer
        return


def parse_call(body: Any, *, chat: bool, tasks: Mapping[str, Any]) -> GatewayCall:
    """``body`` (parsed JSON) as a call of one of ``tasks`` (the generation tasks, by name):
    400 for a bad or unsupported parameter, 404 for an unknown model."""
    try:
        return _parse(body, chat, tasks)
    except RecursionError:  # a deep value that parsed, then was too deep to compare or quote
        raise APIError(400, TOO_DEEP) from None


def _parse(body: Any, chat: bool, tasks: Mapping[str, Any]) -> GatewayCall:
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    for name, allowed in _UNSUPPORTED.items():
        v = body.get(name)
        if v is not None and v not in allowed:
            raise APIError(
                400, f"{name}={_SHORT.repr(v)} is not supported by the Tandem gateway", param=name
            )
    try:
        req = (_ChatBody if chat else _CompletionBody).model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
    if req.model not in tasks:
        raise APIError(
            404,
            f"the model {req.model!r} does not exist; this gateway serves: " + ", ".join(tasks),
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
    return GatewayCall(
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
