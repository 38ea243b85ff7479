"""Tandem's wire protocol: a msgpack envelope over ZeroMQ multipart messages.

A message is a list of frames::

    frame 0   header   msgpack [version, kind, id, task, deadline_ms, tags]
    frame 1   payload  msgpack, any of nil/bool/int/float/str/bin/list/map and arrays
    frame 2+  array buffers too large to inline (one frame per array, raw bytes)

Arrays never go through pickle. An array is a msgpack ext value whose data starts with a small
fixed header (dtype code, ndim, shape) and then either the raw buffer (ext type
:data:`EXT_ARRAY_INLINE`) or the index of the frame that holds it (:data:`EXT_ARRAY_FRAME`).
Decoding is zero-copy (``np.frombuffer`` over the received buffer), so decoded arrays are
read-only.

Every limit in :class:`WireLimits` is checked before anything is built from the bytes: total
and per-frame size, number of frames, array elements, nesting depth, tags. A violation raises a
:class:`~tandem.runtime.errors.WireError` subclass; where the header could be read, the error
carries the request id so the peer can be answered.

The header sits in a frame of its own so that a bad payload can still be answered by request id.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgpack
import numpy as np

from tandem.runtime.errors import (
    BadArray,
    LimitExceeded,
    MalformedMessage,
    TandemError,
    UnknownKind,
    UnsupportedVersion,
    WireError,
    error_from_wire,
)

PROTOCOL_VERSION = 1
EXT_ARRAY_INLINE = 1
EXT_ARRAY_FRAME = 2

# The allow-list. The position in this tuple is the dtype's code on the wire: append only.
WIRE_DTYPES: tuple[np.dtype, ...] = tuple(
    np.dtype(d).newbyteorder("<")
    for d in (
        "bool",
        "int8",
        "uint8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
)
_DTYPE_CODE = {d: i for i, d in enumerate(WIRE_DTYPES)}
_ARRAY_HEAD = struct.Struct("<BB")  # dtype code, ndim
_DIM = struct.Struct("<Q")
_FRAME_REF = struct.Struct("<I")
MAX_NDIM = 32


class Kind(StrEnum):
    """What an envelope asks for or answers with."""

    INFER = "infer"  # run a model: payload {"model": str, "inputs": array (N, ...)}
    RESULT = "result"  # answer to infer/health/echo
    ERROR = "error"  # payload {"code": str, "message": str}
    HEALTH = "health"  # payload nil; answered with models, versions, queue depth
    ECHO = "echo"  # payload echoed back untouched: a round-trip probe


_KINDS = {k.value: k for k in Kind}


@dataclass(frozen=True, slots=True)
class WireLimits:
    """Limits applied to every received message. Sizes are bytes."""

    max_message_bytes: int = 64 * 1024 * 1024
    max_frames: int = 64
    max_array_elements: int = 16 * 1024 * 1024
    max_depth: int = 16
    max_tags: int = 32
    max_tag_bytes: int = 128
    max_task_bytes: int = 128
    # Arrays whose buffer is at least this many bytes travel as their own frame (zero-copy on
    # both ends); smaller ones are inlined in the payload frame.
    frame_threshold_bytes: int = 64 * 1024


@dataclass(slots=True)
class Envelope:
    kind: Kind
    id: bytes = field(default_factory=lambda: new_request_id())
    task: str = ""
    deadline_ms: int = 0  # absolute, ms since the Unix epoch; 0 = no deadline
    tags: tuple[str, ...] = ()
    payload: Any = None

    def reply(self, kind: Kind, payload: Any = None) -> Envelope:
        return Envelope(kind=kind, id=self.id, task=self.task, payload=payload)

    def error_reply(self, err: TandemError) -> Envelope:
        return self.reply(Kind.ERROR, err.to_wire())

    def expired(self, now_ms: int | None = None) -> bool:
        return bool(self.deadline_ms) and (now_ms or now_epoch_ms()) > self.deadline_ms

    def raise_if_error(self) -> Envelope:
        """Return self, or raise the :class:`TandemError` an ``error`` envelope carries."""
        if self.kind is Kind.ERROR:
            p = self.payload if isinstance(self.payload, dict) else {}
            raise error_from_wire(str(p.get("code", "internal")), str(p.get("message", "")))
        return self


def new_request_id() -> bytes:
    return os.urandom(16)


def now_epoch_ms() -> int:
    return time.time_ns() // 1_000_000


def wire_error_with_id(err: WireError, request_id: bytes | None) -> WireError:
    err.request_id = request_id  # type: ignore[attr-defined]
    return err


Frame = bytes | memoryview


class WireCodec:
    """Encodes :class:`Envelope` objects to frames and decodes frames back, under limits."""

    def __init__(self, limits: WireLimits | None = None) -> None:
        self.limits = limits or WireLimits()
        lim = self.limits
        self._unpack_kw = dict(
            raw=False,
            strict_map_key=True,
            max_bin_len=lim.max_message_bytes,
            max_str_len=lim.max_message_bytes,
            max_ext_len=lim.max_message_bytes,
            max_array_len=lim.max_array_elements,
            max_map_len=lim.max_array_elements,
        )

    # ------------------------------------------------------------------ encode
    def encode(self, env: Envelope) -> list[Any]:
        """Frames for ``env``: a list of bytes and contiguous arrays (send with copy=False)."""
        extra: list[Any] = []
        threshold = self.limits.frame_threshold_bytes

        def default(obj: Any) -> Any:
            if isinstance(obj, np.ndarray):
                return _encode_array(obj, extra, threshold)
            if isinstance(obj, np.generic):
                return obj.item()
            if isinstance(obj, tuple | set | frozenset):
                return list(obj)
            raise TypeError(f"cannot put {type(obj).__name__} on the wire")

        header = msgpack.packb(
            [
                PROTOCOL_VERSION,
                env.kind.value,
                env.id,
                env.task,
                env.deadline_ms,
                list(env.tags),
            ]
        )
        payload = msgpack.packb(env.payload, default=default)
        return [header, payload, *extra]

    # ------------------------------------------------------------------ decode
    def decode(self, frames: Sequence[Frame]) -> Envelope:
        """Validate and decode frames. Raises a :class:`WireError` subclass on bad input; the
        error has ``request_id`` set when the header was readable."""
        lim = self.limits
        n = len(frames)
        if n < 2:
            raise MalformedMessage(f"expected at least 2 frames (header, payload), got {n}")
        if n > lim.max_frames:
            raise LimitExceeded(f"{n} frames, limit is {lim.max_frames}")
        total = 0
        for f in frames:
            total += len(f)
        if total > lim.max_message_bytes:
            raise LimitExceeded(f"message is {total} bytes, limit is {lim.max_message_bytes}")
        env = self._decode_header(frames[0])
        try:
            env.payload = self._decode_payload(frames[1], frames[2:])
        except WireError as err:
            raise wire_error_with_id(err, env.id) from None
        return env

    def _decode_header(self, raw: Frame) -> Envelope:
        lim = self.limits
        try:
            h = msgpack.unpackb(raw, **self._unpack_kw)
        except Exception as e:  # msgpack raises several unrelated types
            raise MalformedMessage(f"header is not valid msgpack: {e}") from None
        if not isinstance(h, list) or len(h) != 6:
            raise MalformedMessage("header must be a 6-element array")
        version, kind, rid, task, deadline, tags = h
        if not isinstance(rid, bytes) or len(rid) != 16:
            raise MalformedMessage("request id must be 16 bytes")
        if version != PROTOCOL_VERSION:
            raise wire_error_with_id(
                UnsupportedVersion(f"protocol version {version!r}, expected {PROTOCOL_VERSION}"),
                rid,
            )
        k = _KINDS.get(kind) if isinstance(kind, str) else None
        if k is None:
            raise wire_error_with_id(
                UnknownKind(f"unknown kind {kind!r}; expected one of {sorted(_KINDS)}"), rid
            )
        problem = None
        if not isinstance(task, str):
            problem = MalformedMessage("task must be a string")
        elif len(task) > lim.max_task_bytes:
            problem = LimitExceeded(f"task name longer than {lim.max_task_bytes}")
        elif type(deadline) is not int or deadline < 0:
            problem = MalformedMessage("deadline must be a non-negative integer (ms since epoch)")
        elif not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            problem = MalformedMessage("tags must be an array of strings")
        elif len(tags) > lim.max_tags:
            problem = LimitExceeded(f"{len(tags)} tags, limit is {lim.max_tags}")
        elif any(len(t) > lim.max_tag_bytes for t in tags):
            problem = LimitExceeded(f"a tag is longer than {lim.max_tag_bytes}")
        if problem is not None:
            raise wire_error_with_id(problem, rid)
        return Envelope(kind=k, id=rid, task=task, deadline_ms=deadline, tags=tuple(tags))

    def _decode_payload(self, raw: Frame, buffers: Sequence[Frame]) -> Any:
        lim = self.limits
        used: set[int] = set()

        def ext_hook(code: int, data: bytes) -> Any:
            return _decode_array(code, data, buffers, used, lim.max_array_elements)

        try:
            payload = msgpack.unpackb(raw, ext_hook=ext_hook, **self._unpack_kw)
        except WireError:
            raise
        except Exception as e:
            raise MalformedMessage(f"payload is not valid msgpack: {e}") from None
        if len(used) != len(buffers):
            raise MalformedMessage(
                f"{len(buffers)} array frames sent, {len(used)} referenced by the payload"
            )
        _check_depth(payload, lim.max_depth)
        return payload


def _encode_array(arr: np.ndarray, extra: list[Any], threshold: int) -> msgpack.ExtType:
    dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    code = _DTYPE_CODE.get(dt)
    if code is None:
        raise TypeError(
            f"dtype {arr.dtype} cannot go on the wire; allowed: {[str(d) for d in WIRE_DTYPES]}"
        )
    if arr.ndim > MAX_NDIM:
        raise TypeError(f"array has {arr.ndim} dims, at most {MAX_NDIM} go on the wire")
    arr = np.require(arr, dt, "C")  # keeps 0-d arrays 0-d, unlike ascontiguousarray
    head = _ARRAY_HEAD.pack(code, arr.ndim) + b"".join(_DIM.pack(d) for d in arr.shape)
    if arr.nbytes >= threshold:
        extra.append(arr)
        return msgpack.ExtType(EXT_ARRAY_FRAME, head + _FRAME_REF.pack(len(extra) + 1))
    return msgpack.ExtType(EXT_ARRAY_INLINE, head + arr.tobytes())


def _decode_array(
    code: int, data: bytes, buffers: Sequence[Frame], used: set[int], max_elements: int
) -> np.ndarray:
    if code not in (EXT_ARRAY_INLINE, EXT_ARRAY_FRAME):
        raise BadArray(f"unknown ext type {code}")
    if len(data) < _ARRAY_HEAD.size:
        raise BadArray("array header truncated")
    dcode, ndim = _ARRAY_HEAD.unpack_from(data)
    if dcode >= len(WIRE_DTYPES):
        raise BadArray(f"dtype code {dcode} is not in the allow-list")
    if ndim > MAX_NDIM:
        raise BadArray(f"{ndim} dims, at most {MAX_NDIM}")
    off = _ARRAY_HEAD.size
    if len(data) < off + ndim * _DIM.size:
        raise BadArray("array shape truncated")
    shape = tuple(_DIM.unpack_from(data, off + i * _DIM.size)[0] for i in range(ndim))
    off += ndim * _DIM.size
    count = 1
    for d in shape:
        count *= d
    if count > max_elements:
        raise LimitExceeded(f"array of {count} elements, limit is {max_elements}")
    dtype = WIRE_DTYPES[dcode]
    nbytes = count * dtype.itemsize
    if code == EXT_ARRAY_INLINE:
        buf: Frame = data
        if len(data) - off != nbytes:
            raise BadArray(f"shape {shape} of {dtype} needs {nbytes} bytes, got {len(data) - off}")
    else:
        if len(data) != off + _FRAME_REF.size:
            raise BadArray("frame reference malformed")
        idx = _FRAME_REF.unpack_from(data, off)[0] - 2
        if not 0 <= idx < len(buffers) or idx in used:
            raise BadArray(f"array refers to frame {idx + 2}, which is missing or already used")
        used.add(idx)
        buf, off = buffers[idx], 0
        if len(buf) != nbytes:
            raise BadArray(f"shape {shape} of {dtype} needs {nbytes} bytes, frame has {len(buf)}")
    return np.frombuffer(buf, dtype=dtype, count=count, offset=off).reshape(shape)


def _check_depth(obj: Any, max_depth: int, depth: int = 1) -> None:
    if isinstance(obj, list | dict):
        if depth > max_depth:
            raise LimitExceeded(f"payload nested deeper than {max_depth}")
        for v in obj.values() if isinstance(obj, dict) else obj:
            _check_depth(v, max_depth, depth + 1)
