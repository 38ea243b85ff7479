"""The ops HTTP server (/metrics, /health, /ready) over real HTTP on loopback, and what a
misbehaving client cannot do to it: slow or idle clients, too many connections (from one
address or many), scrape floods, garbage, other methods, huge headers. After each abuse the
server still answers. Clients from other addresses bind a source in 127.0.0.0/8."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from tandem.runtime import ops_http
from tandem.runtime.errors import ConfigError
from tandem.runtime.ops_http import OpsHttpServer, parse_bind


@pytest.fixture
def registry() -> CollectorRegistry:
    r = CollectorRegistry()
    Counter("tandem_test_things", "Things", ["kind"], registry=r).labels("a").inc(3)
    return r


@pytest.fixture
def server(registry: CollectorRegistry) -> Iterator[OpsHttpServer]:
    with OpsHttpServer(registry=registry) as s:
        yield s


def get(
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout_s: float = 5.0,
) -> tuple:
    """(status, headers, body) of one request; an HTTP error status is returned, not raised."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def raw(server: OpsHttpServer, data: bytes, *, timeout_s: float = 5.0) -> bytes:
    """Send raw bytes on a fresh connection; what comes back until the server closes."""
    with socket.create_connection(server.address, timeout=timeout_s) as s:
        s.sendall(data)
        return recv_all(s)


def recv_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            part = s.recv(65536)
        except ConnectionResetError:
            return out
        if not part:
            return out
        out += part


def assert_serving(server: OpsHttpServer) -> None:
    status, _, body = get(server.url + "/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})


# --- parse_bind ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bind", "want"),
    [
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("[::1]:9100", ("::1", 9100)),
        (":9100", ("0.0.0.0", 9100)),
        ("localhost:0", ("localhost", 0)),
        ("metrics.internal:65535", ("metrics.internal", 65535)),
    ],
)
def test_parse_bind(bind: str, want: tuple[str, int]) -> None:
    assert parse_bind(bind) == want


@pytest.mark.parametrize(
    "bind",
    ["", "9100", "host:", "host:port", "host:65536", "::1:9100", "[nope]:1", "a b:1", "h:-1"],
)
def test_parse_bind_refuses(bind: str) -> None:
    with pytest.raises(ConfigError, match="http bind"):
        parse_bind(bind)


# --- the three paths -------------------------------------------------------------------------


def test_metrics_in_prometheus_text_format(server: OpsHttpServer) -> None:
    status, headers, body = get(server.url + "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    family = families["tandem_test_things"]
    assert [(s.labels, s.value) for s in family.samples if s.name.endswith("_total")] == [
        ({"kind": "a"}, 3.0)
    ]


def test_metrics_in_openmetrics_when_asked(server: OpsHttpServer) -> None:
    accept = "application/openmetrics-text; version=1.0.0,text/plain;q=0.5"
    status, headers, body = get(server.url + "/metrics", headers={"Accept": accept})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_metrics_off_is_404() -> None:
    with OpsHttpServer() as s:
        assert get(s.url + "/metrics")[0] == 404


def test_health_is_live_and_says_what_health_returns(server: OpsHttpServer) -> None:
    assert_serving(server)
    server.health = lambda: {"uptime_s": 1.5}
    status, headers, body = get(server.url + "/health?verbose=1")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"status": "ok", "uptime_s": 1.5}


def test_ready_follows_the_callable_set_after_start(server: OpsHttpServer) -> None:
    status, _, body = get(server.url + "/ready")
    assert (status, json.loads(body)) == (503, {"state": "starting"})
    state = {"ready": False}
    server.ready = lambda: (state["ready"], {"state": "serving" if state["ready"] else "loading"})
    assert get(server.url + "/ready")[0] == 503
    state["ready"] = True
    status, _, body = get(server.url + "/ready")
    assert (status, json.loads(body)) == (200, {"state": "serving"})


def test_a_failing_callable_is_an_answer_not_a_crash(server: OpsHttpServer) -> None:
    def broken() -> Any:
        raise RuntimeError("bug")

    server.ready = broken
    server.health = broken
    status, _, body = get(server.url + "/ready")
    assert (status, json.loads(body)) == (503, {"state": "error"})
    assert_serving(server)


