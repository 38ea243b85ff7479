"""Tandem's error hierarchy.

Every error has a stable string ``code``. Errors cross the wire as ``{code, message}`` and are
raised again on the other side as the same class (:func:`error_from_wire`), so a caller can
``except DeadlineExceeded`` whether the deadline passed locally or on the worker.
"""

from __future__ import annotations

from typing import Any, ClassVar


class TandemError(Exception):
    """Base class of every error Tandem raises on purpose."""

    code: ClassVar[str] = "internal"
    # Attributes that travel with the error (besides code and message) and are set again on the
    # other side, e.g. OverloadedError.retry_after_ms. Values must be msgpack-able scalars.
    wire_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, message: str = "", **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        for name in self.wire_fields:
            setattr(self, name, fields.pop(name, getattr(type(self), name, None)))
        if fields:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(fields)}")

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        for name in self.wire_fields:
            out[name] = getattr(self, name)
        return out


class ConfigError(TandemError):
    """A config or policy file is invalid. The message names the file, the key and what was
    expected."""

    code = "config"


class WireError(TandemError):
    """A message broke the wire protocol. Subclasses say how. ``request_id`` is the id of the
    offending request when its header could be read (so the sender can be answered)."""

    code = "wire"
    request_id: bytes | None = None


class MalformedMessage(WireError):
    """Not a valid msgpack envelope (random bytes, truncated input, wrong field types)."""

    code = "wire.malformed"


class UnsupportedVersion(WireError):
    code = "wire.version"


class UnknownKind(WireError):
    code = "wire.kind"


class BadArray(WireError):
    """An encoded array has a dtype outside the allow-list or a shape that does not match its
    buffer."""

    code = "wire.array"


class LimitExceeded(WireError):
    """A message is over a configured limit (bytes, array elements, nesting, tags, frames)."""

    code = "wire.limit"


class DeadlineExceeded(TandemError):
    code = "deadline_exceeded"


class ShuttingDown(TandemError):
    """The worker is draining: in-flight work finishes, new work is refused."""

    code = "shutting_down"


class OverloadedError(TandemError):
    """The worker's queues are full: nothing was run. Retry after ``retry_after_ms`` (the
    worker's estimate of when its queue will have drained), or elsewhere."""

    code = "overloaded"
    wire_fields = ("retry_after_ms",)
    retry_after_ms: float = 0.0


class Unavailable(TandemError):
    """The cloud could not be reached (no connection, or no reply before the deadline)."""

    code = "unavailable"


class BackendError(TandemError):
    """A model backend failed to load or run."""

    code = "backend"


class BackendFailure(BackendError):
    """A backend raised while running a request (``exception``: the class it raised). The
    worker answered with this and kept serving."""

    code = "backend.error"
    wire_fields = ("exception",)
    exception: str = ""


class UnknownModel(TandemError):
    code = "unknown_model"


class BadRequest(TandemError):
    """A well-formed envelope whose payload does not fit the request (wrong input shape...)."""

    code = "bad_request"


class SessionLost(TandemError):
    """A ``verify`` named a speculative session this worker does not hold (never made, expired,
    evicted, or ahead of what the edge sent): send the whole prefix again."""

    code = "session_lost"


class StreamInterrupted(TandemError):
    """A generation stream lost its worker after its first chunk: the tokens received so far
    (``tokens``) are the answer's start. Finish it elsewhere (e.g. another worker, or the edge
    model, given ``prompt + text so far``); no END will come."""

    code = "stream.interrupted"
    wire_fields = ("tokens",)
    tokens: int = 0


def _all_subclasses(cls: type[TandemError]) -> list[type[TandemError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def error_class(code: str) -> type[TandemError]:
    """The class registered for ``code``; unknown codes map to the nearest known parent
    (``wire.future`` → :class:`WireError`) or :class:`TandemError`."""
    by_code = {c.code: c for c in _all_subclasses(TandemError)}
    while code:
        if code in by_code:
            return by_code[code]
        code = code.rpartition(".")[0]
    return TandemError


def error_from_wire(payload: dict[str, Any]) -> TandemError:
    """The error an ``error`` envelope's payload ``{code, message, ...}`` describes. Unknown or
    mistyped extra fields are ignored: a newer peer may send more."""
    cls = error_class(str(payload.get("code", "internal")))
    err = cls(str(payload.get("message", "")))
    for name in cls.wire_fields:
        value = payload.get(name)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            setattr(err, name, value)
    return err
