"""Traces across edge → wire → worker → backend (tandem.runtime.tracing), and the wire's
optional trace field (tandem.runtime.wire)."""

from __future__ import annotations

import gzip
import http.server
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.cloud.process import WorkerProcess
from tandem.runtime import tracing
from tandem.runtime.client import CloudClient
from tandem.runtime.config import load_config
from tandem.runtime.errors import ConfigError, MalformedMessage
from tandem.runtime.wire import (
    MAX_TRACESTATE_BYTES,
    PROTOCOL_VERSION,
    Envelope,
    Kind,
    WireCodec,
    trace_field,
)

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
_HLEN = struct.Struct("<H")


@pytest.fixture(autouse=True)
def _no_otel_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SDK_DISABLED",
        "OTEL_SERVICE_NAME",
    ):
        monkeypatch.delenv(var, raising=False)
    yield
    while tracing.TRACER is not None:  # a failed test must not leave tracing on
        tracing.shutdown()


def _header(frames: list[Any]) -> list[Any]:
    first = bytes(frames[0])
    n = _HLEN.unpack_from(first)[0]
    return msgpack.unpackb(first[2 : 2 + n])


def _frames(header: list[Any], payload: Any = None) -> list[bytes]:
    h = msgpack.packb(header)
    return [_HLEN.pack(len(h)) + h + msgpack.packb(payload)]


# ---------------------------------------------------------------------- the wire field
def test_untraced_header_is_todays_six_fields_byte_for_byte() -> None:
    env = Envelope(kind=Kind.ECHO, id=bytes(range(16)), task="t", tags=("a",), payload=1)
    frames = WireCodec().encode(env)
    want = msgpack.packb([PROTOCOL_VERSION, "echo", bytes(range(16)), "t", None, ["a"]])
    assert bytes(frames[0]) == _HLEN.pack(len(want)) + want + msgpack.packb(1)


def test_trace_field_round_trips_and_is_appended_only_when_set() -> None:
    codec = WireCodec()
    env = Envelope(kind=Kind.INFER, payload={"x": 1}, trace=(TP, ""))
    assert _header(codec.encode(env))[6:] == [TP]  # an empty tracestate is not sent
    assert codec.decode(codec.encode(env)).trace == (TP, "")
    env.trace = (TP, "vendor=abc,other=1")
    assert _header(codec.encode(env))[6:] == [TP, "vendor=abc,other=1"]
    assert codec.decode(codec.encode(env)).trace == (TP, "vendor=abc,other=1")


def test_old_six_field_message_decodes_untraced() -> None:
    env = WireCodec().decode(_frames([PROTOCOL_VERSION, "echo", bytes(16), "", None, []], 7))
    assert env.trace is None and env.payload == 7


def test_unknown_trailing_fields_are_ignored() -> None:
    header = [PROTOCOL_VERSION, "echo", bytes(16), "", None, [], TP, "k=v", {"future": 1}, 9]
    env = WireCodec().decode(_frames(header, 7))
    assert env.trace == (TP, "k=v") and env.payload == 7


def test_header_of_five_fields_is_still_refused() -> None:
    with pytest.raises(MalformedMessage, match="at least 6"):
        WireCodec().decode(_frames([PROTOCOL_VERSION, "echo", bytes(16), "", None]))


@pytest.mark.parametrize(
    "bad",
    [
        None,
        5,
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # bytes, not a string
        TP.upper(),  # hex must be lower case
        TP + "-extra",
        TP[:-1],
        "01" + TP[2:],  # only version 00 is read
        "ff" + TP[2:],
        "00-" + "0" * 32 + "-b7ad6b7169203331-01",  # all-zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01",  # all-zero span id
        "00-0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331-01",
        "x" * 60_000,
        ["00", "0af7651916cd43dd8448eb211c80319c"],
        {"traceparent": TP},
        "00-0af7651916cd43dd8448eb211c80319é-b7ad6b7169203331-01",
    ],
)
def test_bad_traceparent_is_ignored_and_the_request_served(bad: Any) -> None:
    header = [PROTOCOL_VERSION, "echo", bytes(16), "", None, [], bad, "k=v"]
    env = WireCodec().decode(_frames(header, 7))
    assert env.trace is None and env.payload == 7


