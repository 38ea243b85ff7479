"""A small HTTP server for operations: ``/metrics``, ``/health`` and ``/ready``.

(Over 500 lines: the accept thread, the handler and their bounds are one defence, read as one.)

Kubernetes probes and Prometheus speak HTTP; Tandem's data plane speaks ZeroMQ. This server sits
beside the ZeroMQ socket on its own port and answers three paths, read-only:

- ``GET /metrics``: the Prometheus text format of ``registry`` (OpenMetrics when the scraper's
  ``Accept`` asks for it), via ``prometheus_client``'s own encoder. Encoding reads every metric
  family under the GIL, beside the process's real work, so it is single-flight: scrapes that
  come while one is encoded wait for it and share its bytes (never bytes encoded before they
  came, at most the encode under way), and at most :data:`MAX_METRICS_REQUESTS` are served at
  once (more: 503).
- ``GET /health``: liveness, 200 while the process lives, with the JSON of ``health()`` if
  given; 503 with the same JSON when that says a ``"status"`` other than ``"ok"`` (a worker
  whose loop has stalled says ``"stalled"``).
- ``GET /ready``: readiness, 200 with the JSON of ``ready()`` when it says ready, else 503 with
  the same JSON (so a probe and a person read the same reason, e.g. ``{"state": "loading"}``).

It is built to stay up whatever a client does, like the ZeroMQ side. One accept thread holds,
in a selector, every connection whose request is still arriving: an idle or slow connection
costs a socket and its bytes so far, never a thread. A connection has
:data:`FIRST_BYTE_DEADLINE_S` to start and :data:`REQUEST_DEADLINE_S` in all to send its
request line and headers (at most :data:`MAX_REQUEST_BYTES`), or it is closed; at most
:data:`MAX_PENDING` wait so (:data:`MAX_PENDING_PER_CLIENT` from one client address), and
beyond that the oldest is closed, so a new connection always gets its turn. Once its request
is in, it is served on a thread of its own: at most :data:`MAX_CONNECTIONS` at once, of which
:data:`MAX_CONNECTIONS_PER_CLIENT` from one address (more are answered 503 and closed at once,
from the accept thread), each writing its response within :data:`_WRITE_TIMEOUT_S`. Only GET
and HEAD are served (405), other paths are 404; every response closes the connection (no
keep-alive to hold). Bodies are never read. Access logs go to ``logging`` at debug level,
never to stdout.

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
import selectors
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

MAX_CONNECTIONS = 32  # requests served at once (each on a thread); more get 503 and are closed
MAX_CONNECTIONS_PER_CLIENT = 8  # of those, from one client address
MAX_PENDING = 256  # connections whose request is still arriving (the oldest make room)
MAX_PENDING_PER_CLIENT = 64  # of those, from one client address (its oldest make room)
FIRST_BYTE_DEADLINE_S = 2.0  # for a new connection to send its first byte
REQUEST_DEADLINE_S = 5.0  # for a client to send its whole request line and headers
MAX_METRICS_REQUESTS = 4  # /metrics requests at once; more get 503
_METRICS_WAIT_S = 10.0  # the longest a scrape waits for the encode under way
_ACCEPT_POLL_S = 0.2  # the accept thread looks at its deadlines and the stop flag this often
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
    """The request as the accept thread received it (``prefix``), then the socket's receive
    side with one deadline and one byte budget for the whole request: each receive waits only
    for the time left, so a client that trickles bytes is cut off at the deadline, not after
    one timeout per byte."""

    def __init__(
        self, sock: socket.socket, deadline: float, max_bytes: int, prefix: bytes = b""
    ) -> None:
        self._sock = sock
        self._deadline = deadline
        self._left = max_bytes
        self._prefix = memoryview(prefix)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            raise _RequestTooLarge
        view = memoryview(buffer)[: self._left]
        if self._prefix:
            n = min(len(view), len(self._prefix))
            view[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
        else:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("request not received in time")
            self._sock.settimeout(remaining)
            n = self._sock.recv_into(view)
        self._left -= n
        return n


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves one request that the accept thread has received (``request`` is ``(socket,
    the bytes received)``) on a thread of its own."""

    server: _Server
    server_version = "tandem-ops"
    protocol_version = "HTTP/1.0"
    default_request_version = "HTTP/1.0"  # a garbage request line still gets a status line

    def setup(self) -> None:
        self.connection, prefix, deadline = self.request
        self.connection.setblocking(True)
        raw = _DeadlineSocketReader(self.connection, deadline, MAX_REQUEST_BYTES, prefix)
        self.rfile = io.BufferedReader(raw, buffer_size=4096)  # type: ignore[assignment]
        self.wfile = socket.SocketIO(self.connection, "wb")  # type: ignore[assignment]

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            self.wfile.flush()

    def handle(self) -> None:
        try:
            self.handle_one_request()
        except _RequestTooLarge:
            with contextlib.suppress(OSError):
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
        ops = self.server.ops
        if ops.registry is None:
            self._reply(404, b"metrics are off\n", "text/plain")
            return
        if not ops._metrics_slots.acquire(blocking=False):
            self._reply(503, b"busy: too many scrapes at once\n", "text/plain")
            return
        try:
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            body = ops._encodes.run(content_type, lambda: encoder(ops.registry))
        finally:
            ops._metrics_slots.release()
        if body is None:
            self._reply(503, b"metrics not encoded in time\n", "text/plain")
            return
        self._reply(200, body, content_type)

    def _health(self) -> None:
        body: dict[str, Any] = {"status": "ok"}
        health = self.server.ops.health
        if health is not None:
            try:
                body.update(health())
            except Exception:
                log.exception("ops http: health() failed")
        self._json(200 if body.get("status") == "ok" else 503, body)

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
        # the receive deadline's remainder is no time to write in: the client has its own
        self.connection.settimeout(_WRITE_TIMEOUT_S)
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


