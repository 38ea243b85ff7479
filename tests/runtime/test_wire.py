from __future__ import annotations

import math
import struct
import time
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tandem.runtime import errors
from tandem.runtime.wire import (
    EXT_ARRAY_INLINE,
    PROTOCOL_VERSION,
    WIRE_DTYPES,
    Envelope,
    Kind,
    WireCodec,
    WireLimits,
)


def roundtrip(env: Envelope, codec: WireCodec | None = None) -> Envelope:
    codec = codec or WireCodec()
    frames = [f.tobytes() if isinstance(f, np.ndarray) else bytes(f) for f in codec.encode(env)]
    return codec.decode(frames)


arrays = st.sampled_from(WIRE_DTYPES).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
payloads = st.recursive(
    scalars | arrays,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def assert_same(a, b) -> None:
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, float) and a != a:
        assert b != b
    else:
        assert a == b


@settings(max_examples=200, deadline=None)
@given(
    payload=payloads,
    kind=st.sampled_from(list(Kind)),
    task=st.text(max_size=20),
    budget_s=st.one_of(st.none(), st.floats(0.001, 3600.0)),
    tags=st.lists(st.text(max_size=10), max_size=5),
    threshold=st.sampled_from([0, 16, 1 << 20]),
)
def test_roundtrip_random_envelopes(payload, kind, task, budget_s, tags, threshold) -> None:
    codec = WireCodec(WireLimits(frame_threshold_bytes=threshold))
    deadline = None if budget_s is None else time.monotonic() + budget_s
    env = Envelope(kind=kind, task=task, deadline=deadline, tags=tuple(tags), payload=payload)
    t0 = time.monotonic()
    out = roundtrip(env, codec)
    in_transit = time.monotonic() - t0
    assert (out.kind, out.id, out.task, out.tags) == (kind, env.id, task, tuple(tags))
    if deadline is None:
        assert out.deadline is None
    else:  # re-anchored on arrival: later by at most the time in transit, never earlier
        assert deadline - 1e-6 <= out.deadline <= deadline + in_transit
    assert_same(payload, out.payload)


def test_deadline_travels_as_a_budget_not_a_wall_clock_time(monkeypatch) -> None:
    codec = WireCodec()
    env = Envelope(kind=Kind.ECHO, deadline=time.monotonic() + 0.25)
    frames = codec.encode(env)
    # the receiver's wall clock is an hour off either way: nothing changes
    for shift in (-3600.0, 3600.0):
        monkeypatch.setattr(time, "time", lambda s=shift: time.monotonic() + 1e9 + s)
        out = codec.decode([bytes(f) for f in frames])
        assert 0.2 < out.budget_s() <= 0.25 and not out.expired()
    spent = codec.decode(codec.encode(Envelope(kind=Kind.ECHO, deadline=time.monotonic() - 1)))
    assert spent.expired() and spent.budget_s() <= 0  # a spent budget stays spent


def test_old_protocol_version_gets_a_clear_error() -> None:
    old = msgpack.packb([1, "infer", b"r" * 16, "", 1_700_000_000_000, []])
    with pytest.raises(errors.UnsupportedVersion, match=r"version 1.*speaks 2.*upgrade") as e:
        WireCodec().decode(msg(old))
    assert e.value.request_id == b"r" * 16  # answered by id


def test_noncontiguous_zero_d_and_big_endian_arrays() -> None:
    a = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    b = np.array(3.5)
    c = np.arange(5, dtype=">i4")
    out = roundtrip(Envelope(kind=Kind.ECHO, payload=[a, b, c])).payload
    np.testing.assert_array_equal(out[0], a)
    assert out[1].shape == () and out[1] == 3.5
    np.testing.assert_array_equal(out[2], c)
    assert out[2].dtype == np.dtype("<i4")


def test_large_arrays_travel_as_frames_and_decode_zero_copy() -> None:
    codec = WireCodec()
    x = np.random.default_rng(0).normal(size=(512, 512)).astype(np.float32)
    frames = codec.encode(Envelope(kind=Kind.INFER, payload={"inputs": x}))
    assert len(frames) == 2 and isinstance(frames[1], np.ndarray)
    buf = frames[1].tobytes()
    out = codec.decode([frames[0], memoryview(buf)]).payload["inputs"]
    np.testing.assert_array_equal(out, x)
    assert np.shares_memory(out, np.frombuffer(buf, np.uint8))  # no copy on decode
    assert not out.flags.writeable


