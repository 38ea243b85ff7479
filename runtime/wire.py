"""Tandem's wire protocol: a msgpack envelope over ZeroMQ multipart messages. (Over 500 lines:
the format and every check a message passes before use are one unit; split, a limit could be
read in one file and missed in the other.)

A message is a list of frames::

    frame 0   u16 header length (little-endian)
              header   msgpack [version, kind, id, task, budget_us, tags(, traceparent
                       (, tracestate))]
              payload  msgpack, any of nil/bool/int/float/str/bin/list/map and arrays
    frame 1+  array buffers too large to inline (one frame per array, raw bytes)

Deadlines travel as **budgets**, as gRPC's ``grpc-timeout`` does: ``budget_us`` is the time the
request had left when it was sent (nil: no deadline). The receiver adds it to its own
``time.monotonic()`` on arrival, so no peer's wall clock is ever read or trusted; the time a
message spends on the network is not subtracted (it cannot be measured without a shared
clock), so a budget errs on the generous side by one one-way latency.

The header is length-prefixed so it decodes on its own: a bad payload can still be answered by
request id. Header and payload share a frame because every frame costs a send and a receive
call on both ends, a measurable share of a small round trip (``benchmarks.serving.wire``).

Arrays never go through pickle. An array is a msgpack ext value whose data starts with a small
fixed header (dtype code, ndim, shape) and then either the raw buffer (ext type
:data:`EXT_ARRAY_INLINE`) or the index of the frame that holds it (:data:`EXT_ARRAY_FRAME`).
Decoding is zero-copy (``np.frombuffer`` over the received buffer), so decoded arrays are
read-only.

**Streams** (generation). A ``generate`` request is answered by a run of ``chunk`` messages and
then exactly one ``end`` — or by one ``error`` at any point instead of the ``end``, never both,
never twice. All of them carry the request's id and arrive in order (one ZeroMQ connection).
``cancel`` (same id, payload nil) asks the worker to stop: the stream then ends with ``end``
(``finish_reason`` "cancelled"); a ``cancel`` for a stream already over gets no answer. The
``generate`` header's budget covers the whole answer; ``first_token_ms`` (the time left for the
first token, nil: no bound of its own) is a budget too, counted from arrival. Payloads:

* ``generate``: ``{"model": str, "prompt": str, "max_tokens": int, "temperature": float,
  "top_p": float, "seed": int|nil, "stop": [str], "first_token_ms": int|nil}``
* ``chunk``: ``{"seq": int, "tokens": [int], "text": str, "logprobs": [float],
  "entropies": [float|nil]}`` — ``seq`` is the index in the answer of the chunk's first token,
  so a stream's chunks have contiguous seq ranges; a chunk holds every token the worker had
  ready when it was sent (one or many)
* ``end``: ``{"finish_reason": "stop"|"length"|"cancelled", "tokens": int (the answer's
  length), "prompt_tokens": int, "model": str, "version": str, "timings": {"queue_ms",
  "ttft_ms", "total_ms"}}`` — timings on the worker's own clock from the request's arrival

**Trace context** (optional, :mod:`tandem.runtime.tracing`). A traced request's header has a
7th element, the W3C ``traceparent`` of the sender's span (``00-<32 hex trace id>-<16 hex span
id>-<2 hex flags>``, exactly 55 characters, version ``00`` only, ids not all zero), and an 8th,
its ``tracestate``, when that is not empty (W3C ``key=value`` members, at most
:data:`MAX_TRACESTATE_MEMBERS` of them and :data:`MAX_TRACESTATE_BYTES` in all). An untraced message has neither, so it is byte-identical to
one from a peer without tracing. A decoder reads the first 6 elements and ignores any past
the ones it knows (later versions may add more), so a traced message needs a peer of this
version or newer (an older one refuses a header that is not exactly 6 elements). A trace field
that is not valid is ignored, as the W3C spec says for ``traceparent``: the request is served
untraced, never refused for it (a bad tracestate alone drops only the tracestate).

Every limit in :class:`WireLimits` is checked before anything is built from the bytes: total
and per-frame size, number of frames, array elements, nesting depth, tags. A violation raises a
:class:`~tandem.runtime.errors.WireError` subclass; where the header could be read, the error
carries the request id so the peer can be answered.
"""

