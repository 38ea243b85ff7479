"""A small HTTP server for operations: ``/metrics``, ``/health`` and ``/ready``.

Kubernetes probes and Prometheus speak HTTP; Tandem's data plane speaks ZeroMQ. This server sits
beside the ZeroMQ socket on its own port and answers three paths, read-only:

- ``GET /metrics``: the Prometheus text format of ``registry`` (OpenMetrics when the scraper's
  ``Accept`` asks for it), via ``prometheus_client``'s own encoder.
- ``GET /health``: liveness, 200 while the process lives (the JSON of ``health()`` if given).
- ``GET /ready``: readiness, 200 with the JSON of ``ready()`` when it says ready, else 503 with
  the same JSON (so a probe and a person read the same reason, e.g. ``{"state": "loading"}``).

It is built to stay up whatever a client does, like the ZeroMQ side: at most
:data:`MAX_CONNECTIONS` connections are served at once (more are answered 503 and closed at
once, from the accept thread); a connection has :data:`REQUEST_DEADLINE_S` in all to send its
request (a slow client cannot hold a thread: each receive waits only for the time left) and at
most :data:`MAX_REQUEST_BYTES` of request line and headers; only GET and HEAD are served (405),
other paths are 404; every response closes the connection (no keep-alive to hold). Bodies are
never read. Access logs go to ``logging`` at debug level, never to stdout.

The metrics carry no request data (counts and timings only) and are not authenticated, like
llama.cpp's and vLLM's; a bind that is not loopback is logged as a warning.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import ipaddress
import json
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from tandem.runtime.errors import ConfigError

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 32  # served at once; more get 503 and are closed
REQUEST_DEADLINE_S = 5.0  # for a client to send its whole request line and headers
MAX_REQUEST_BYTES = 16 * 1024  # request line plus headers
MAX_REQUEST_LINE = 4096  # bytes
_WRITE_TIMEOUT_S = 5.0  # for a client to take a response
_BUSY_RESPONSE = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 5\r\nConnection: close\r\n\r\nbusy\n"
)

ReadyFn = Callable[[], tuple[bool, dict[str, Any]]]
HealthFn = Callable[[], dict[str, Any]]


def parse_bind(bind: str) -> tuple[str, int]:
    """``"HOST:PORT"``, ``"[::1]:9100"`` or ``":9100"`` (every interface) as ``(host, port)``.

    Raises ConfigError when it is not one of those or the port is not in 0..65535 (0: any free
    port)."""
    if not isinstance(bind, str) or len(bind) > 300:
        raise ConfigError(f"http bind {bind!r}: expected 'HOST:PORT', '[IPV6]:PORT' or ':PORT'")
    host, sep, port_text = bind.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(
            f"http bind {bind!r}: expected 'HOST:PORT', '[IPV6]:PORT' or ':PORT' "
            "with PORT in 0..65535"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"http bind {bind!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host or any(c.isspace() for c in host):
        raise ConfigError(f"http bind {bind!r}: write an IPv6 host in brackets, '[::1]:9100'")
    return host or "0.0.0.0", int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _RequestTooLarge(Exception):
    pass


class _DeadlineSocketReader(io.RawIOBase):
    """A socket's receive side with one deadline and one byte budget for the whole request: each
    receive waits only for the time left, so a client that trickles bytes is cut off at the
    deadline, not after one timeout per byte."""

    def __init__(self, sock: socket.socket, deadline: float, max_bytes: int) -> None:
        self._sock = sock
        self._deadline = deadline
        self._left = max_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            raise _RequestTooLarge
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request not received in time")
        self._sock.settimeout(remaining)
        view = memoryview(buffer)[: self._left]
        n = self._sock.recv_into(view)
        self._left -= n
        return n


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    server_version = "tandem-ops"
    protocol_version = "HTTP/1.0"
    default_request_version = "HTTP/1.0"  # a garbage request line still gets a status line

    def setup(self) -> None:
        self.connection = self.request
        self.connection.settimeout(_WRITE_TIMEOUT_S)
        deadline = time.monotonic() + REQUEST_DEADLINE_S
        raw = _DeadlineSocketReader(self.connection, deadline, MAX_REQUEST_BYTES)
        self.rfile = io.BufferedReader(raw, buffer_size=4096)  # type: ignore[assignment]
        self.wfile = socket.SocketIO(self.connection, "wb")  # type: ignore[assignment]

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            self.wfile.flush()

    def handle(self) -> None:
        try:
            self.handle_one_request()
        except _RequestTooLarge:
            self._reply(431, b"request too large\n", "text/plain")
        except (TimeoutError, OSError) as e:
            log.debug("ops http: %s from %s", type(e).__name__, self.client_address)
        self.close_connection = True

    def handle_one_request(self) -> None:
        self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if not self.raw_requestline:
            return
        if len(self.raw_requestline) > MAX_REQUEST_LINE:
            self.requestline = ""
            self.request_version = "HTTP/1.0"
            self.command = None  # type: ignore[assignment]
            self._reply(414, b"request line too long\n", "text/plain")
            return
        if not self.parse_request():  # answers 400/431/505 itself
            return
        self.close_connection = True
        if self.command not in ("GET", "HEAD"):
            self._reply(405, b"method not allowed\n", "text/plain", {"Allow": "GET, HEAD"})
            return
        path = urlsplit(self.path).path
        if path == "/metrics":
            self._metrics()
        elif path == "/health":
            self._health()
        elif path == "/ready":
            self._ready()
        else:
            self._reply(404, b"not found: try /metrics, /health or /ready\n", "text/plain")

    def _metrics(self) -> None:
        registry = self.server.ops.registry
        if registry is None:
            self._reply(404, b"metrics are off\n", "text/plain")
            return
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        self._reply(200, encoder(registry), content_type)

    def _health(self) -> None:
        body: dict[str, Any] = {"status": "ok"}
        health = self.server.ops.health
        if health is not None:
            try:
                body.update(health())
            except Exception:
                log.exception("ops http: health() failed")
        self._json(200, body)

    def _ready(self) -> None:
        try:
            ok, body = self.server.ops.ready()
        except Exception:
            log.exception("ops http: ready() failed")
            ok, body = False, {"state": "error"}
        self._json(200 if ok else 503, body)

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, default=str, sort_keys=True).encode() + b"\n"
        self._reply(status, data, "application/json")

    def _reply(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def version_string(self) -> str:
        return self.server_version

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's error page, as one line of plain text."""
        self.close_connection = True
        text = message or self.responses.get(code, ("error",))[0]
        self._reply(code, text.encode("ascii", "replace") + b"\n", "text/plain")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("ops http %s: " + format, self.client_address[0], *args)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], ops: OpsHttpServer) -> None:
        self.ops = ops
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:  # skip HTTPServer's getfqdn(): a DNS lookup at start
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.settimeout(0.2)
                request.sendall(_BUSY_RESPONSE)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("ops http: error serving %s", client_address, exc_info=True)


