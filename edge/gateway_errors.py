"""The gateway's HTTP errors, in OpenAI's ``{"error": {"message", "type", "param", "code"}}``
shape, and the one mapping from Tandem's exceptions to them (see :mod:`tandem.edge.gateway`)."""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse

from tandem.runtime.errors import BadRequest, OverloadedError, TandemError


class APIError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.retry_after_s = param, code, retry_after_s

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        headers = {} if self.retry_after_s is None else {"retry-after": str(self.retry_after_s)}
        return JSONResponse(self.body(), self.status, headers=headers)


_PARAMS = ("max_tokens", "temperature", "top_p", "seed", "stop", "prompt", "messages")


def api_error(e: BaseException) -> APIError:
    """The HTTP error an exception from parsing or generation becomes: :class:`BadRequest`
    400, :class:`OverloadedError` 429 (``Retry-After``: its ``retry_after_ms``, at least 1 s),
    any other :class:`TandemError` or exception 500 with a message, never a traceback."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, BadRequest):
        m = re.match(r"(\w+)", e.message)
        param = m.group(1) if m and m.group(1) in _PARAMS else None
        return APIError(400, e.message, param=param, code=e.code)
    if isinstance(e, OverloadedError):
        retry = max(1, math.ceil((e.retry_after_ms or 0.0) / 1e3))
        msg = e.message or "overloaded"
        return APIError(429, msg, type="rate_limit_error", code=e.code, retry_after_s=retry)
    if isinstance(e, TandemError):
        return APIError(500, e.message or e.code, type="server_error", code=e.code)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")


def validation_error(e: ValidationError) -> APIError:
    """A 400 naming (at most) the first three fields pydantic refused."""
    errors = e.errors()
    where = [".".join(str(x) for x in err["loc"]) for err in errors]
    msg = "; ".join(f"{w}: {err['msg']}" for w, err in list(zip(where, errors, strict=True))[:3])
    return APIError(400, msg, param=str(errors[0]["loc"][0]) if errors[0]["loc"] else None)