from __future__ import annotations

import math
import os
import re
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgpack
import numpy as np
import zmq

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

PROTOCOL_VERSION = 2  # 2: budgets (µs left) replace absolute epoch deadlines
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
_HLEN = struct.Struct("<H")  # header length prefix
_ARRAY_HEAD = struct.Struct("<BB")  # dtype code, ndim
_FRAME_REF = struct.Struct("<I")
MAX_NDIM = 32
MAX_BUDGET_US = 24 * 3600 * 10**6  # a day: anything longer is a unit mistake
MAX_TRACESTATE_BYTES = 256  # W3C allows 512; more is dropped (the traceparent is kept)
_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
# W3C tracestate list-members (key=value), as OpenTelemetry parses them: a tracestate it would
# refuse (and log a warning for, per message) is dropped here instead
_TRACESTATE_MEMBER = re.compile(
    r"(?:[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
_TRACESTATE_SPLIT = re.compile(r"[ \t]*,[ \t]*")
MAX_TRACESTATE_MEMBERS = 32
_DIMS = [struct.Struct(f"<{n}Q") for n in range(MAX_NDIM + 1)]  # the shape, one u64 per dim


class Kind(StrEnum):
    """What an envelope asks for or answers with."""

    INFER = "infer"  # run a model: payload {"model": str, "inputs": array (N, ...)}
    RESULT = "result"  # answer to infer/health/echo
    ERROR = "error"  # payload {"code": str, "message": str}
    HEALTH = "health"  # payload nil; answered with models, versions, queue depth
    ECHO = "echo"  # payload echoed back untouched: a round-trip probe
    # run rows through some experts of an MoE model, no batching: payload {"model": str,
    # "experts": [int], "counts": [int], "rows": array (sum(counts), H)}; result {"rows": ...}
    EXPERTS = "experts"
    # streaming generation (see the module docstring): generate → chunk* → end | error
    GENERATE = "generate"  # payload {"model", "prompt", sampling params, "first_token_ms"}
    CHUNK = "chunk"  # payload {"seq", "tokens", "text", "logprobs", "entropies"}
    END = "end"  # payload {"finish_reason", "tokens", "prompt_tokens", ..., "timings"}
    CANCEL = "cancel"  # same id as the generate; payload nil; answered by the stream's end
    # speculative decoding: score draft tokens in a session's KV cache; answered by a result
    # (see tandem.cloud.verify for the payloads)
    VERIFY = "verify"
    # load, replace or unload a worker's models: payload {"op": str, "model": str | None};
    # answered by a result once done (see tandem.cloud.model_admin for the payloads)
    ADMIN = "admin"


_KINDS = {k.value: k for k in Kind}


@dataclass(frozen=True, slots=True)
class WireLimits:
    """Limits applied to every received message. Sizes are bytes."""

    max_message_bytes: int = 17 * 1024 * 1024  # a 16 MiB request and its envelope
    # Frame 0 (header, msgpack payload, inline arrays). msgpack structure expands in Python (an
    # empty list is 1 byte on the wire and ~60 in memory), so it is bounded on its own, and so
    # is the number of lists and maps; big arrays travel in their own frames, not expanded.
    max_envelope_bytes: int = 4 * 1024 * 1024
    max_containers: int = 65_536
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
    """One message. ``deadline`` is a point on *this* process's ``time.monotonic()`` clock
    (None: no deadline); on the wire it becomes the budget left (see the module docstring)."""

    kind: Kind
    id: bytes = field(default_factory=lambda: new_request_id())
    task: str = ""
    deadline: float | None = None
    tags: tuple[str, ...] = ()
    payload: Any = None
    # Set by decode: the payload's bytes as received (frame 0 past the header, then the array
    # frames). Two tries of one request have the same body; their budgets differ.
    body: tuple[Frame, ...] = ()
    # W3C (traceparent, tracestate or "") of the sender's span; None: untraced (see above)
    trace: tuple[str, str] | None = None

    def same_body(self, other: Envelope) -> bool:
        """Whether ``other`` (decoded) asks for exactly what this one (decoded) asked for."""
        return (
            self.kind is other.kind
            and len(self.body) == len(other.body)
            and all(bytes(a) == bytes(b) for a, b in zip(self.body, other.body, strict=True))
        )

    def reply(self, kind: Kind, payload: Any = None) -> Envelope:
        return Envelope(kind=kind, id=self.id, task=self.task, payload=payload)

    def error_reply(self, err: TandemError) -> Envelope:
        return self.reply(Kind.ERROR, err.to_wire())

    def expired(self, now: float | None = None) -> bool:
        """True once the deadline has passed (``now``: a ``time.monotonic()`` reading)."""
        return self.deadline is not None and (now or time.monotonic()) >= self.deadline

    def budget_s(self, now: float | None = None) -> float | None:
        """Seconds left before the deadline (may be negative), or None without one."""
        return None if self.deadline is None else self.deadline - (now or time.monotonic())

    def raise_if_error(self) -> Envelope:
        """Return self, or raise the :class:`TandemError` an ``error`` envelope carries."""
        if self.kind is Kind.ERROR:
            raise error_from_wire(self.payload if isinstance(self.payload, dict) else {})
        return self


def new_request_id() -> bytes:
    return os.urandom(16)


def deadline_after(timeout_s: float) -> float:
    """The monotonic deadline ``timeout_s`` from now."""
    return time.monotonic() + timeout_s


def wire_error_with_id(err: WireError, request_id: bytes | None) -> WireError:
    err.request_id = request_id
    return err


Frame = bytes | memoryview

# pyzmq's send_multipart/recv_multipart spend more time on flag enums than on the frames
# (3.7 µs vs 1.2 µs for three small frames): these two do the same with plain ints.
_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)


