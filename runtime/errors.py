"""Tandem's error hierarchy.

Every error has a stable string ``code``. Errors cross the wire as ``{code, message}`` and are
raised again on the other side as the same class (:func:`error_from_wire`), so a caller can
``except DeadlineExceeded`` whether the deadline passed locally or on the worker.
"""

from __future__ import annotations

from typing import ClassVar


class TandemError(Exception):
    """Base class of every error Tandem raises on purpose."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


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
    code = "overloaded"


class Unavailable(TandemError):
    """The cloud could not be reached (no connection, or no reply before the deadline)."""

    code = "unavailable"


class BackendError(TandemError):
    """A model backend failed to load or run."""

    code = "backend"


class UnknownModel(TandemError):
    code = "unknown_model"


class BadRequest(TandemError):
    """A well-formed envelope whose payload does not fit the request (wrong input shape...)."""

    code = "bad_request"


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


def error_from_wire(code: str, message: str) -> TandemError:
    return error_class(code)(message)
