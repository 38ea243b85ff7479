"""The OpenAI-compatible gateway, driven by the official ``openai`` client (and raw HTTP for
the SSE framing) against a real uvicorn server on a free loopback port, in front of a real
EdgeRuntime with a tiny random Llama."""

from __future__ import annotations

import http.client
import importlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml


def _need(module: str) -> Any:
    """Skip without ``module``, except on CI (``CI`` set): there its absence is a failure."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


_need("starlette")
uvicorn = _need("uvicorn")
openai = _need("openai")
transformers = _need("transformers")

from tandem.bench.ports import free_ports  # noqa: E402
from tandem.edge import EdgeRuntime  # noqa: E402
from tandem.edge.gateway import chat_messages, create_app  # noqa: E402
from tandem.router.policy import policy_from_dict  # noqa: E402
from tandem.runtime.errors import BadRequest  # noqa: E402
from tandem.runtime.types import AnswerChunk, Tier  # noqa: E402
from tests.lm import tiny_lm  # noqa: E402

PROMPT = "sort: cab ="
LONG = {"model": "sort", "prompt": PROMPT, "max_tokens": 490, "stream": True}  # seconds of tokens


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_lm(tmp_path_factory.mktemp("tiny-llama"))


def _policy(model_dir: Path) -> dict:
    local = {"path": str(model_dir), "format": "transformers"}
    return {
        "tasks": {
            "sort": {
                "kind": "generate",
                "local": local,
                "gate": {"metric": "token_min", "threshold": 0.5},
                "mode": "probe",
            },
            "down": {  # always escalates, to a cloud nobody serves
                "kind": "generate",
                "local": local,
                "cloud": {"endpoint": f"tcp://127.0.0.1:{free_ports()[0]}", "model": "x"},
                "gate": {"metric": "token_min", "threshold": 0.999},
                "mode": "probe",
                "probe_tokens": 4,
                "rules": [{"tag": "private", "route": "local"}],
                "deadline_ms": 5000,
                "first_token_ms": 300,
            },
        }
    }


@pytest.fixture(scope="module")
def runtime(model_dir: Path) -> Iterator[EdgeRuntime]:
    with EdgeRuntime(policy_from_dict(_policy(model_dir))) as rt:
        yield rt


@contextmanager
def running(app: Any) -> Iterator[str]:
    """``app`` under a real uvicorn server in a thread, on a free loopback port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture(scope="module")
def app(runtime: EdgeRuntime) -> Any:
    return create_app(runtime)


@pytest.fixture(scope="module")
def url(app: Any) -> Iterator[str]:
    with running(app) as u:
        yield u


@pytest.fixture
def client(url: str) -> Iterator[Any]:
    with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


def _raw(
    url: str, method: str, path: str, body: Any = None, headers: dict | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request, as curl would send it."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, data, {"content-type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def _events(body: bytes) -> list[str]:
    """The ``data`` of each SSE event, checking the framing: ``data: ...`` blocks, each ended
    by a blank line."""
    text = body.decode()
    assert text.endswith("\n\n")
    blocks = text[:-2].split("\n\n")
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), blocks
    return [b.removeprefix("data: ") for b in blocks]


# ---------------------------------------------------------------------------------- models
def test_models_lists_each_generate_task(client: Any) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["sort", "down"]
    assert all(m.object == "model" and m.owned_by == "tandem" for m in models.data)
    assert models.data[1].model_extra["tandem"]["cloud"] is True
    assert client.models.retrieve("sort").id == "sort"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


# ---------------------------------------------------------------------------------- answers
def test_completion_is_the_runtime_answer(client: Any, runtime: EdgeRuntime) -> None:
    want = runtime.generate(PROMPT, "sort", max_tokens=10)
    r = client.completions.create(model="sort", prompt=PROMPT, max_tokens=10)
    assert r.object == "text_completion" and r.model == "sort"
    (choice,) = r.choices
    assert choice.text == want.text and len(choice.text) == 10
    assert choice.finish_reason == "length" and choice.logprobs is None
    assert r.usage.completion_tokens == 10
    assert r.usage.prompt_tokens == len(PROMPT) + 1  # the char tokenizer's BOS
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10
    ext = r.model_extra["tandem"]
    assert ext["tier"] == "edge" and ext["tiers"] == ["edge"]
    assert ext["reason"] == want.reason and ext["request_id"] is None
    assert ext["confidence"] == pytest.approx(want.confidence)
    assert {"ttft", "total", "local", "cloud"} <= set(ext["timings_ms"])
    assert ext["model_versions"]["edge"] == want.model_versions["edge"]
    # a list of one prompt is the same request
    again = client.completions.create(model="sort", prompt=[PROMPT], max_tokens=10)
    assert again.choices[0].text == want.text


