"""The gateway's generation slots: who gets one, who waits for one, and who gives one back.
Requests past ``max_concurrent`` wait in a bounded queue (refused only when it is full or the
wait passes its limit); a client that goes away, or stops reading a stream, has its
generation closed and its slot freed promptly. Real uvicorn servers on loopback, in front of
the tiny Llama, or of :class:`PacedRuntime` where a test needs an answer that lasts."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from tandem.cli import app as cli
from tandem.edge import EdgeRuntime
from tandem.edge.gateway import create_app
from tandem.router.policy import policy_from_dict
from tandem.runtime.errors import ConfigError
from tandem.runtime.types import AnswerChunk, Tier
from tests.edge.test_gateway import PROMPT, _events, _open_stream, _policy, _raw, _wait, running
from tests.lm import tiny_lm

HOLD = "hold"  # PacedRuntime's prompt for a paced answer; any other goes to the real runtime


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_lm(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def runtime(model_dir: Path) -> Iterator[EdgeRuntime]:
    with EdgeRuntime(policy_from_dict(_policy(model_dir))) as rt:
        yield rt


class PacedStream:
    """A runtime stream of ``n`` copies of ``chunk``, each after ``pause_s``; records when
    it was last pulled from and when (and whether before its end) it was closed."""

    def __init__(self, chunk: AnswerChunk, n: int, pause_s: float) -> None:
        self.chunk, self.left, self.pause_s = chunk, n, pause_s
        self.pulled = 0
        self.result = None
        self.last_pull_at = self.closed_at = 0.0
        self.closed_early = False

    def __iter__(self) -> PacedStream:
        return self

    def __next__(self) -> AnswerChunk:
        if self.left <= 0:
            raise StopIteration
        time.sleep(self.pause_s)
        self.left -= 1
        self.pulled += 1
        self.last_pull_at = time.monotonic()
        return self.chunk

    def close(self) -> None:
        if not self.closed_at:
            self.closed_at = time.monotonic()
            self.closed_early = self.left > 0
        self.left = 0

    def __enter__(self) -> PacedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PacedRuntime:
    """``runtime`` (its policy, its answers), except that the prompt ``hold`` gets a
    :class:`PacedStream` (kept in ``streams``)."""

    def __init__(
        self, runtime: EdgeRuntime, chunk: AnswerChunk, n: int, pause_s: float = 0.0
    ) -> None:
        self.runtime, self.policy = runtime, runtime.policy
        self.chunk, self.n, self.pause_s = chunk, n, pause_s
        self.streams: list[PacedStream] = []

    def generate(self, prompt: str, task: str, **kw: Any) -> Any:
        if prompt != HOLD:
            return self.runtime.generate(prompt, task, **kw)
        self.streams.append(PacedStream(self.chunk, self.n, self.pause_s))
        return self.streams[-1]


def _tiny(text: str = "a") -> AnswerChunk:
    return AnswerChunk(text, [1], Tier.EDGE, [-0.1], token_texts=[text])


@contextmanager
def _sent(url: str, req: dict, rcvbuf: int | None = None) -> Iterator[socket.socket]:
    """A client that sends ``req`` and then reads nothing (``rcvbuf``: its receive buffer,
    small for a client that stops reading); closed on leaving."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((host, int(port)))
    body = json.dumps(req).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body)
    try:
        yield sock
    finally:
        sock.close()


class _Peak:
    """The highest ``active`` and ``queued`` a gateway showed while this was open."""

    def __init__(self, gw: Any) -> None:
        self.gw, self.active, self.queued = gw, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.active = max(self.active, self.gw.active)
            self.queued = max(self.queued, self.gw.queued)

    def __enter__(self) -> _Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------- the queue
def test_thirty_concurrent_streams_past_max_concurrent_all_get_answered(
    runtime: EdgeRuntime,
) -> None:
    app = create_app(runtime, max_concurrent=2)  # the default queue: 64 places, 30 s
    gw = app.state.gateway
    req = {"model": "sort", "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with running(app) as url, _Peak(gw) as peak, ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(lambda _: _raw(url, "POST", "/v1/completions", req), range(30)))
    assert [status for status, _, _ in answers] == [200] * 30
    for _, _, body in answers:
        events = _events(body)
        assert events[-1] == "[DONE]"
        assert len("".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])) == 4
    assert peak.active <= 2 and peak.queued > 0  # they did wait, two at a time ran
    assert gw.served == 30 and gw.active == 0 and gw.queued == 0


