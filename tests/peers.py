"""Peers for tests: bare pyzmq sockets (what a misbehaving or non-Tandem client would use),
and a worker serving in a thread with backends the test builds."""

from __future__ import annotations

import threading
from typing import Any

import zmq

from tandem.bench.ports import free_ports
from tandem.runtime.wire import Envelope, WireCodec


def raw_socket(endpoint: str, socket_type: int = zmq.DEALER) -> zmq.Socket:
    """A bare pyzmq socket: what a misbehaving or non-Tandem peer would use."""
    s = zmq.Context.instance().socket(socket_type)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def raw_exchange(endpoint: str, frames: list[bytes], socket_type: int = zmq.DEALER) -> Envelope:
    s = raw_socket(endpoint, socket_type)
    try:
        s.send_multipart(frames)
        assert s.poll(5000), "worker did not answer"
        return WireCodec().decode(s.recv_multipart())
    finally:
        s.close()


class ThreadWorker:
    """A :class:`~tandem.cloud.worker.CloudWorker` serving in a thread of this process, on a
    real loopback socket, with backends built by the test (e.g. one that is slow on purpose).
    ``stop()`` drains it the way SIGTERM would."""

    def __init__(self, config: Any, backends: dict[str, Any]) -> None:
        from tandem.cloud.worker import CloudWorker

        self.worker = CloudWorker(config, backends)
        self.endpoint = ""
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-worker", daemon=True)

    def _serve(self) -> None:
        def ready(endpoint: str) -> None:
            self.endpoint = endpoint
            self._ready.set()

        self.worker.serve(ready)

    def __enter__(self) -> ThreadWorker:
        self._thread.start()
        assert self._ready.wait(10), "worker thread did not start"
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.worker.stop()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "worker thread did not stop"

    def __exit__(self, *exc: Any) -> None:
        if self._thread.is_alive():
            self.stop()


def free_endpoint() -> str:
    """A TCP endpoint on loopback that nothing listened on a moment ago."""
    return f"tcp://127.0.0.1:{free_ports()[0]}"