def test_chat_completion_without_a_template_concatenates_the_contents(
    client: Any, runtime: EdgeRuntime
) -> None:
    messages = [
        {"role": "system", "content": "sort: "},
        {"role": "user", "content": [{"type": "text", "text": "cab ="}]},
    ]
    assert chat_messages(messages)[1] == {"role": "user", "content": "cab ="}
    want = runtime.generate(PROMPT, "sort", max_tokens=8)
    assert runtime.chat(chat_messages(messages), "sort", max_tokens=8).text == want.text
    r = client.chat.completions.create(model="sort", messages=messages, max_tokens=8)
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == want.text
    assert r.choices[0].finish_reason == "length"
    assert r.model_extra["tandem"]["tier"] == "edge"
    # max_completion_tokens is the newer name
    r2 = client.chat.completions.create(model="sort", messages=messages, max_completion_tokens=3)
    assert r2.choices[0].message.content == want.text[:3]


def test_streamed_completion_concatenates_to_the_plain_answer(client: Any) -> None:
    plain = client.completions.create(model="sort", prompt=PROMPT, max_tokens=12)
    chunks = list(
        client.completions.create(
            model="sort",
            prompt=PROMPT,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage_chunk, last, body = chunks[-1], chunks[-2], chunks[:-2]
    assert "".join(c.choices[0].text for c in body) == plain.choices[0].text
    assert len({c.id for c in chunks}) == 1
    for c in body:
        assert c.choices[0].finish_reason is None
        assert c.model_extra["tandem"] == {"tier": "edge", "restart": False}
    assert last.choices[0].text == "" and last.choices[0].finish_reason == "length"
    assert last.model_extra["tandem"]["tiers"] == ["edge"]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 12


def test_streamed_chat_concatenates_to_the_plain_answer(client: Any) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    plain = client.chat.completions.create(model="sort", messages=messages, max_tokens=12)
    chunks = list(
        client.chat.completions.create(model="sort", messages=messages, max_tokens=12, stream=True)
    )
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].model_extra["tandem"]["tier"] == "edge"


def test_completion_logprobs_in_openai_shape(client: Any, runtime: EdgeRuntime) -> None:
    want = runtime.generate(PROMPT, "sort", max_tokens=10)
    r = client.completions.create(model="sort", prompt=PROMPT, max_tokens=10, logprobs=1)
    lp = r.choices[0].logprobs
    assert lp.tokens == list(want.text)  # one character per token, split in the probe chunk too
    assert lp.token_logprobs == pytest.approx(want.logprobs)
    assert lp.text_offset == list(range(len(PROMPT), len(PROMPT) + 10))
    assert lp.top_logprobs == [{t: x} for t, x in zip(lp.tokens, lp.token_logprobs, strict=True)]
    # streamed: the chunks' logprobs add up to the same
    toks, xs, offsets = [], [], []
    for c in client.completions.create(
        model="sort", prompt=PROMPT, max_tokens=10, logprobs=0, stream=True
    ):
        if c.choices[0].logprobs is not None:
            toks += c.choices[0].logprobs.tokens
            xs += c.choices[0].logprobs.token_logprobs
            offsets += c.choices[0].logprobs.text_offset
            assert c.choices[0].logprobs.top_logprobs is None  # logprobs=0
    assert toks == lp.tokens and xs == pytest.approx(lp.token_logprobs)
    assert offsets == lp.text_offset


def test_chat_logprobs_in_openai_shape(client: Any, runtime: EdgeRuntime) -> None:
    want = runtime.generate(PROMPT, "sort", max_tokens=5)
    r = client.chat.completions.create(
        model="sort",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=5,
        logprobs=True,
        top_logprobs=1,
    )
    content = r.choices[0].logprobs.content
    assert [e.token for e in content] == list(want.text)
    assert [e.logprob for e in content] == pytest.approx(want.logprobs)
    assert all(e.bytes == list(e.token.encode()) for e in content)
    assert all([t.token for t in e.top_logprobs] == [e.token] for e in content)


def test_stop_strings_and_seeded_sampling(client: Any) -> None:
    def complete(**kw: Any) -> Any:
        return client.completions.create(
            model="sort", prompt=PROMPT, max_tokens=30, temperature=1.0, seed=7, **kw
        ).choices[0]

    free = complete()
    assert complete().text == free.text  # the seed makes sampling repeatable
    assert len(set(free.text)) > 3  # sampled, not one character over and over
    stop = free.text[6:8]
    want = free.text[: free.text.find(stop)]
    for s in (stop, [stop], ["zzzz", stop]):
        c = complete(stop=s)
        assert c.text == want and c.finish_reason == "stop"


# ---------------------------------------------------------------------------------- the cloud
def test_a_cloud_that_is_down_still_answers_marked_edge_degraded(
    client: Any, runtime: EdgeRuntime
) -> None:
    r = client.completions.create(model="down", prompt=PROMPT, max_tokens=10)
    ext = r.model_extra["tandem"]
    assert len(r.choices[0].text) == 10
    assert ext["tier"] == "edge-degraded"
    assert ext["tiers"] == ["edge", "edge-degraded"]
    assert ext["escalated_at"] == 4 and ext["request_id"]
    assert ext["reason"].startswith("low-confidence; cloud-")
    assert ext["timings_ms"]["cloud"] >= 250  # it waited for the first token, then gave up
    # streamed: each chunk says which tier wrote it
    chunks = list(
        client.completions.create(model="down", prompt=PROMPT, max_tokens=10, stream=True)
    )
    tiers = [c.model_extra["tandem"]["tier"] for c in chunks[:-1]]
    assert tiers[0] == "edge" and set(tiers[1:]) == {"edge-degraded"}
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].model_extra["tandem"]["tier"] == "edge-degraded"
    # a `private` tag keeps it on the device (the policy's rule): no cloud, no degradation
    p = client.completions.create(
        model="down", prompt=PROMPT, max_tokens=10, extra_body={"tandem": {"tags": ["private"]}}
    )
    assert p.model_extra["tandem"]["tier"] == "edge"
    assert p.model_extra["tandem"]["reason"] == "rule:private"
    # a request's own deadline: spent before the cloud could be asked, still answered
    d = client.completions.create(
        model="down", prompt=PROMPT, max_tokens=10, extra_body={"tandem": {"deadline_ms": 1}}
    )
    assert d.model_extra["tandem"]["tier"] == "edge-degraded"
    assert d.model_extra["tandem"]["timings_ms"]["cloud"] < 250
    assert d.choices[0].text == r.choices[0].text


