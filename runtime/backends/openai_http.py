"""Any OpenAI-compatible completions server (format ``openai``): llama.cpp's or
llama-cpp-python's server, vLLM, a hosted API. Requests go through the official ``openai``
client as streaming ``/v1/completions`` with ``logprobs=1``, so each token arrives with its
log-probability; entropy is not sent (``TokenStep.entropy`` is None) and token ids are -1
unless the server adds them (``token_ids`` on a choice, as vLLM does when asked).

Chat (:meth:`OpenAIBackend.stream_chat`) goes to ``/v1/chat/completions`` with the messages,
so the server renders them with its own model's template. A hand-off mid-answer (``prefix``)
sends the assistant's text so far as a last assistant message; with
``continue_final_message`` (vLLM's option of that name, sent with ``add_generation_prompt``
false) the server continues that message, without it the server answers with a new assistant
turn after it (what OpenAI's API and llama.cpp's server do; they refuse or ignore vLLM's
fields, so the option is off by default).

Errors become Tandem's: no connection or no reply within ``timeout_s`` → :class:`Unavailable`;
HTTP 429 → :class:`OverloadedError`; other 4xx → :class:`BadRequest`; anything else →
:class:`BackendError`. Each message names the URL.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Generator
from typing import Any, NoReturn
from urllib.parse import urlsplit

import openai

from tandem.runtime.chat import Message
from tandem.runtime.errors import BackendError, BadRequest, OverloadedError, Unavailable
from tandem.runtime.generation import BackendStream, FinishReason, SamplingParams, TokenStep

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}


class OpenAIBackend:
    """``url``: the server's base URL (``http://host:port`` gets ``/v1`` added). ``model``:
    the model id to request; ``None`` asks ``/v1/models`` now and takes the first (so a server
    that is down raises :class:`Unavailable` here; with ``model`` given, nothing is sent until
    the first stream). ``version`` defaults to the model id.
    ``timeout_s``: seconds to connect, and to wait for each chunk. ``extra_body``: fields
    added to every request, for a server's own options (llama-cpp-python's server applies
    ``repeat_penalty`` 1.1 unless sent 1.0). ``threads`` is ignored (the server has its own)."""

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        version: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        extra_body: dict[str, Any] | None = None,
        continue_final_message: bool = False,
        threads: int | None = None,
    ) -> None:
        self.url = _base_url(str(url))
        self.client = openai.OpenAI(
            base_url=self.url, api_key=api_key or "none", timeout=timeout_s, max_retries=0
        )
        self.model = model or self._first_model()
        self.version = version or self.model
        self.name = name or self.model
        self.timeout_s = timeout_s
        self.extra_body = dict(extra_body or {})
        self.continue_final_message = continue_final_message

    def _first_model(self) -> str:
        try:
            ids = [m.id for m in self.client.models.list().data]
        except openai.OpenAIError as e:
            _raise(e, self.url)
        if not ids:
            raise BackendError(f"{self.url}/models lists no model")
        return ids[0]

    def stream(
        self, prompt: str, params: SamplingParams, *, cancel: threading.Event | None = None
    ) -> BackendStream:
        """Send the request now (so a refused one raises here); tokens arrive as the stream is
        iterated. ``cancel`` is noticed between chunks and closes the HTTP stream."""
        body = {**self._body(params), "prompt": prompt, "logprobs": 1}
        return self._start(self.client.completions.create, body, _choice_steps, cancel)

    def stream_chat(
        self,
        messages: list[Message],
        params: SamplingParams,
        *,
        prefix: str = "",
        cancel: threading.Event | None = None,
    ) -> BackendStream:
        """The server's model answers ``messages`` with its own chat template (see the module
        docstring for ``prefix``)."""
        body = {**self._body(params), "messages": list(messages), "logprobs": True}
        extra = {}
        if prefix:
            body["messages"].append({"role": "assistant", "content": prefix})
            if self.continue_final_message:
                extra = {"continue_final_message": True, "add_generation_prompt": False}
        return self._start(self.client.chat.completions.create, body, _chat_steps, cancel, extra)

    def _body(self, params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    def _start(self, create, body, parse, cancel, extra=None) -> BackendStream:
        try:
            response = create(**body, extra_body={**self.extra_body, **(extra or {})} or None)
        except openai.OpenAIError as e:
            _raise(e, self.url)
        holder: list[BackendStream] = []  # the stream, for the prompt size once it is known
        steps = self._steps(response, holder, parse, cancel)
        next(steps)  # started, so close() or garbage collection closes the HTTP stream
        holder.append(BackendStream(steps))  # type: ignore[arg-type]
        return holder[0]

    def _steps(
        self,
        response: Any,
        holder: list[BackendStream],
        parse: Any,
        cancel: threading.Event | None,
    ) -> Generator[TokenStep | None, None, str]:
        finish: str | None = None
        try:
            yield None  # the priming step stream() takes
            for chunk in response:
                if cancel is not None and cancel.is_set():
                    return FinishReason.CANCELLED
                usage = getattr(chunk, "usage", None)
                if usage is not None and usage.prompt_tokens:
                    holder[0].prompt_tokens = usage.prompt_tokens
                for choice in chunk.choices or ():
                    yield from parse(choice)
                    if choice.finish_reason:
                        finish = _FINISH.get(choice.finish_reason, choice.finish_reason)
            if finish is None:  # a server that failed after the response started
                raise BackendError(f"{self.url}: the stream ended without a finish reason")
            return finish
        except openai.OpenAIError as e:
            _raise(e, self.url)
        finally:
            response.close()

    def warm_up(self) -> None:
        """One token, greedy: the connection is open and the server has the model loaded."""
        for _ in self.stream(" ", SamplingParams(max_tokens=1)):
            pass

    def close(self) -> None:
        self.client.close()


def _choice_steps(choice: Any) -> list[TokenStep]:
    """TokenSteps of one streamed choice: one per token when the server lists tokens that add
    up to the chunk's text, else one step for the whole text (log-prob: their sum)."""
    text = choice.text or ""
    lp = choice.logprobs
    tokens = list(getattr(lp, "tokens", None) or ())
    logprobs = [
        math.nan if x is None else float(x) for x in getattr(lp, "token_logprobs", None) or ()
    ]
    ids = getattr(choice, "token_ids", None)
    if not (isinstance(ids, list) and len(ids) == len(tokens)):
        ids = [-1] * len(tokens)
    if tokens and len(logprobs) == len(tokens) and "".join(tokens) == text:
        return [TokenStep(int(i), t, x) for i, t, x in zip(ids, tokens, logprobs, strict=True)]
    if not text:
        return []
    logprob = math.fsum(logprobs) if logprobs else math.nan
    return [TokenStep(ids[0] if len(ids) == 1 else -1, text, logprob)]