def _not_ready() -> tuple[bool, dict[str, Any]]:
    return False, {"state": "starting"}


class OpsHttpServer:
    """GET /metrics (Prometheus text format from ``registry``), /health (200 while the process
    lives: liveness), /ready (200 with JSON when ``ready()`` says so, else 503 with the same
    JSON).

    ``ready`` and ``health`` are plain attributes, replaceable after :meth:`start` (e.g. once
    the models are loaded). Without ``ready``, /ready answers 503 ``{"state": "starting"}``;
    without ``registry``, /metrics answers 404."""

    def __init__(
        self,
        bind: str = "127.0.0.1:0",
        *,
        registry: CollectorRegistry | None = None,
        ready: ReadyFn | None = None,
        health: HealthFn | None = None,
    ) -> None:
        self._bind = parse_bind(bind)
        self.registry = registry
        self.ready: ReadyFn = ready or _not_ready
        self.health = health
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> OpsHttpServer:
        """Binds and serves on a daemon thread. Raises ConfigError if the address cannot be
        bound (in use, not this host's)."""
        if self._server is not None:
            return self
        try:
            self._server = _Server(self._bind, self)
        except OSError as e:
            raise ConfigError(f"http bind {self._bind[0]}:{self._bind[1]}: {e}") from e
        host, port = self.address
        if not is_loopback(host):
            log.warning(
                "ops http on %s:%d is reachable beyond this host and unauthenticated "
                "(metrics carry counts and timings, no request data); firewall it if needed",
                host,
                port,
            )
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"ops-http-{port}",
            daemon=True,
        )
        self._thread.start()
        log.info("ops http serving /metrics /health /ready on %s", self.url)
        return self

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)`` (the real port when bound to port 0)."""
        if self._server is None:
            return self._bind
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def close(self) -> None:
        """Stops serving and closes the listening socket; idempotent. Connections being served
        finish on their daemon threads (each has a deadline)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> OpsHttpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
