"""Structured JSON logs with request ids (tandem.runtime.logs), and ``--log-format json`` on a
real ``tandem cloud serve`` process."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import yaml
import zmq

from tandem.runtime import logs
from tandem.runtime.wire import PROTOCOL_VERSION

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def capture() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("tandem.test.logs")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger, stream


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_is_one_json_object_with_the_extras(capture) -> None:
    logger, stream = capture
    logger.info("hello %s", "world", extra={"model": "m", "rows": 3})
    (line,) = _lines(stream)
    assert line["message"] == "hello world" and line["level"] == "INFO"
    assert line["logger"] == "tandem.test.logs" and line["model"] == "m" and line["rows"] == 3
    assert line["ts"].endswith("+00:00")
    assert "request_id" not in line


def test_request_id_and_trace_come_from_the_context(capture) -> None:
    logger, stream = capture
    token = logs.CURRENT_REQUEST.set(logs.RequestTag(bytes(range(16)), (TP, "")))
    try:
        logger.warning("inside")
    finally:
        logs.CURRENT_REQUEST.reset(token)
    logger.warning("outside")
    inside, outside = _lines(stream)
    assert inside["request_id"] == bytes(range(16)).hex()
    assert inside["trace_id"] == TP[3:35] and inside["span_id"] == TP[36:52]
    assert "request_id" not in outside and "trace_id" not in outside


def test_values_that_are_not_json_never_break_logging(capture) -> None:
    logger, stream = capture
    circular: list = []
    circular.append(circular)

    class Odd:
        def __repr__(self) -> str:
            return "<odd>"

    logger.error(
        "x", extra={"obj": Odd(), "raw": b"\x01\x02", "tags": {"a"}, "loop": circular, "n": 1.5}
    )
    (line,) = _lines(stream)
    assert line["obj"] == "<odd>" and line["n"] == 1.5
    assert isinstance(line["loop"], str)  # the circular value, as its repr


def test_exceptions_are_one_string(capture) -> None:
    logger, stream = capture
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    (line,) = _lines(stream)
    assert "ValueError: boom" in line["exception"] and "Traceback" in line["exception"]


def test_bad_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="format"):
        logs.configure_logging("info", "xml", io.StringIO())
    with pytest.raises(ValueError, match="level"):
        logs.configure_logging("loud", "json", io.StringIO())


@pytest.mark.integration
def test_cloud_serve_logs_json_lines(tmp_path: Path) -> None:
    cfg = tmp_path / "worker.yaml"
    cfg.write_text(yaml.safe_dump({"bind": "tcp://127.0.0.1:*"}))
    ready = tmp_path / "ready"
    cmd = [sys.executable, "-m", "tandem.cli", "cloud", "serve", "--config", str(cfg)]
    cmd += ["--ready-file", str(ready), "--log-format", "json", "--log-level", "debug"]
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env={**os.environ}, text=True
    )
    rid = os.urandom(16)
    try:
        end = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, "the worker exited before it was ready"
            assert time.monotonic() < end, "the worker did not get ready"
            time.sleep(0.05)
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ready.read_text())
        header = msgpack.packb([PROTOCOL_VERSION, "echo", rid, "", None, [], TP])
        sock.send(struct.pack("<H", len(header)) + header + b"\xc1")  # \xc1: never msgpack
        assert sock.poll(10_000), "no answer to the bad message"
        sock.recv_multipart()
        sock.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]  # every line: JSON
    assert any(line["message"].startswith("worker listening") for line in lines)
    bad = [line for line in lines if line["message"].startswith("bad message")]
    assert len(bad) == 1 and bad[0]["level"] == "DEBUG"
    assert bad[0]["request_id"] == rid.hex() and bad[0]["error"] == "wire.malformed"