def _chat_steps(choice: Any) -> list[TokenStep]:
    """TokenSteps of one streamed chat choice: one per entry of ``logprobs.content`` when
    they add up to the delta's text, else one step for the whole text."""
    text = getattr(choice.delta, "content", None) or ""
    content = list(getattr(choice.logprobs, "content", None) or ())
    if content and "".join(c.token for c in content) == text:
        return [TokenStep(-1, c.token, float(c.logprob)) for c in content]
    if not text:
        return []
    logprob = math.fsum(float(c.logprob) for c in content) if content else math.nan
    return [TokenStep(-1, text, logprob)]


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    return url + "/v1" if urlsplit(url).path in ("", "/") else url


def _raise(e: Exception, url: str) -> NoReturn:
    """Raise the Tandem error for an ``openai`` client error talking to ``url``."""
    if isinstance(e, openai.APITimeoutError):
        raise Unavailable(f"{url}: no reply in time ({type(e).__name__})") from e
    if isinstance(e, openai.APIConnectionError):
        cause = e.__cause__ or e
        raise Unavailable(f"{url}: cannot connect ({type(cause).__name__}: {cause})") from e
    if isinstance(e, openai.APIStatusError):
        status, detail = e.status_code, _detail(e)
        if status == 429:
            raise OverloadedError(f"{url}: HTTP 429: {detail}") from e
        if 400 <= status < 500:
            raise BadRequest(f"{url}: HTTP {status}: {detail}") from e
        raise BackendError(f"{url}: HTTP {status}: {detail}") from e
    raise BackendError(f"{url}: {type(e).__name__}: {e}") from e


def _detail(e: openai.APIStatusError) -> str:
    body = e.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(body.get("detail"), str | list):
            return str(body["detail"])
    return e.message