# ---------------------------------------------------------------------------------- errors
def test_unknown_model_is_404_model_not_found(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt=PROMPT)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    assert "sort" in e.value.message  # names the models there are
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "a"}])


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),  # the runtime's SamplingParams refuses it
        ({"max_tokens": "5"}, "max_tokens"),
        ({"temperature": 3.0}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"n": 2}, "n"),
        ({"echo": True}, "echo"),
        ({"stop": 5}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"logprobs": 6}, "logprobs"),
        ({"prompt": ["ab", "cd"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": "SORT"}, None),  # outside the model's vocabulary: the runtime's BadRequest
        ({"extra_body": {"tandem": {"tags": "private"}}}, "tandem"),
        ({"extra_body": {"tandem": {"tags": [""]}}}, "tandem"),
        ({"extra_body": {"tandem": {"deadline_ms": 0}}}, "tandem"),
        ({"extra_body": {"tandem": {"dedline_ms": 50}}}, "tandem"),
    ],
)
def test_bad_parameters_are_400(client: Any, kwargs: dict, param: str | None) -> None:
    args = {"model": "sort", "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    assert e.value.status_code == 400 and e.value.param == param
    assert e.value.type == "invalid_request_error" and e.value.message


def test_bad_stream_requests_fail_before_the_stream_starts(client: Any) -> None:
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model="sort", prompt="SORT", stream=True)
    with pytest.raises(openai.BadRequestError, match="only text parts"):
        client.chat.completions.create(
            model="sort",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            stream=True,
        )
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(
            model="sort", messages=[{"role": "user", "content": "a"}], top_logprobs=2
        )


def test_a_body_over_the_limit_is_413(client: Any, url: str) -> None:
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="sort", prompt="a" * (2 << 20))
    assert e.value.status_code == 413 and e.value.code == "request_too_large"
    # chunked (no content-length): refused while reading
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    parts = (b"x" * 65536 for _ in range(40))
    conn.request("POST", "/v1/completions", parts, {"content-type": "application/json"})
    assert conn.getresponse().status == 413
    conn.close()
    # and the server goes on
    assert client.completions.create(model="sort", prompt=PROMPT, max_tokens=2).choices


