"""The worker's failure boundary: the one place where backend code is called.

Backend code (``check_batch``, ``run``, ``run_experts``, a verify's forward), and everything
that touches a request's rows on the way to and from it (joining requests into one batch,
checking what ``run`` returned, cutting it into each request's rows), is only ever called
through :meth:`BackendBoundary.call`, which turns any exception it raises into a typed
:class:`~tandem.runtime.errors.BackendFailure` reply (``backend.error``, with the exception's
class and message) and counts it in the worker's ``backend_errors``. What ``run`` returns must
be one array of as many rows as it was given, of a wire dtype, without NaN or inf; anything
else is :class:`BadOutput`. A stream's producer thread reports its backend's exception through
:meth:`BackendBoundary.failure`, the same conversion.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from tandem.kernels.confidence import all_finite
from tandem.runtime.backends import ModelBackend
from tandem.runtime.errors import BackendError, BackendFailure, TandemError
from tandem.runtime.wire import MAX_NDIM, WIRE_DTYPES

log = logging.getLogger("tandem.cloud.worker")

MAX_ERROR_CHARS = 2000  # of a backend exception's message in a reply (some print arrays)


class BadOutput(Exception):
    """Backend code returned something the worker cannot answer with (not an array, the
    wrong number of rows, a dtype the wire does not carry, NaN or inf). Raised inside
    :meth:`BackendBoundary.call`, so it reaches the client as ``backend.error`` with
    ``exception='BadOutput'``."""


class BackendBoundary:
    """Calls backend code for the worker and turns what it raises into typed errors, counted
    in ``counters`` (the worker's)."""

    def __init__(self, counters: Counter[str]) -> None:
        self.counters = counters

    def call(self, model: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``. TandemErrors pass through (a :class:`BackendError`, the backend's
        own word that it failed, counted in ``backend_errors``); anything else becomes
        ``backend.error``."""
        try:
            return fn(*args)
        except Exception as e:
            err = self.as_error(model, e)
            if err is e:
                raise
            raise err from None

    def as_error(self, model: str, e: BaseException) -> TandemError:
        """What :meth:`call` answers for ``e`` raised by backend code (here, or on an engine
        or offload thread): a TandemError as it is (a :class:`BackendError` counted), anything
        else as :meth:`failure`."""
        if isinstance(e, BackendError):
            self.counters["backend_errors"] += 1
        if isinstance(e, TandemError):
            return e
        assert isinstance(e, Exception)
        return self.failure(model, e)

    def failure(self, model: str, e: Exception) -> BackendFailure:
        """The typed error for an exception that backend code raised (a batch's ``run``, or a
        stream's producer thread, reported on the loop's thread); counted and logged. The
        message is cut to :data:`MAX_ERROR_CHARS`: a reply must stay small whatever was
        raised."""
        self.counters["backend_errors"] += 1
        text = str(e)
        if len(text) > MAX_ERROR_CHARS:
            text = text[:MAX_ERROR_CHARS] + "..."
        log.warning("model %r raised %s: %s", model, type(e).__name__, text)
        return BackendFailure(
            f"model {model!r} failed: {type(e).__name__}: {text}", exception=type(e).__name__
        )


def checked_rows(backend: ModelBackend, inputs: np.ndarray) -> np.ndarray:
    """``check_batch``, and a check of its answer: the batcher counts rows and the worker
    groups requests by row shape and dtype, so it must be an array with the rows sent."""
    rows = backend.check_batch(inputs)
    if not (isinstance(rows, np.ndarray) and rows.ndim >= 1 and len(rows) == len(inputs)):
        raise BadOutput(f"check_batch returned {_describe(rows)} for {len(inputs)} rows")
    return rows


def run_rows(backend: ModelBackend, inputs: list[np.ndarray], max_bytes: int) -> list[np.ndarray]:
    """Each request's output rows from one ``run`` over all their rows (requests of one row
    shape and dtype), each at most ``max_bytes`` (a reply must fit in a message). Only called
    through :meth:`BackendBoundary.call`: every step touches request data or backend output,
    and any of them may raise."""
    x = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
    out = backend.run(x)
    if not (isinstance(out, np.ndarray) and 1 <= out.ndim <= MAX_NDIM and len(out) == len(x)):
        raise BadOutput(f"run returned {_describe(out)} for {len(x)} rows")
    if out.dtype.byteorder == ">":
        out = out.astype(out.dtype.newbyteorder("<"))
    if out.dtype not in WIRE_DTYPES:
        raise BadOutput(f"run returned dtype {out.dtype}, which the wire does not carry")
    if not all_finite(out):
        bad = np.flatnonzero(~np.isfinite(out.reshape(len(out), -1)).all(axis=1))
        raise BadOutput(f"run returned NaN or inf in output rows {bad.tolist()[:10]}")
    outs = [out] if len(inputs) == 1 else np.split(out, np.cumsum([len(i) for i in inputs[:-1]]))
    big = max(o.nbytes for o in outs)
    if big > max_bytes:
        raise BadOutput(
            f"run returned {big} bytes for one request, over the {max_bytes}-byte message "
            "limit; send fewer rows per request"
        )
    return outs


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array shaped {value.shape}"
    return f"a {type(value).__name__}"
