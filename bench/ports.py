"""Free TCP ports on loopback, for what ``tandem bench`` and the developer benchmarks start
there (netem relays, workers on fixed ports, ``llama_cpp.server``)."""

from __future__ import annotations

import contextlib
import socket


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that were free a moment ago: all are bound at
    once (so no two are the same) and released before this returns. Another process may take
    one before the caller binds it; callers that must not race bind port 0 themselves."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