def test_head_has_headers_and_no_body(server: OpsHttpServer) -> None:
    status, headers, body = get(server.url + "/metrics", method="HEAD")
    assert status == 200 and int(headers["Content-Length"]) > 0 and body == b""


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "BREW"])
def test_other_methods_are_405(server: OpsHttpServer, method: str) -> None:
    status, headers, _ = get(server.url + "/metrics", method=method)
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert_serving(server)


@pytest.mark.parametrize("path", ["/", "/metrics/x", "/../etc/passwd", "/healthz", "/%00"])
def test_other_paths_are_404(server: OpsHttpServer, path: str) -> None:
    assert get(server.url + path)[0] == 404


def test_no_access_log_on_stdout(
    server: OpsHttpServer, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="tandem.runtime.ops_http"):
        get(server.url + "/health")
        get(server.url + "/nope")
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert any("/nope" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)


def test_non_loopback_bind_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING), OpsHttpServer("0.0.0.0:0") as s:
        assert s.url.startswith("http://127.0.0.1:")
        assert_serving(s)
    assert any("unauthenticated" in r.getMessage() for r in caplog.records)


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        s = OpsHttpServer("[::1]:0").start()
    except ConfigError:
        pytest.skip("::1 cannot be bound here")
    with s:
        assert s.url.startswith("http://[::1]:")
        assert_serving(s)


def test_port_in_use_is_a_config_error(server: OpsHttpServer) -> None:
    host, port = server.address
    with pytest.raises(ConfigError, match=f"http bind 127.0.0.1:{port}"):
        OpsHttpServer(f"{host}:{port}").start()


def test_close_is_idempotent_and_frees_the_port() -> None:
    s = OpsHttpServer().start()
    port = s.address[1]
    s.close()
    s.close()
    with OpsHttpServer(f"127.0.0.1:{port}") as again:
        assert_serving(again)


# --- abuse -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff\xfe garbage\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /health HTTP/9.9\r\n\r\n",
        b"GET /health HTTP/1.1\r\nbad header line\r\n\r\n",
        b"\r\n",
    ],
)
def test_garbage_request_is_answered_or_closed(server: OpsHttpServer, garbage: bytes) -> None:
    reply = raw(server, garbage)
    assert reply == b"" or reply.startswith(b"HTTP/1.0 ")  # a status, never a hang or crash
    assert_serving(server)


def test_request_line_too_long_is_414(server: OpsHttpServer) -> None:
    reply = raw(server, b"GET /" + b"a" * (ops_http.MAX_REQUEST_LINE + 10) + b" HTTP/1.1\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 414")
    assert_serving(server)


def test_huge_headers_are_431(server: OpsHttpServer) -> None:
    header = b"X-Big: " + b"a" * 3000 + b"\r\n"
    reply = raw(server, b"GET /metrics HTTP/1.1\r\n" + header * 20 + b"\r\n")
    assert reply.startswith(b"HTTP/1.0 431")
    assert_serving(server)


def test_many_small_headers_are_refused(server: OpsHttpServer) -> None:
    reply = raw(server, b"GET /metrics HTTP/1.1\r\n" + b"A: b\r\n" * 200 + b"\r\n")
    assert reply.startswith(b"HTTP/1.0 431")
    assert_serving(server)


