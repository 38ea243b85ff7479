"""Tandem's error hierarchy.

Every error has a stable string ``code``. Errors cross the wire as ``{code, message}`` and are
raised again on the other side as the same class (:func:`error_from_wire`), so a caller can
``except DeadlineExceeded`` whether the deadline passed locally or on the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

MAX_CODE_CHARS = 64  # of an error's code from the wire; longer: not a code we know
MAX_MESSAGE_CHARS = 4096  # of an error's message from the wire; longer is cut


@dataclass(frozen=True, slots=True)
class WireNumber:
    """A number field of an error on the wire: finite and in ``[lo, hi]``; with ``integer``, an
    int only (a float is refused, not rounded). ``bool`` is never a number here."""

    lo: float
    hi: float
    integer: bool = False

    def parse(self, value: Any) -> int | float | None:
        """The value if it fits, else None (NaN and inf fail the range check)."""
        number = type(value) is int or (type(value) is float and not self.integer)
        if number and self.lo <= value <= self.hi:
            return value if self.integer else float(value)
        return None


@dataclass(frozen=True, slots=True)
class WireText:
    """A string field of an error on the wire, at most ``max_chars`` characters."""

    max_chars: int

    def parse(self, value: Any) -> str | None:
        return value if type(value) is str and len(value) <= self.max_chars else None


WireField = WireNumber | WireText


class TandemError(Exception):
    """Base class of every error Tandem raises on purpose."""

    code: ClassVar[str] = "internal"
    # Attributes that travel with the error (besides code and message) and are set again on the
    # other side, e.g. OverloadedError.retry_after_ms, each with the type and range a peer's
    # value must have to be believed (:func:`error_from_wire`). Values are msgpack scalars.
    wire_fields: ClassVar[dict[str, WireField]] = {}

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
    # an hour at most: a longer wait is no hint
    wire_fields: ClassVar[dict[str, WireField]] = {"retry_after_ms": WireNumber(0.0, 3.6e6)}
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
    wire_fields: ClassVar[dict[str, WireField]] = {"exception": WireText(256)}  # a class name
    exception: str = ""


class Unauthorized(TandemError):
    """The worker no longer allows this client's CurveZMQ key: it was removed from (or changed
    in) the worker's ``allowed_clients`` after the connection opened. Nothing was run. Not
    retried elsewhere: ask the worker's operator to allow the key again."""

    code = "unauthorized"


class UnknownModel(TandemError):
    code = "unknown_model"


class AdminBusy(TandemError):
    """A worker is already loading, replacing or unloading a model (one admin operation at a
    time): nothing was done. Send it again once that one is answered (``tandem cloud models
    list`` shows what runs)."""

    code = "admin_busy"


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
    wire_fields: ClassVar[dict[str, WireField]] = {"tokens": WireNumber(0, 1 << 32, integer=True)}
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
    """The error an ``error`` envelope's payload ``{code, message, ...}`` describes. Nothing in
    it is trusted: a code that is not a short string counts as ``internal``, a message that is
    not a string is dropped and a long one is cut to :data:`MAX_MESSAGE_CHARS`, and each of the
    class's ``wire_fields`` is kept only if it has the declared type and range (else the class
    default stays). Unknown extra fields are ignored: a newer peer may send more. The error
    always reconstructs."""
    code = payload.get("code")
    ok_code = type(code) is str and len(code) <= MAX_CODE_CHARS
    cls = error_class(code if ok_code else "internal")
    message = payload.get("message")
    if type(message) is not str:
        message = ""
    elif len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    err = cls(message)
    for name, spec in cls.wire_fields.items():
        value = spec.parse(payload.get(name))
        if value is not None:
            setattr(err, name, value)
    return err