class _SingleFlight:
    """One computation per key at a time: a caller that comes while one runs waits for it and
    takes its result, so a flood of scrapes costs one encode at a time, and no caller gets a
    result computed before it came (at most the one under way when it came)."""

    def __init__(self, wait_s: float) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, tuple[threading.Event, list[bytes]]] = {}
        self._wait_s = wait_s

    def run(self, key: str, fn: Callable[[], bytes]) -> bytes | None:
        """``fn()``'s bytes, or None when the computation under way did not end within
        ``wait_s`` or failed (logged by the caller that ran it)."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = (threading.Event(), [])
        done, result = flight
        if not leader:
            done.wait(self._wait_s)
            return result[0] if result else None
        try:
            result.append(fn())
        except Exception:
            log.exception("ops http: encoding the metrics failed")
        finally:
            with self._lock:
                del self._flights[key]
            done.set()
        return result[0] if result else None


class _Pending:
    """A connection whose request has not all arrived: held by the accept thread's selector,
    not by a thread."""

    __slots__ = ("addr", "buf", "deadline", "host", "idle_until", "sock")

    def __init__(self, sock: socket.socket, addr: Any, now: float) -> None:
        self.sock = sock
        self.addr = addr
        self.host = str(addr[0])
        self.buf = b""
        self.idle_until = now + FIRST_BYTE_DEADLINE_S
        self.deadline = now + REQUEST_DEADLINE_S

    def complete(self) -> bool:
        """The request line and headers are in (or enough to answer: too long, or a request
        line the handler refuses before it reads headers)."""
        buf = self.buf
        if len(buf) > MAX_REQUEST_BYTES or b"\n\r\n" in buf or b"\n\n" in buf:
            return True
        line, newline, _ = buf.partition(b"\n")
        if not newline:
            return len(line) > MAX_REQUEST_LINE
        return len(line.split()) < 3  # blank or garbage: answered (or closed) at once


class _Server(socketserver.TCPServer):
    """The accept thread: one selector over the listening socket and every connection whose
    request is still arriving. A connection gets a thread (and one of :data:`MAX_CONNECTIONS`
    slots) only once its whole request is in, so idle or slow connections cost a socket and
    at most :data:`MAX_REQUEST_BYTES` each, never a slot."""

    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], ops: OpsHttpServer) -> None:
        self.ops = ops
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._lock = threading.Lock()
        self._serving: dict[str, int] = {}  # client host -> connections on threads
        self._pending: dict[int, _Pending] = {}  # by fileno, oldest first
        self._stopping = threading.Event()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:  # skip HTTPServer's getfqdn(): a DNS lookup at start
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def serve(self) -> None:
        self.socket.setblocking(False)
        with selectors.DefaultSelector() as sel:
            sel.register(self.socket, selectors.EVENT_READ)
            try:
                while not self._stopping.is_set():
                    for key, _ in sel.select(_ACCEPT_POLL_S):
                        if key.data is None:
                            self._accept(sel)
                        else:
                            self._receive(sel, key.data)
                    self._expire(sel, time.monotonic())
            finally:
                for p in list(self._pending.values()):
                    self._drop(sel, p)

    def stop(self) -> None:
        self._stopping.set()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        for _ in range(self.request_queue_size):
            try:
                sock, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of file descriptors, a reset before accept: try later
                log.debug("ops http: accept failed", exc_info=True)
                return
            sock.setblocking(False)
            p = _Pending(sock, addr, time.monotonic())
            # the newest connection always gets its turn: the oldest of its client's (or of
            # all, beyond MAX_PENDING) make room
            mine = [q for q in self._pending.values() if q.host == p.host]
            if len(mine) >= MAX_PENDING_PER_CLIENT:
                self._drop(sel, mine[0])
            if len(self._pending) >= MAX_PENDING:
                self._drop(sel, next(iter(self._pending.values())))
            self._pending[sock.fileno()] = p
            sel.register(sock, selectors.EVENT_READ, p)

    def _receive(self, sel: selectors.BaseSelector, p: _Pending) -> None:
        try:
            data = p.sock.recv(MAX_REQUEST_BYTES + 1 - len(p.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(sel, p)
            return
        if not data:  # the client left (or half-closed) before a whole request
            if p.buf:
                self._dispatch(sel, p)
            else:
                self._drop(sel, p)
            return
        p.buf += data
        if p.complete():
            self._dispatch(sel, p)

    def _expire(self, sel: selectors.BaseSelector, now: float) -> None:
        # accepted in order, so both deadlines rise along the table
        for p in list(self._pending.values()):
            if now >= p.deadline or (not p.buf and now >= p.idle_until):
                log.debug("ops http: no whole request in time from %s", p.addr)
                self._drop(sel, p)
            elif now < p.idle_until:
                return

    def _forget(self, sel: selectors.BaseSelector, p: _Pending) -> None:
        self._pending.pop(p.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(p.sock)

    def _drop(self, sel: selectors.BaseSelector, p: _Pending) -> None:
        self._forget(sel, p)
        self.shutdown_request(p.sock)

    def _dispatch(self, sel: selectors.BaseSelector, p: _Pending) -> None:
        self._forget(sel, p)
        with self._lock:
            mine = self._serving.get(p.host, 0)
            ok = mine < MAX_CONNECTIONS_PER_CLIENT and self._slots.acquire(blocking=False)
            if ok:
                self._serving[p.host] = mine + 1
        if not ok:
            with contextlib.suppress(OSError):
                p.sock.settimeout(0.2)
                p.sock.sendall(_BUSY_RESPONSE)
            self.shutdown_request(p.sock)
            return
        t = threading.Thread(
            target=self._serve_one, args=(p,), name="ops-http-request", daemon=True
        )
        try:
            t.start()
        except BaseException:
            self._release(p.host)
            self.shutdown_request(p.sock)
            raise

    def _serve_one(self, p: _Pending) -> None:
        try:
            _Handler((p.sock, p.buf, p.deadline), p.addr, self)
        except Exception:
            log.debug("ops http: error serving %s", p.addr, exc_info=True)
        finally:
            self.shutdown_request(p.sock)
            self._release(p.host)

    def _release(self, host: str) -> None:
        with self._lock:
            n = self._serving.pop(host, 1) - 1
            if n > 0:
                self._serving[host] = n
            self._slots.release()


def _not_ready() -> tuple[bool, dict[str, Any]]:
    return False, {"state": "starting"}


class OpsHttpServer:
    """GET /metrics (Prometheus text format from ``registry``), /health (200 while the process
    lives: liveness; 503 when ``health()`` says a ``"status"`` other than ``"ok"``), /ready (200 with JSON when ``ready()`` says so, else 503 with the same
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
        self._metrics_slots = threading.BoundedSemaphore(MAX_METRICS_REQUESTS)
        self._encodes = _SingleFlight(_METRICS_WAIT_S)
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
            target=self._server.serve,
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
        server.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        server.server_close()

    def __enter__(self) -> OpsHttpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