def test_slow_client_is_cut_off_at_the_deadline(
    server: OpsHttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that trickles a byte at a time never completes a request; it is closed once
    the request deadline has passed, not after one socket timeout per byte."""
    monkeypatch.setattr(ops_http, "REQUEST_DEADLINE_S", 0.5)
    with socket.create_connection(server.address, timeout=5) as s:
        closed_after = None
        started = time.monotonic()
        for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 200:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - started
                break
            time.sleep(0.05)
            s.setblocking(False)
            try:
                if s.recv(1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed_after = time.monotonic() - started
                break
            finally:
                s.setblocking(True)
    assert closed_after is not None, "the slow client was never cut off"
    assert_serving(server)


def test_idle_connections_hold_no_slot_and_are_closed(server: OpsHttpServer) -> None:
    """More idle connections than slots, from one address, sending nothing: /health is still
    answered (from that address too), and every idle connection is closed after the first-byte
    deadline."""
    idle = [socket.create_connection(server.address, timeout=10) for _ in range(40)]
    try:
        status, _, body = get(server.url + "/health", timeout_s=3)
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        assert [recv_all(s) for s in idle] == [b""] * len(idle)  # closed, nothing said
    finally:
        for s in idle:
            s.close()
    assert_serving(server)


def test_one_clients_waiting_connections_are_bounded(
    server: OpsHttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond MAX_PENDING_PER_CLIENT waiting connections from one address, its oldest are
    closed: the newest always gets its turn."""
    monkeypatch.setattr(ops_http, "MAX_PENDING_PER_CLIENT", 4)
    monkeypatch.setattr(ops_http, "FIRST_BYTE_DEADLINE_S", 30.0)
    monkeypatch.setattr(ops_http, "REQUEST_DEADLINE_S", 30.0)
    idle = [socket.create_connection(server.address, timeout=10) for _ in range(6)]
    try:
        assert recv_all(idle[0]) == b"" and recv_all(idle[1]) == b""
        idle[5].sendall(b"GET /health HTTP/1.0\r\n\r\n")
        assert recv_all(idle[5]).startswith(b"HTTP/1.0 200")
    finally:
        for s in idle:
            s.close()


class Gate:
    """A ready() that holds its request's thread until released; counts those it holds."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.held = 0

    def __call__(self) -> tuple[bool, dict[str, Any]]:
        with self.lock:
            self.held += 1
        self.release.wait(30)
        return True, {"state": "serving"}

    def wait_held(self, n: int) -> None:
        deadline = time.monotonic() + 20
        while self.held < n:
            assert time.monotonic() < deadline, f"{self.held} of {n} requests held"
            time.sleep(0.02)


def request_from(
    server: OpsHttpServer, source: str, path: str, out: list[bytes] | None = None
) -> bytes:
    """GET ``path`` from the loopback address ``source`` (a client of its own)."""
    with socket.create_connection(server.address, timeout=30, source_address=(source, 0)) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        reply = recv_all(s)
    if out is not None:
        out.append(reply)
    return reply


def hold(server: OpsHttpServer, sources: list[str], out: list[bytes]) -> list[threading.Thread]:
    threads = [
        threading.Thread(target=request_from, args=(server, src, "/ready", out)) for src in sources
    ]
    for t in threads:
        t.start()
    return threads


def test_requests_over_the_bound_get_503_and_the_server_recovers(server: OpsHttpServer) -> None:
    """MAX_CONNECTIONS requests being served hold every slot; one more is answered 503 at once;
    once they are done the server answers again."""
    gate = Gate()
    server.ready = gate
    per = ops_http.MAX_CONNECTIONS_PER_CLIENT
    sources = [f"127.0.0.{2 + i // per}" for i in range(ops_http.MAX_CONNECTIONS)]
    out: list[bytes] = []
    threads = hold(server, sources, out)
    try:
        gate.wait_held(ops_http.MAX_CONNECTIONS)
        reply = request_from(server, "127.0.0.100", "/health")
        assert reply.startswith(b"HTTP/1.0 503") and reply.endswith(b"busy\n")
    finally:
        gate.release.set()
        for t in threads:
            t.join(30)
    assert len(out) == ops_http.MAX_CONNECTIONS
    assert all(r.startswith(b"HTTP/1.0 200") for r in out)
    assert_serving(server)


def test_one_client_gets_at_most_its_share_of_slots(server: OpsHttpServer) -> None:
    gate = Gate()
    server.ready = gate
    out: list[bytes] = []
    threads = hold(server, ["127.0.0.1"] * ops_http.MAX_CONNECTIONS_PER_CLIENT, out)
    try:
        gate.wait_held(ops_http.MAX_CONNECTIONS_PER_CLIENT)
        assert request_from(server, "127.0.0.1", "/health").startswith(b"HTTP/1.0 503")
        assert request_from(server, "127.0.0.2", "/health").startswith(b"HTTP/1.0 200")
    finally:
        gate.release.set()
        for t in threads:
            t.join(30)
    assert all(r.startswith(b"HTTP/1.0 200") for r in out)
    assert_serving(server)


def test_health_that_says_not_ok_is_503(server: OpsHttpServer) -> None:
    server.health = lambda: {"status": "stalled", "loop_idle_s": 61.5}
    status, _, body = get(server.url + "/health")
    assert (status, json.loads(body)) == (503, {"status": "stalled", "loop_idle_s": 61.5})


class CountingCollector:
    """A collector whose collect() counts its calls (the gauge says which call made it) and
    takes ``delay_s``, or waits for ``gate`` when set."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls = 0
        self.delay_s = delay_s
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.lock = threading.Lock()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self.lock:
            self.calls += 1
            n = self.calls
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        time.sleep(self.delay_s)
        yield GaugeMetricFamily("tandem_test_collect_call", "Which collect() made this", n)


def call_number(body: bytes) -> float:
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    return families["tandem_test_collect_call"].samples[0].value


def test_scrapes_share_one_encode_and_never_get_old_bytes() -> None:
    counting = CountingCollector(delay_s=0.2)
    r = CollectorRegistry()
    r.register(counting)  # type: ignore[arg-type]
    with OpsHttpServer(registry=r) as s:
        # one at a time: each scrape gets an encode that began after it came
        seen = [call_number(get(s.url + "/metrics")[2]) for _ in range(3)]
        assert seen == [1.0, 2.0, 3.0]
        ok: list[int] = []
        start = threading.Barrier(16)

        def scrape() -> None:
            start.wait(10)
            for _ in range(200):
                if get(s.url + "/metrics")[0] == 200:
                    ok.append(1)
                    return
                time.sleep(0.01)

        threads = [threading.Thread(target=scrape) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        encodes = counting.calls - 3
    assert len(ok) == 16
    assert 1 <= encodes <= len(ok) // 2, f"{encodes} encodes for {len(ok)} scrapes"


def test_scrapes_at_once_are_bounded() -> None:
    """While an encode hangs, MAX_METRICS_REQUESTS scrapes wait for it and more are 503."""
    counting = CountingCollector()
    counting.gate = threading.Event()
    r = CollectorRegistry()
    r.register(counting)  # type: ignore[arg-type]
    n = ops_http.MAX_METRICS_REQUESTS + 6
    with OpsHttpServer(registry=r) as s:
        statuses: list[int] = []

        def scrape() -> None:
            statuses.append(get(s.url + "/metrics")[0])

        threads = [threading.Thread(target=scrape) for _ in range(n)]
        try:
            for t in threads:
                t.start()
            assert counting.entered.wait(20)
            deadline = time.monotonic() + 20
            while statuses.count(503) < n - ops_http.MAX_METRICS_REQUESTS:
                assert time.monotonic() < deadline, f"statuses so far: {statuses}"
                time.sleep(0.02)
            assert_serving(s)  # the other paths are still served
        finally:
            counting.gate.set()
            for t in threads:
                t.join(30)
    assert sorted(statuses) == [200] * ops_http.MAX_METRICS_REQUESTS + [503] * (
        n - ops_http.MAX_METRICS_REQUESTS
    )
    assert counting.calls == 1


def test_many_concurrent_scrapes_all_answered(server: OpsHttpServer) -> None:
    """More clients than slots, each retrying a 503: every one gets its metrics."""
    results: list[int] = []

    def scrape() -> None:
        for _ in range(500):
            status = get(server.url + "/metrics")[0]
            if status == 200:
                results.append(status)
                return
            time.sleep(0.02)

    threads = [threading.Thread(target=scrape) for _ in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [200] * 48


def test_a_client_that_never_reads_does_not_hold_the_server(server: OpsHttpServer) -> None:
    with socket.create_connection(server.address) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n" * 3)
        assert_serving(server)