def send_frames(sock: zmq.Socket, frames: Sequence[Any], flags: int = 0) -> None:
    """Send one multipart message (``flags``: e.g. ``zmq.DONTWAIT``, on every frame). Arrays
    go zero-copy; bytes are copied (cheaper when small)."""
    last = len(frames) - 1
    for i, f in enumerate(frames):
        sock.send(f, flags | (_SNDMORE if i < last else 0), copy=not isinstance(f, np.ndarray))


def frames_nbytes(frames: Sequence[Any]) -> int:
    """Bytes of a message's frames (bytes, memoryviews or arrays)."""
    return sum(f.nbytes if isinstance(f, np.ndarray | memoryview) else len(f) for f in frames)


def recv_frames(sock: zmq.Socket, n_copied: int, max_frames: int = 1 << 20) -> list[Frame]:
    """Receive one multipart message: the first ``n_copied`` frames as bytes (routing and the
    envelope: small, and copying those is cheaper than a frame object), the rest as zero-copy
    memoryviews (array buffers, each at least ``frame_threshold_bytes``). Frames past
    ``max_frames`` are read and dropped (the message is consumed, its memory is not kept);
    the ``max_frames + 1`` kept still tell the codec there were too many."""
    frames: list[Frame] = [sock.recv()]
    _recv_rest(sock, frames, n_copied, max_frames)
    return frames


def recv_frames_with_user_id(
    sock: zmq.Socket, n_copied: int, max_frames: int = 1 << 20
) -> tuple[list[Frame], bytes]:
    """:func:`recv_frames`, and the ``User-Id`` that the ZAP handler gave the sender's
    connection at its handshake (for a CurveZMQ client of pyzmq's authenticator: its Z85
    public key), ``b""`` if none. A frame object more than :func:`recv_frames`, so only for
    sockets whose peers are authenticated."""
    first = sock.recv(copy=False)
    try:
        user_id = first.get("User-Id").encode("ascii", "replace")
    except zmq.ZMQError:  # no ZAP handler on this connection
        user_id = b""
    frames: list[Frame] = [first.bytes]
    _recv_rest(sock, frames, n_copied, max_frames)
    return frames, user_id