def test_disallowed_dtype_cannot_be_sent() -> None:
    with pytest.raises(TypeError, match="cannot go on the wire"):
        WireCodec().encode(Envelope(kind=Kind.ECHO, payload=np.array(["a"], dtype=object)))
    with pytest.raises(TypeError, match="cannot put"):
        WireCodec().encode(Envelope(kind=Kind.ECHO, payload=object()))


def msg(header: bytes, payload: bytes = b"\xc0", *buffers: bytes) -> list[bytes]:
    """Frames of a message built by hand: length-prefixed header + payload, then buffers."""
    return [struct.pack("<H", len(header)) + header + payload, *buffers]


def header(version=PROTOCOL_VERSION, kind="infer", rid=b"r" * 16, task="t", budget=None, tags=()):
    return msgpack.packb([version, kind, rid, task, budget, list(tags)])


def array_ext(dtype_code: int, shape: tuple[int, ...], data: bytes) -> msgpack.ExtType:
    head = struct.pack("<BB", dtype_code, len(shape)) + b"".join(
        struct.pack("<Q", d) for d in shape
    )
    return msgpack.ExtType(EXT_ARRAY_INLINE, head + data)


NESTED: list = [1]
for _ in range(20):
    NESTED = [NESTED]


@pytest.mark.parametrize(
    ("frames", "error"),
    [
        ([b"\x03\x00\xc1\x00garbage"], errors.MalformedMessage),  # not msgpack
        ([b"\xff\xff\x90"], errors.MalformedMessage),  # length prefix past the end
        ([b"\x01"], errors.MalformedMessage),  # shorter than the prefix
        ([], errors.MalformedMessage),
        (msg(header()[:-3]), errors.MalformedMessage),  # truncated header
        (msg(header(), b""), errors.MalformedMessage),  # no payload
        (msg(msgpack.packb({"v": 1})), errors.MalformedMessage),  # header not an array
        (msg(header(rid=b"short")), errors.MalformedMessage),
        (msg(header(version=99)), errors.UnsupportedVersion),
        (msg(header(kind="reboot")), errors.UnknownKind),
        (msg(header(budget=-5)), errors.MalformedMessage),
        (msg(header(budget=1.5)), errors.MalformedMessage),
        (msg(header(budget=10**15)), errors.MalformedMessage),
        (msg(header(tags=["x"] * 100)), errors.LimitExceeded),
        (msg(header(tags=[7])), errors.MalformedMessage),
        (
            msg(header(), msgpack.packb(array_ext(200, (2,), b"\0" * 8))),
            errors.BadArray,
        ),  # bad dtype
        (
            msg(header(), msgpack.packb(array_ext(10, (3,), b"\0" * 8))),
            errors.BadArray,
        ),  # shape/buffer
        (msg(header(), msgpack.packb(array_ext(10, (2,), b""))), errors.BadArray),
        (msg(header(), msgpack.packb(msgpack.ExtType(9, b"xx"))), errors.BadArray),  # unknown ext
        (msg(header(), msgpack.packb(array_ext(10, (1 << 40,), b""))), errors.LimitExceeded),
        (msg(header(), b"\xc0", b"stray frame"), errors.MalformedMessage),  # unreferenced frame
        (msg(header(), msgpack.packb(NESTED)), errors.LimitExceeded),  # nested too deep
        (msg(header(), b"\x92\x01"), errors.MalformedMessage),  # truncated payload
    ],
)
def test_malformed_input_gets_the_right_error(frames, error) -> None:
    with pytest.raises(error) as info:
        WireCodec().decode(frames)
    assert isinstance(info.value, errors.WireError)


def test_payload_errors_carry_the_request_id() -> None:
    with pytest.raises(errors.BadArray) as info:
        WireCodec().decode(msg(header(rid=b"k" * 16), msgpack.packb(array_ext(200, (1,), b"\0"))))
    assert info.value.request_id == b"k" * 16


