"""Structured logs: one JSON object per line, each naming the request it was written for.

``tandem cloud serve --log-format json`` (and the other commands that serve) install
:class:`JsonFormatter` through :func:`configure_logging`. A line holds ``ts`` (UTC, ISO 8601
with microseconds), ``level``, ``logger``, ``message``, the record's extras (our log calls pass
``extra={...}``; a value that is not JSON becomes its ``repr``, so no extra can make logging
fail), ``exception`` (the traceback, as a string) when there is one, and — while a request is
being handled — ``request_id`` (32 hex digits, the id the request has on the wire: the same
on the edge and the worker) and, when it is traced, ``trace_id`` and ``span_id``.

The request comes from :data:`CURRENT_REQUEST`, a :class:`contextvars.ContextVar` that the
worker sets to the envelope it is handling (on its loop thread, for the time of one message)
and the edge to the request it is escalating. It holds anything with an ``id`` (16 bytes) and a
``trace`` (the envelope's W3C ``(traceparent, tracestate)`` or None): setting it is one
``ContextVar.set``, and the hex and JSON work happens only when a line is written.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
from typing import IO, Any, NamedTuple

from tandem.runtime import tracing

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The request being handled in this context (see the module docstring); None: none.
CURRENT_REQUEST: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "tandem_request", default=None
)


class RequestTag(NamedTuple):
    """What :data:`CURRENT_REQUEST` needs, for code that holds no envelope."""

    id: bytes
    trace: tuple[str, str] | None = None


# The attributes every LogRecord has: whatever else a record holds came from ``extra``.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


def request_fields() -> dict[str, str]:
    """``request_id``, ``trace_id`` and ``span_id`` of the request this context handles (those
    that are known)."""
    out: dict[str, str] = {}
    req = CURRENT_REQUEST.get()
    trace = None
    if req is not None:
        rid = getattr(req, "id", None)
        if isinstance(rid, bytes):
            out["request_id"] = rid.hex()
        trace = getattr(req, "trace", None)
    ids = tracing.current_ids()  # the edge: a span is current
    if ids is not None:
        out["trace_id"], out["span_id"] = ids
    elif trace is not None:  # the worker: the caller's span, from the wire
        out["trace_id"], out["span_id"] = trace[0][3:35], trace[0][36:52]
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="microseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(request_fields())
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        try:
            return json.dumps(out, default=_fallback, ensure_ascii=False)
        except (TypeError, ValueError):  # e.g. a circular value, a non-str key: repr it all
            safe = {str(k): _jsonable(v) for k, v in out.items()}
            return json.dumps(safe, default=_fallback, ensure_ascii=False)


def _fallback(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value, default=_fallback)
        return value
    except (TypeError, ValueError):
        return repr(value)


def configure_logging(
    level: str | int = "info", fmt: str = "text", stream: IO[str] | None = None
) -> logging.Handler:
    """Log to ``stream`` (default stderr) at ``level`` as ``fmt`` (``text`` or ``json``),
    replacing the root logger's handlers. Returns the handler installed. Raises ValueError
    for an unknown level or format."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    lvl = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(lvl, int):
        raise ValueError(f"unknown log level {level!r}: debug, info, warning or error")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(lvl)
    return handler