def _recv_rest(sock: zmq.Socket, frames: list[Frame], n_copied: int, max_frames: int) -> None:
    while sock.getsockopt(_RCVMORE):
        if len(frames) > max_frames:
            sock.recv(copy=False)  # dropped
            continue
        frames.append(sock.recv() if len(frames) < n_copied else sock.recv(copy=False).buffer)


class WireCodec:
    """Encodes :class:`Envelope` objects to frames and decodes frames back, under limits."""

    def __init__(self, limits: WireLimits | None = None) -> None:
        self.limits = limits or WireLimits()
        self._encoder = _Encoder(
            self.limits.frame_threshold_bytes, self.limits.max_envelope_bytes // 2
        )

    # ------------------------------------------------------------------ encode
    def encode(self, env: Envelope) -> list[Any]:
        """Frames for ``env``: bytes, then contiguous arrays (send them with :func:`send_frames`)."""
        enc = self._encoder
        enc.extra = extra = []
        enc.inline = 0
        left_s = env.budget_s()
        budget = None if left_s is None else max(0, int(left_s * 1e6))
        head = (PROTOCOL_VERSION, env.kind.value, env.id, env.task, budget, env.tags)
        if env.trace is not None:  # appended only when traced: untraced bytes are unchanged
            head += env.trace if env.trace[1] else env.trace[:1]
        header = enc.packer.pack(head)
        if len(header) > 0xFFFF:
            raise TypeError("envelope header over 64 KiB (task name or tags too long)")
        payload = enc.packer.pack(env.payload)
        return [b"".join((_HLEN.pack(len(header)), header, payload)), *extra]

    # ------------------------------------------------------------------ decode
    def decode(self, frames: Sequence[Frame]) -> Envelope:
        """Validate and decode frames. Raises a :class:`WireError` subclass on bad input; the
        error has ``request_id`` set when the header was readable."""
        lim = self.limits
        n = len(frames)
        if n == 0 or len(frames[0]) < _HLEN.size:
            raise MalformedMessage("empty message")
        first = memoryview(frames[0])
        end = _HLEN.size + _HLEN.unpack_from(first)[0]
        if end >= len(first):
            raise MalformedMessage("header length prefix runs past the frame (no payload)")
        # the header first (at most 64 KiB): every later error can then name the request
        env = self._decode_header(first[_HLEN.size : end])
        try:
            if n > lim.max_frames:
                raise LimitExceeded(f"more than {lim.max_frames} frames ({n} or more)")
            total = frames_nbytes(frames)
            if total > lim.max_message_bytes:
                raise LimitExceeded(f"message is {total} bytes, limit is {lim.max_message_bytes}")
            if len(first) > lim.max_envelope_bytes:
                raise LimitExceeded(
                    f"envelope frame is {len(first)} bytes, limit is {lim.max_envelope_bytes} "
                    "(arrays of 64 KiB and more travel in frames of their own)"
                )
            env.body = (first[end:], *frames[1:])
            env.payload = self._decode_payload(first[end:], frames[1:])
        except WireError as err:
            raise wire_error_with_id(err, env.id) from None
        return env

    def _decode_header(self, raw: Frame) -> Envelope:
        lim = self.limits
        try:  # at most 64 KiB (u16 prefix): msgpack's own length checks bound it
            h = msgpack.unpackb(raw)
        except Exception as e:  # msgpack raises several unrelated types
            raise MalformedMessage(f"header is not valid msgpack: {e}") from None
        if not isinstance(h, list) or len(h) < 6:
            raise MalformedMessage("header must be an array of at least 6 elements")
        version, kind, rid, task, budget, tags = h[:6]
        if not isinstance(rid, bytes) or len(rid) != 16:
            raise MalformedMessage("request id must be 16 bytes")
        if version != PROTOCOL_VERSION:
            raise wire_error_with_id(
                UnsupportedVersion(
                    f"peer speaks Tandem protocol version {version!r}, this side speaks "
                    f"{PROTOCOL_VERSION}: upgrade the older side (tandem-infer) so both match"
                ),
                rid,
            )
        k = _KINDS.get(kind) if isinstance(kind, str) else None
        if k is None:
            raise wire_error_with_id(
                UnknownKind(f"unknown kind {kind!r}; expected one of {sorted(_KINDS)}"), rid
            )
        if not (
            type(task) is str
            and len(task) <= lim.max_task_bytes
            and (budget is None or (type(budget) is int and 0 <= budget <= MAX_BUDGET_US))
            and type(tags) is list
            and len(tags) <= lim.max_tags
            and (not tags or _tags_ok(tags, lim.max_tag_bytes))
        ):
            raise wire_error_with_id(_header_problem(task, budget, tags, lim), rid)
        deadline = None if budget is None else time.monotonic() + budget * 1e-6
        env = Envelope(kind=k, id=rid, task=task, deadline=deadline, tags=tuple(tags))
        if len(h) > 6:
            env.trace = trace_field(h[6], h[7] if len(h) > 7 else None)
        return env

    def _decode_payload(self, raw: Frame, buffers: Sequence[Frame]) -> Any:
        lim = self.limits
        used: set[int] = set()
        containers = [lim.max_containers]  # left to build

        def ext_hook(code: int, data: bytes) -> Any:
            return _decode_array(code, data, buffers, used, lim.max_array_elements)

        def count(container: Any) -> Any:
            containers[0] -= 1
            if containers[0] < 0:
                raise LimitExceeded(f"payload holds more than {lim.max_containers} lists and maps")
            return container

        # Every length msgpack reads is bounded by the bytes it reads from (at most
        # max_envelope_bytes): a list of n elements takes at least n bytes, a map of n pairs 2n.
        # msgpack allocates a list as its header says (older versions all of it, newer ones up
        # to 10,000 slots) before it finds the elements missing, at each level of nesting.
        n = len(raw)
        try:
            payload = msgpack.unpackb(
                raw,
                ext_hook=ext_hook,
                list_hook=count,
                object_hook=count,
                raw=False,
                strict_map_key=True,
                max_bin_len=n,
                max_str_len=n,
                max_ext_len=n,
                max_array_len=n,
                max_map_len=n // 2,
            )
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