def test_oversized_message_is_refused_before_decoding() -> None:
    codec = WireCodec(WireLimits(max_message_bytes=1024))
    with pytest.raises(errors.LimitExceeded, match="limit is 1024"):
        codec.decode(msg(header(), b"\xc0" * 2000))


def test_too_many_frames() -> None:
    codec = WireCodec(WireLimits(max_frames=3))
    with pytest.raises(errors.LimitExceeded):
        codec.decode(msg(header(), b"\xc0", b"", b"", b""))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_random_bytes_never_crash_the_decoder(frames) -> None:
    try:
        env = WireCodec().decode(frames)
        assert isinstance(env, Envelope)
    except errors.WireError:
        pass  # the only acceptable failure


def test_error_replies_raise_the_same_class() -> None:
    env = Envelope(kind=Kind.INFER)
    for cls in (errors.DeadlineExceeded, errors.ShuttingDown, errors.BadArray, errors.UnknownModel):
        reply = roundtrip(env.error_reply(cls("boom")))
        with pytest.raises(cls, match="boom"):
            reply.raise_if_error()


def test_unknown_error_code_maps_to_nearest_parent() -> None:
    assert errors.error_class("wire.some-future-code") is errors.WireError
    assert errors.error_class("brand-new") is errors.TandemError


def test_send_and_recv_frames_copy_the_envelope_and_not_the_arrays() -> None:
    import zmq

    from tandem.runtime.wire import recv_frames, send_frames

    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://frames-test")
    b.connect("inproc://frames-test")
    try:
        codec = WireCodec()
        x = np.arange(1 << 16, dtype=np.float32)  # 256 KiB: travels as its own frame
        send_frames(a, codec.encode(Envelope(kind=Kind.ECHO, payload={"x": x, "s": np.ones(3)})))
        frames = recv_frames(b, n_copied=1)
        assert isinstance(frames[0], bytes) and isinstance(frames[1], memoryview)
        out = codec.decode(frames).payload
        np.testing.assert_array_equal(out["x"], x)
        assert np.shares_memory(out["x"], np.asarray(frames[1]))
    finally:
        a.close()
        b.close()


def test_a_payload_of_millions_of_empty_lists_is_refused_before_it_is_built() -> None:
    n = 1_000_000  # 1 MB on the wire, ~60 MB as Python lists
    bomb = b"\xdd" + struct.pack(">I", n) + b"\x90" * n
    with pytest.raises(errors.LimitExceeded, match="more than 65536 lists and maps"):
        WireCodec().decode(msg(header(), bomb))


