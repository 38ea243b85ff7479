"""Bare pyzmq peers for tests: what a misbehaving or non-Tandem client would use."""

from __future__ import annotations

import zmq

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