class _Encoder(threading.local):
    """One msgpack ``Packer`` per thread (a Packer is not thread-safe; building one per
    message costs more than packing a small envelope), and where array frames collect."""

    def __init__(self, threshold: int, inline_budget: int) -> None:
        self.threshold = threshold
        self.inline_budget = inline_budget  # inline array bytes per envelope, at most
        self.inline = 0
        self.extra: list[Any] = []
        self.packer = msgpack.Packer(default=self._default)

    def _default(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            inline = obj.nbytes < self.threshold and self.inline + obj.nbytes <= self.inline_budget
            self.inline += obj.nbytes if inline else 0
            return _encode_array(obj, self.extra, inline)
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, set | frozenset):
            return list(obj)
        raise TypeError(f"cannot put {type(obj).__name__} on the wire")


def trace_field(traceparent: Any, tracestate: Any = None) -> tuple[str, str] | None:
    """A received trace context, validated: ``(traceparent, tracestate or "")``, or None when
    the traceparent is not a version-00 W3C traceparent (then the request is untraced). A
    tracestate that is not a valid W3C tracestate (:func:`_tracestate_ok`) is dropped
    alone."""
    if type(traceparent) is not str or len(traceparent) != 55:
        return None
    if _TRACEPARENT.fullmatch(traceparent) is None:
        return None
    if type(tracestate) is not str or not _tracestate_ok(tracestate):
        tracestate = ""
    return traceparent, tracestate