def test_a_full_queue_is_429_and_a_client_that_leaves_the_queue_frees_its_place(
    runtime: EdgeRuntime,
) -> None:
    paced = PacedRuntime(runtime, _tiny(), n=100_000, pause_s=0.02)
    app = create_app(paced, max_concurrent=1, max_queued=1, queue_timeout_s=60)
    gw = app.state.gateway
    short = {"model": "sort", "prompt": PROMPT, "max_tokens": 3}
    with running(app) as url, ThreadPoolExecutor(1) as pool:
        conn, _ = _open_stream(url, {"model": "sort", "prompt": HOLD, "stream": True})
        try:  # the one slot is held
            # a queued client that goes away gives its place up at once, not after 60 s
            with _sent(url, short):
                assert _wait(lambda: gw.queued == 1, 5)
            assert _wait(lambda: gw.queued == 0, 2)
            # one waits its turn; the next finds the queue full: refused at once
            waiter = pool.submit(_raw, url, "POST", "/v1/completions", short)
            assert _wait(lambda: gw.queued == 1, 5)
            t0 = time.monotonic()
            status, headers, body = _raw(url, "POST", "/v1/completions", short)
            assert status == 429 and headers["retry-after"] == "1"
            assert time.monotonic() - t0 < 2
            err = json.loads(body)["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "overloaded"
            assert "1 queued" in err["message"]
        finally:
            conn.close()  # the held stream ends: its slot passes to the waiter
        status, _, body = waiter.result(30)
    assert status == 200 and len(json.loads(body)["choices"][0]["text"]) == 3
    assert gw.active == 0 and gw.queued == 0 and gw.cancelled == 1  # the held stream


def test_a_wait_past_the_queue_timeout_is_429(runtime: EdgeRuntime) -> None:
    paced = PacedRuntime(runtime, _tiny(), n=100_000, pause_s=0.02)
    app = create_app(paced, max_concurrent=1, queue_timeout_s=0.5)
    gw = app.state.gateway
    with running(app) as url:
        conn, _ = _open_stream(url, {"model": "sort", "prompt": HOLD, "stream": True})
        try:
            t0 = time.monotonic()
            req = {"model": "sort", "prompt": PROMPT, "max_tokens": 3, "stream": True}
            status, headers, body = _raw(url, "POST", "/v1/completions", req)
            waited = time.monotonic() - t0
        finally:
            conn.close()
        assert status == 429 and headers["retry-after"] == "1"
        assert "within 0.5 s" in json.loads(body)["error"]["message"]
        assert 0.45 <= waited < 5
        assert _wait(lambda: gw.active == 0, 5) and gw.queued == 0


# ---------------------------------------------------------------------------------- going away
def test_a_non_streamed_call_whose_client_disconnects_is_closed_and_frees_its_slot(
    runtime: EdgeRuntime,
) -> None:
    paced = PacedRuntime(runtime, _tiny(), n=200, pause_s=0.05)  # a 10 s answer
    app = create_app(paced, max_concurrent=1)
    gw = app.state.gateway
    req = {"model": "sort", "prompt": HOLD, "tandem": {"deadline_ms": 3_600_000}}
    with running(app) as url:
        with _sent(url, req):
            assert _wait(lambda: paced.streams and paced.streams[0].pulled >= 3, 10)
            t0 = time.monotonic()
        assert _wait(lambda: gw.active == 0, 3), "the slot is still held"
        assert time.monotonic() - t0 < 2
        (stream,) = paced.streams
        assert stream.closed_early and stream.pulled < 60
        assert gw.cancelled == 1 and gw.served == 0 and gw.errors == 0
        # and the slot serves the next call
        short = {"model": "sort", "prompt": PROMPT, "max_tokens": 2}
        assert _raw(url, "POST", "/v1/completions", short)[0] == 200


WRITE_TIMEOUT_S = 1.0


def test_a_client_that_stops_reading_frees_its_slot_at_the_write_timeout(
    runtime: EdgeRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    big = _tiny("a" * (256 << 10))  # one event fills the socket buffers and uvicorn's
    paced = PacedRuntime(runtime, big, n=100_000)
    app = create_app(paced, write_timeout_s=WRITE_TIMEOUT_S)
    gw = app.state.gateway
    escaped: list[BaseException] = []

    async def watched(scope: Any, receive: Any, send: Any) -> None:
        try:
            await app(scope, receive, send)
        except BaseException as e:  # what uvicorn would log with a traceback
            escaped.append(e)
            raise

    caplog.set_level(logging.INFO, logger="tandem.edge.gateway")
    with running(watched) as url:
        with _sent(url, {"model": "sort", "prompt": HOLD, "stream": True}, rcvbuf=4096):
            assert _wait(lambda: paced.streams and paced.streams[0].closed_at, 10)
            assert _wait(lambda: gw.active == 0, 2)
        (stream,) = paced.streams
        # the send of the last chunk pulled blocked; the slot came free one timeout later
        held = stream.closed_at - stream.last_pull_at
        assert WRITE_TIMEOUT_S * 0.9 <= held < WRITE_TIMEOUT_S * 1.5
        assert stream.closed_early and stream.pulled < 1000
        assert escaped == []
        assert gw.cancelled == 1 and gw.errors == 0
        assert not [r for r in caplog.records if r.exc_info]  # no traceback logged
        assert any("took nothing for 1 s" in r.getMessage() for r in caplog.records)
        # the server goes on
        short = {"model": "sort", "prompt": PROMPT, "max_tokens": 2}
        assert _raw(url, "POST", "/v1/completions", short)[0] == 200


def test_the_gateway_refuses_a_bad_queue_configuration(runtime: EdgeRuntime) -> None:
    for bad in ({"max_queued": -1}, {"queue_timeout_s": -1.0}, {"write_timeout_s": 0.0}):
        with pytest.raises(ConfigError):
            create_app(runtime, **bad)


@pytest.mark.parametrize(
    ("flag", "said"),
    [
        ("--max-queued", "max_queued >= 0"),
        ("--queue-timeout-s", "max_queued >= 0"),
        ("--write-timeout-s", "write_timeout_s must be over 0"),
    ],
)
def test_the_cli_passes_the_limits_on(
    model_dir: Path, tmp_path: Path, flag: str, said: str
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"tasks": {"sort": _policy(model_dir)["tasks"]["sort"]}}))
    r = CliRunner().invoke(cli, ["gateway", "--policy", str(policy), "--port", "1", flag, "-1"])
    assert r.exit_code == 1  # refused before serving anything
    assert said in r.output  # by the gateway's own check: the value got there