def test_raw_http_errors_are_json_in_openai_shape(url: str) -> None:
    status, _, body = _raw(url, "POST", "/v1/completions", b"{not json")
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
    status, _, body = _raw(url, "POST", "/v1/completions", b"[1, 2]")
    assert status == 400 and "JSON object" in json.loads(body)["error"]["message"]
    status, _, body = _raw(url, "GET", "/v1/nothing-here")
    assert status == 404 and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    status, _, _ = _raw(url, "GET", "/v1/completions")
    assert status == 405
    status, _, body = _raw(url, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_json_nested_too_deeply_is_400_not_500(app: Any, url: str) -> None:
    errors = app.state.gateway.errors
    deep = b"[" * 5000 + b"]" * 5000
    for path, body in [
        ("/v1/completions", deep),
        ("/v1/chat/completions", b'{"model": "sort", "messages": ' + deep + b"}"),
        ("/v1/completions", b'{"model": "sort", "prompt": "ab", "metadata": ' + deep + b"}"),
    ]:
        status, _, answer = _raw(url, "POST", path, body)
        assert status == 400, answer
        err = json.loads(answer)["error"]
        assert err["type"] == "invalid_request_error"
        assert "nested too deeply" in err["message"]
    # deep, yet parsed: refused by name, and the value quoted short, not whole
    n = json.dumps({"model": "sort", "prompt": "ab", "n": json.loads("[" * 300 + "]" * 300)})
    status, _, answer = _raw(url, "POST", "/v1/completions", n.encode())
    err = json.loads(answer)["error"]
    assert status == 400 and err["param"] == "n" and len(err["message"]) < 200
    assert app.state.gateway.errors == errors  # no 500 among them


# ---------------------------------------------------------------------------------- SSE
def test_sse_framing_over_raw_http(url: str) -> None:
    req = {"model": "sort", "prompt": PROMPT, "max_tokens": 6, "stream": True, "logprobs": 1}
    status, headers, body = _raw(url, "POST", "/v1/completions", req)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in headers
    events = _events(body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["model"] == "sort" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["tandem"]["tier"] == "edge"
    assert len("".join(c["choices"][0]["text"] for c in chunks)) == 6
    # compact JSON on one line, as OpenAI sends it
    assert events[0].startswith('{"id":"cmpl-')


class ScriptedRuntime:
    """A stand-in for EdgeRuntime whose streams yield ``chunks``, then raise ``error`` (if
    any); a prompt of ``boom`` fails at once."""

    def __init__(
        self, policy: Any, chunks: list[AnswerChunk], error: Exception | None = None
    ) -> None:
        self.policy, self.chunks, self.error = policy, chunks, error

    def generate(self, prompt: str, task: str, *, stream: bool, **kw: Any) -> Any:
        assert stream, "the gateway always streams from the runtime"
        if prompt == "boom":
            raise RuntimeError("exploded at once")
        chunks, error = self.chunks, self.error

        def run() -> Iterator[AnswerChunk]:
            yield from chunks
            if error is not None:
                raise error

        class Stream:
            result = None
            it = run()

            def __next__(self) -> AnswerChunk:
                return next(self.it)

            def close(self) -> None:
                self.it.close()

        return Stream()


def test_an_error_after_the_stream_started_is_a_last_event(runtime: EdgeRuntime) -> None:
    first = AnswerChunk("ab", [3, 4], Tier.EDGE, [-0.1, -0.2])
    scripted = ScriptedRuntime(runtime.policy, [first], RuntimeError("the model fell over"))
    app = create_app(scripted)  # type: ignore[arg-type]
    with running(app) as url:
        req = {"model": "sort", "prompt": PROMPT, "stream": True}
        status, _, body = _raw(url, "POST", "/v1/completions", req)
        assert status == 200
        events = _events(body)
        assert events[-1] == "[DONE]"
        assert json.loads(events[0])["choices"][0]["text"] == "ab"
        err = json.loads(events[-2])["error"]
        assert err["type"] == "server_error" and "fell over" in err["message"]
        assert "Traceback" not in body.decode()
        with (
            openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as c,
            pytest.raises(openai.APIError, match="fell over"),
        ):
            list(c.completions.create(model="sort", prompt=PROMPT, stream=True))
        # before anything was sent: a 500 with a message, and the server stays up
        with (
            openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as c,
            pytest.raises(openai.InternalServerError) as e,
        ):
            c.completions.create(model="sort", prompt="boom")
        assert "exploded at once" in e.value.message
        assert _raw(url, "GET", "/health")[0] == 200
        assert app.state.gateway.errors == 3 and app.state.gateway.active == 0


def test_a_restart_chunk_is_flagged_and_unknown_logprobs_are_null(runtime: EdgeRuntime) -> None:
    chunks = [
        AnswerChunk("ab", [3], Tier.EDGE, [-0.5]),
        AnswerChunk("xyz", [7, 8], Tier.CLOUD, [math.nan, -1.0], restart=True),
    ]
    app = create_app(ScriptedRuntime(runtime.policy, chunks))  # type: ignore[arg-type]
    with running(app) as url:
        req = {"model": "sort", "prompt": "p", "stream": True, "logprobs": 1}
        _, _, body = _raw(url, "POST", "/v1/completions", req)
    events = [json.loads(e) for e in _events(body)[:-1]]
    assert [e["tandem"]["restart"] for e in events[:2]] == [False, True]
    assert [e["tandem"]["tier"] for e in events[:2]] == ["edge", "cloud"]
    lp = events[1]["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [None, -1.0]  # JSON has no NaN
    assert lp["tokens"] == ["xyz", ""]  # cloud tokens' texts are not known one by one
    assert lp["text_offset"] == [1, 4]  # counted again from the prompt's end


# ---------------------------------------------------------------------------------- concurrency
def _open_stream(url: str, req: dict) -> tuple[http.client.HTTPConnection, Any]:
    """A streaming request whose first event has been read."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(req), {"content-type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    assert r.readline().startswith(b"data: {")
    return conn, r


def _wait(cond: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_client_that_disconnects_mid_stream_stops_its_generation(
    client: Any, app: Any, url: str
) -> None:
    gw = app.state.gateway
    # 490 tokens take seconds (no EOS from this prompt); each stream is closed long before.
    # More disconnects than the local backend has stream slots (8): none leaks.
    for i in range(9):
        cancelled = gw.cancelled
        conn, _ = _open_stream(url, LONG)
        t0 = time.monotonic()
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        assert _wait(lambda: gw.active == 0, 3), f"stream {i} was not closed"
        assert gw.cancelled == cancelled + 1  # closed before its end
        assert time.monotonic() - t0 < 3
    # the server goes on
    assert client.completions.create(model="sort", prompt=PROMPT, max_tokens=3).choices


def test_over_max_concurrent_with_no_queue_is_429_with_retry_after(runtime: EdgeRuntime) -> None:
    app = create_app(runtime, max_concurrent=1, max_queued=0)  # refused at once, never queued
    with running(app) as url:
        conn, _ = _open_stream(url, LONG)
        try:
            with (
                openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as c,
                pytest.raises(openai.RateLimitError) as e,
            ):
                c.completions.create(model="sort", prompt=PROMPT, max_tokens=2)
            assert e.value.response.headers["retry-after"] == "1"
        finally:
            conn.close()
        assert _wait(lambda: app.state.gateway.active == 0, 5)
        status, _, _ = _raw(url, "POST", "/v1/completions", {"model": "sort", "prompt": "ab"})
        assert status == 200


# ---------------------------------------------------------------------------------- units
def test_chat_messages_refuses_what_it_cannot_render() -> None:
    got = chat_messages([{"role": "assistant", "content": None}, {"role": "user", "content": "a"}])
    assert got == [{"role": "assistant", "content": ""}, {"role": "user", "content": "a"}]
    for bad in ([], "hi", [{"content": "a"}], [{"role": "user", "content": 5}]):
        with pytest.raises(BadRequest):
            chat_messages(bad)


# ---------------------------------------------------------------------------------- serve()
@pytest.mark.integration
def test_serve_runs_a_policy_file_until_sigterm(model_dir: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"tasks": {"sort": _policy(model_dir)["tasks"]["sort"]}}))
    port = free_ports()[0]
    code = (
        "import sys; from tandem.edge.gateway import serve; "
        "serve(sys.argv[1], port=int(sys.argv[2]), log_level='warning'); print('returned')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(policy), str(port)], stdout=subprocess.PIPE
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, "the gateway exited"
            try:
                return _raw(url, "GET", "/health")[0] == 200
            except OSError:
                return False

        assert _wait(up, 90), "the gateway did not come up"
        with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as c:
            r = c.completions.create(model="sort", prompt=PROMPT, max_tokens=4)
        assert len(r.choices[0].text) == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0  # serve() returned, having closed the runtime
        assert proc.stdout is not None and proc.stdout.read() == b"returned\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