def _tracestate_ok(tracestate: str) -> bool:
    """A W3C tracestate: at most :data:`MAX_TRACESTATE_BYTES`, at most
    :data:`MAX_TRACESTATE_MEMBERS` ``key=value`` members with distinct keys."""
    if not tracestate or len(tracestate) > MAX_TRACESTATE_BYTES:
        return False
    members = _TRACESTATE_SPLIT.split(tracestate.strip(" \t"))
    if len(members) > MAX_TRACESTATE_MEMBERS:
        return False
    keys = set()
    for m in members:
        if _TRACESTATE_MEMBER.fullmatch(m) is None:
            return False
        keys.add(m.partition("=")[0])
    return len(keys) == len(members)


def _tags_ok(tags: list[Any], max_bytes: int) -> bool:
    return all(type(t) is str and len(t) <= max_bytes for t in tags)


def _header_problem(task: Any, budget: Any, tags: Any, lim: WireLimits) -> WireError:
    """Which header field is wrong (the slow path, after the one-line check failed)."""
    if not isinstance(task, str):
        return MalformedMessage("task must be a string")
    if len(task) > lim.max_task_bytes:
        return LimitExceeded(f"task name longer than {lim.max_task_bytes}")
    if budget is not None and (type(budget) is not int or not 0 <= budget <= MAX_BUDGET_US):
        return MalformedMessage(
            f"budget must be nil or an integer of µs in [0, {MAX_BUDGET_US}], got {budget!r}"
        )
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        return MalformedMessage("tags must be an array of strings")
    if len(tags) > lim.max_tags:
        return LimitExceeded(f"{len(tags)} tags, limit is {lim.max_tags}")
    return LimitExceeded(f"a tag is longer than {lim.max_tag_bytes}")


def _encode_array(arr: np.ndarray, extra: list[Any], inline: bool) -> msgpack.ExtType:
    dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    code = _DTYPE_CODE.get(dt)
    if code is None:
        raise TypeError(
            f"dtype {arr.dtype} cannot go on the wire; allowed: {[str(d) for d in WIRE_DTYPES]}"
        )
    if arr.ndim > MAX_NDIM:
        raise TypeError(f"array has {arr.ndim} dims, at most {MAX_NDIM} go on the wire")
    if arr.dtype is not dt or not arr.flags.c_contiguous:
        arr = np.require(arr, dt, "C")  # keeps 0-d arrays 0-d, unlike ascontiguousarray
    head = _ARRAY_HEAD.pack(code, arr.ndim) + _DIMS[arr.ndim].pack(*arr.shape)
    if not inline:
        extra.append(arr)
        return msgpack.ExtType(EXT_ARRAY_FRAME, head + _FRAME_REF.pack(len(extra)))
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
    dims = _DIMS[ndim]
    off = _ARRAY_HEAD.size
    if len(data) < off + dims.size:
        raise BadArray("array shape truncated")
    shape = dims.unpack_from(data, off)
    off += dims.size
    count = math.prod(shape)
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
        idx = _FRAME_REF.unpack_from(data, off)[0] - 1
        if not 0 <= idx < len(buffers) or idx in used:
            raise BadArray(f"array refers to frame {idx + 1}, which is missing or already used")
        used.add(idx)
        buf, off = buffers[idx], 0
        if len(buf) != nbytes:
            raise BadArray(f"shape {shape} of {dtype} needs {nbytes} bytes, frame has {len(buf)}")
    return np.frombuffer(buf, dtype=dtype, count=count, offset=off).reshape(shape)


def _check_depth(obj: Any, max_depth: int) -> None:
    """Level by level, looking only into containers (a flat map of scalars and arrays, the
    usual payload, costs one pass over its values)."""
    level = [obj] if type(obj) is list or type(obj) is dict else []
    depth = 0
    while level:
        depth += 1
        if depth > max_depth:
            raise LimitExceeded(f"payload nested deeper than {max_depth}")
        deeper = []
        for c in level:
            for v in c.values() if type(c) is dict else c:
                if type(v) is list or type(v) is dict:
                    deeper.append(v)
        level = deeper