@pytest.mark.parametrize(
    "state",
    [
        5,
        b"k=v",
        "k=\x00v",
        "k=é",
        "k=\n",
        "k=" + "x" * (MAX_TRACESTATE_BYTES - 1),  # over the length
        "=" * 250,  # printable, not W3C: OpenTelemetry would log a warning per message
        "K=v",  # keys are lower case
        "a=1,a=2",  # a key twice
        ",".join(f"k{i}=v" for i in range(33)),  # over 32 members
    ],
)
def test_bad_tracestate_is_dropped_alone(state: Any) -> None:
    assert trace_field(TP, state) == (TP, "")


@pytest.mark.parametrize("state", ["rojo=00f067aa0ba902b7,congo=t61rcWkgMzE", "t@sys=v, b=1"])
def test_w3c_tracestate_is_kept(state: str) -> None:
    assert trace_field(TP, state) == (TP, state)
    long = "k=" + "x" * 250  # a value is at most 256 characters
    assert trace_field(TP, long) == (TP, long)


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary()
)
_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=4), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.lists(_values, max_size=4), st.text(max_size=80))
def test_any_trailing_fields_never_crash_the_decoder(extra: list[Any], text: str) -> None:
    codec = WireCodec()
    for tail in (extra, [text, *extra], [TP, text]):
        env = codec.decode(_frames([PROTOCOL_VERSION, "echo", bytes(16), "", None, [], *tail]))
        assert env.trace is None or trace_field(*env.trace) == env.trace
        if env.trace is not None:
            assert len(env.trace[0]) == 55 and len(env.trace[1]) <= MAX_TRACESTATE_BYTES


# ---------------------------------------------------------------------- configuration
def test_off_without_config_or_environment() -> None:
    assert tracing.configure(None, "x") is False
    assert tracing.configure(tracing.TracingSpec(), "x") is False
    assert tracing.TRACER is None


def test_endpoint_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = tracing.TracingSpec(otlp_endpoint="http://a:4318/v1/traces")
    empty = tracing.TracingSpec()  # `tracing: {}`: the endpoint from the environment
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://b:4318/")
    # a variable alone (injected into every pod) does not turn tracing on: a traced message
    # needs an upgraded worker, so tracing takes a `tracing` section
    assert tracing.resolve_endpoint(None) is None
    assert tracing.configure(None, "x") is False
    assert tracing.resolve_endpoint(empty) == "http://b:4318/v1/traces"
    assert tracing.resolve_endpoint(spec) == "http://a:4318/v1/traces"  # the config wins
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c/x")
    assert tracing.resolve_endpoint(empty) == "http://c/x"
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.resolve_endpoint(empty) is None
    assert tracing.resolve_endpoint(spec) is None


@pytest.mark.parametrize(
    ("tracing_block", "key"),
    [
        ({"sample_ratio": 1.5}, "sample_ratio"),
        ({"otlp_endpoint": "collector:4318"}, "otlp_endpoint"),
        ({"endpoint": "http://x"}, "endpoint"),
    ],
)
def test_bad_tracing_config_names_the_key(tmp_path: Path, tracing_block: dict, key: str) -> None:
    from tandem.cloud.config import WorkerConfig

    path = tmp_path / "worker.yaml"
    path.write_text(yaml.safe_dump({"tracing": tracing_block}))
    with pytest.raises(ConfigError) as err:
        load_config(path, WorkerConfig, base_dir=tmp_path)
    assert "tracing" in err.value.message and key in err.value.message
    assert str(path) in err.value.message


def test_configure_nests_and_shutdown_flushes() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    assert tracing.configure(None, "t", exporter=exporter)
    assert tracing.configure(None, "t", exporter=InMemorySpanExporter())  # nested: kept
    with tracing.TRACER.start_as_current_span("outer"):
        pass
    tracing.shutdown()
    assert tracing.TRACER is not None  # one user left
    tracing.shutdown()
    assert tracing.TRACER is None
    assert [s.name for s in exporter.get_finished_spans()] == ["outer"]  # flushed


