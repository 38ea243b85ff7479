"""An OpenAI-compatible HTTP gateway in front of :class:`~tandem.edge.EdgeRuntime`, so any
process on the robot (a C++ ROS node, ``curl``) uses Tandem without Python.

.. code-block:: console

    $ tandem gateway --policy policy.yaml --port 8000
    $ curl -N localhost:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"model": "sort", "prompt": "sort: cab =", "max_tokens": 8, "stream": true}'

In Python: ``serve("policy.yaml", port=8000)``, or ``create_app(runtime)`` for any ASGI server.

**Endpoints.** ``GET /v1/models``: each ``kind: generate`` task of the policy is a model (the
task's name is a request's ``model``); ``GET /v1/models/{task}``; ``GET /health`` (live);
``GET /ready`` (every task's model loaded and warmed, else 503, with per-task readiness);
``GET /metrics`` (Prometheus: the runtime's ``tandem_edge_…`` and the gateway's
``tandem_gateway_…``, see :mod:`tandem.edge.metrics` and :mod:`tandem.edge.gateway_metrics`).
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
parameters (JSON nested past Python's recursion limit included), or a prompt the model cannot
take (:class:`~tandem.runtime.errors.BadRequest`); 404 unknown model (``model_not_found``); 413
a body over ``max_body_bytes`` (checked while reading, before parsing); 429 a full queue, a
wait for a slot past ``queue_timeout_s``, or an overloaded backend (with ``Retry-After``); 500
anything else, with a message, never a traceback. An error after a stream has started is sent
as a last event ``data: {"error": {...}}``, then ``data: [DONE]``.

**Slots and the queue.** At most ``max_concurrent`` generations run at once (default 8);
past that a request waits for a slot, first come first served, as llama.cpp's server queues
them: at most ``max_queued`` wait (default 64), each at most ``queue_timeout_s`` (default
30 s); only one more than that, or one that waited too long, is refused with 429 and
``Retry-After`` (:mod:`~tandem.edge.gateway_admission`). ``GET /health`` says how many are
``active`` and ``queued``.

**Threads and clients that go away.** Generation runs in worker threads, a chunk at a time, so
the event loop never blocks and a client is watched while its answer is made. A client that
disconnects (while queued, mid-stream, or before a non-streamed answer is ready), or that
stops reading a stream for ``write_timeout_s`` (30 s), has its
:class:`~tandem.edge.answer_streams.AnswerStream` closed (local decoding and the cloud's
stream stop at the next token) and its slot given back at once.

**Modules.** This one is the public face and the server runner (:func:`serve`); the request
side is :mod:`~tandem.edge.gateway_requests` (body, validation), the response bodies
:mod:`~tandem.edge.gateway_responses`, errors :mod:`~tandem.edge.gateway_errors`, the slots
:mod:`~tandem.edge.gateway_admission`, and the endpoints and streams
:mod:`~tandem.edge.gateway_app` (:func:`create_app`).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

try:
    import anyio  # noqa: F401
    import starlette  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the Tandem gateway needs starlette and uvicorn ({e.name} is missing): "
        "pip install starlette uvicorn"
    ) from e

from tandem.edge.gateway_admission import AdmissionQueue
from tandem.edge.gateway_app import (
    MAX_CONCURRENT,
    MAX_QUEUED,
    QUEUE_TIMEOUT_S,
    WRITE_TIMEOUT_S,
    Gateway,
    GatewayLimits,
    create_app,
)
from tandem.edge.gateway_errors import APIError, api_error
from tandem.edge.gateway_requests import (
    MAX_BODY_BYTES,
    MAX_DRAIN_BYTES,
    MAX_TAG_CHARS,
    MAX_TAGS,
    GatewayCall,
    TandemOptions,
    chat_messages,
)
from tandem.edge.runtime import EdgeRuntime
from tandem.router.policy import Policy

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_CONCURRENT",
    "MAX_DRAIN_BYTES",
    "MAX_QUEUED",
    "MAX_TAGS",
    "MAX_TAG_CHARS",
    "QUEUE_TIMEOUT_S",
    "WRITE_TIMEOUT_S",
    "APIError",
    "AdmissionQueue",
    "Gateway",
    "GatewayCall",
    "GatewayLimits",
    "TandemOptions",
    "api_error",
    "chat_messages",
    "create_app",
    "serve",
]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def serve(
    policy: str | Path | Policy | EdgeRuntime,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    limits: GatewayLimits | None = None,
    log_level: str = "info",
    **kw: Any,
) -> None:
    """Serve the gateway with uvicorn; returns after SIGINT or SIGTERM (a graceful shutdown:
    streams still open get 5 s). ``policy``: a policy file, a :class:`Policy`, or a running
    :class:`EdgeRuntime` (which the caller keeps and closes; one made here is closed before
    this returns, so its escalation log is flushed). ``limits``, or its fields as keywords:
    :class:`GatewayLimits` (generations at once, the queue and its wait, body size, write
    timeout)."""
    limits = limits or GatewayLimits(**kw)
    import uvicorn

    owned = not isinstance(policy, EdgeRuntime)
    if isinstance(policy, EdgeRuntime):
        runtime = policy
    elif isinstance(policy, Policy):
        runtime = EdgeRuntime(policy)
    else:
        runtime = EdgeRuntime.from_policy(policy)
    try:
        runtime.metrics_registry  # noqa: B018 - turns the metrics on: /metrics from the start
        app = create_app(runtime, limits)
        # log_config=None: uvicorn's loggers go through the root handler that the CLI set up
        # (JSON lines under --log-format json) instead of uvicorn's own text formatter
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=5,
            log_config=None,
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