def test_envelope_frame_is_bounded_and_the_encoder_stays_under_it() -> None:
    codec = WireCodec(WireLimits(max_envelope_bytes=256 * 1024))
    with pytest.raises(errors.LimitExceeded, match="envelope frame"):
        codec.decode(msg(header(), msgpack.packb(b"x" * 300_000)))
    many = [np.full(8192, i, np.float32) for i in range(40)]  # 40 × 32 KiB, each under 64 KiB
    frames = codec.encode(Envelope(kind=Kind.ECHO, payload=many))
    assert len(frames[0]) <= 256 * 1024 and len(frames) > 1  # the rest moved to frames
    out = codec.decode([bytes(f) if not isinstance(f, np.ndarray) else f.tobytes() for f in frames])
    for a, b in zip(many, out.payload, strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- lengths msgpack believes
def claiming(claim: int, *, levels: int = 1, marker: bytes = b"\xdd", pad: int = 0) -> list[bytes]:
    """A message whose payload is ``levels`` nested array32 (``\\xdd``) or map32 (``\\xdf``)
    headers, each claiming ``claim`` elements, then ``pad`` bytes of zeros."""
    body = (marker + struct.pack(">I", claim)) * levels + b"\x00" * pad
    return msg(header(kind="echo", rid=b"c" * 16), body)


@pytest.mark.parametrize(
    "frames",
    [
        claiming(2**24 - 1),  # 5 bytes claiming 16M elements
        claiming(2**24 - 1, levels=16),  # at each of 16 levels
        claiming(2**24 - 1, marker=b"\xdf"),  # a map
        claiming(2**24 - 1, pad=4 * 2**20 - 1024),  # the envelope's 4 MiB, all of it zeros
    ],
    ids=["one-list", "16-levels", "map", "padded-to-4-MiB"],
)
def test_a_message_claiming_more_elements_than_it_has_bytes_is_refused_before_building(
    frames,
) -> None:
    codec = WireCodec()
    tracemalloc.start()
    try:
        with pytest.raises(errors.WireError) as info:
            codec.decode(frames)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.request_id == b"c" * 16  # answered by id
    assert peak < 64 * 1024, f"{peak} bytes allocated for a {len(frames[0])}-byte message"


def test_lists_and_maps_as_long_as_their_bytes_allow_still_decode() -> None:
    n = 4 * 2**20 - 1024  # one-byte elements filling the envelope
    env = Envelope(kind=Kind.ECHO, payload=[0] * n)
    assert len(roundtrip(env).payload) == n
    pairs = {str(i): 0 for i in range(10_000)}
    assert roundtrip(Envelope(kind=Kind.ECHO, payload=pairs)).payload == pairs


# ---------------------------------------------------------------- error fields from a peer
ERROR_FIELDS = [  # class, field, a good value, bad values (wrong type, range, NaN/inf, huge)
    (
        errors.OverloadedError,
        "retry_after_ms",
        250.5,
        ["250", b"250", True, None, -1.0, float("nan"), float("inf"), 1e300, [1], {"a": 1}],
    ),
    (errors.BackendFailure, "exception", "ValueError", [7, b"ValueError", None, "E" * 10_000]),
    (errors.StreamInterrupted, "tokens", 12, ["12", 12.0, -1, True, 2**63, float("nan"), [12]]),
]


@pytest.mark.parametrize(("cls", "field", "good", "bads"), ERROR_FIELDS)
def test_error_fields_from_a_peer_are_kept_only_with_their_declared_type(
    cls, field, good, bads
) -> None:
    default = getattr(cls, field)
    for bad in [good, *bads]:
        # through the codec, as an error reply arrives
        reply = Envelope(kind=Kind.ERROR, payload={"code": cls.code, "message": "m", field: bad})
        with pytest.raises(cls) as info:
            roundtrip(reply).raise_if_error()
        err = info.value
        assert err.message == "m"
        value = getattr(err, field)
        if bad is good:
            assert value == good
        else:
            assert value == default and type(value) is type(default), bad
    if cls is errors.OverloadedError:  # what the gateway does with it
        err = errors.error_from_wire({"code": "overloaded", "retry_after_ms": "5000"})
        assert math.ceil(err.retry_after_ms / 1e3) == 0


@settings(max_examples=200, deadline=None)
@given(
    code=st.sampled_from(["overloaded", "backend.error", "stream.interrupted", "wire.limit"])
    | st.none()
    | st.integers()
    | st.binary(max_size=10)
    | st.text(max_size=100),
    message=st.none() | st.integers() | st.text(max_size=50) | st.binary(max_size=10),
    value=st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=300)
    | st.binary(max_size=10)
    | st.lists(st.integers(), max_size=3),
)
def test_any_error_payload_reconstructs_with_fields_of_their_declared_type(
    code, message, value
) -> None:
    payload = {"code": code, "message": message}
    payload |= {f: value for _, f, _, _ in ERROR_FIELDS}
    err = errors.error_from_wire(payload)
    assert isinstance(err, errors.TandemError) and type(err.message) is str
    for name, spec in type(err).wire_fields.items():
        v = getattr(err, name)
        if isinstance(spec, errors.WireText):
            assert type(v) is str and len(v) <= spec.max_chars
        else:
            assert type(v) in (int, float) and spec.lo <= v <= spec.hi and math.isfinite(v)


def test_a_long_error_message_or_code_from_a_peer_is_bounded() -> None:
    err = errors.error_from_wire({"code": "wire." * 100_000, "message": "x" * 1_000_000})
    assert type(err) is errors.TandemError  # not a code we know (and not parsed dot by dot)
    assert len(err.message) <= errors.MAX_MESSAGE_CHARS + 3