# ---------------------------------------------------------------------- end to end
class _Collector:
    """An OTLP/HTTP receiver on loopback: decodes ExportTraceServiceRequest protobufs."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                req = trace_service_pb2.ExportTraceServiceRequest()
                req.ParseFromString(body)
                outer.take(req)
                out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def take(self, req: Any) -> None:
        for rs in req.resource_spans:
            service = next(
                (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"),
                "",
            )
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs = {a.key: _any_value(a.value) for a in s.attributes}
                    with self.lock:
                        self.spans.append(
                            {
                                "name": s.name,
                                "service": service,
                                "trace_id": s.trace_id.hex(),
                                "span_id": s.span_id.hex(),
                                "parent": s.parent_span_id.hex(),
                                "attrs": attrs,
                                "status": s.status.code,
                                "start": s.start_time_unix_nano,
                                "end": s.end_time_unix_nano,
                            }
                        )

    def wait_for(self, names: set[str], timeout_s: float = 30.0) -> list[dict[str, Any]]:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with self.lock:
                if names <= {s["name"] for s in self.spans}:
                    return list(self.spans)
            time.sleep(0.05)
        with self.lock:
            got = sorted({s["name"] for s in self.spans})
        raise AssertionError(f"spans {sorted(names)} not all exported; got {got}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _any_value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@pytest.fixture
def collector() -> Iterator[_Collector]:
    c = _Collector()
    yield c
    c.close()


def _traced_policy(make_policy: Any, endpoint: str, url: str) -> Path:
    path = make_policy(endpoint, threshold=1.0, log=False)  # escalates everything
    data = yaml.safe_load(path.read_text())
    data["tracing"] = {"otlp_endpoint": url, "service_name": "test-edge"}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.integration
def test_one_infer_is_one_trace_from_edge_to_backend(
    collector: _Collector, make_worker_config: Any, make_policy: Any, digits_x: np.ndarray
) -> None:
    from tandem.edge import EdgeRuntime

    cfg = make_worker_config(tracing={"otlp_endpoint": collector.url, "service_name": "test-w"})
    with WorkerProcess(cfg) as w:
        assert w.endpoint is not None
        with EdgeRuntime.from_policy(_traced_policy(make_policy, w.endpoint, collector.url)) as rt:
            r = rt.infer(digits_x[0])
            assert r.tier.value == "cloud"
        want = {"tandem.infer", "tandem.cloud.request", "tandem.worker.infer", "tandem.backend.run"}
        spans = collector.wait_for(want)
    by_name = {s["name"]: s for s in spans}
    root, client = by_name["tandem.infer"], by_name["tandem.cloud.request"]
    worker, run = by_name["tandem.worker.infer"], by_name["tandem.backend.run"]
    assert root["parent"] == "" and root["service"] == "test-edge"
    assert root["attrs"]["tandem.escalated"] is True
    assert root["attrs"]["tandem.tier"] == "cloud"
    assert root["attrs"]["tandem.task"] == "digits" and root["attrs"]["tandem.stage"] == "cloud"
    assert client["parent"] == root["span_id"] and client["attrs"]["tandem.attempt"] == 0
    assert client["attrs"]["tandem.endpoint"] == w.endpoint
    assert worker["service"] == "test-w" and run["service"] == "test-w"
    assert worker["parent"] == client["span_id"]  # across the wire
    assert run["parent"] == worker["span_id"]
    assert {s["trace_id"] for s in (root, client, worker, run)} == {root["trace_id"]}
    assert worker["attrs"]["tandem.model"] == "digits-cloud"
    assert worker["attrs"]["tandem.batch_rows"] == 1
    assert (
        worker["attrs"]["tandem.request_id"] == r.request_id == client["attrs"]["tandem.request_id"]
    )
    assert worker["start"] <= run["start"] <= run["end"] <= worker["end"]


@pytest.mark.integration
def test_hostile_trace_fields_never_hurt_the_worker(
    collector: _Collector, make_worker_config: Any
) -> None:
    cfg = make_worker_config(tracing={"otlp_endpoint": collector.url})
    with WorkerProcess(cfg) as w, CloudClient(w.endpoint) as client:
        for bad in [("x" * 5000, "y" * 5000), ("00-" + "z" * 52, "\x00"), (TP, "é" * 300)]:
            env = Envelope(kind=Kind.ECHO, payload=b"hi", trace=bad)
            # the client re-sets env.trace only while tracing is on here (it is not)
            assert client.request(env, 5.0).payload == b"hi"
        assert client.health()["state"] == "serving"
        spans = collector.wait_for({"tandem.worker.echo"})
    echo = [s for s in spans if s["name"] == "tandem.worker.echo"]
    assert len(echo) == 3
    # the bad traceparents start traces of their own; the good one with a bad state is kept
    assert sum(s["trace_id"] == TP[3:35] for s in echo) == 1
