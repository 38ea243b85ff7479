"""Network emulation on loopback: a relay between edge clients and a cloud worker that
delays, jitters, rate-limits and cuts the link, with no privileges (no ``tc netem``).

``python -m tandem.bench.netem --target tcp://127.0.0.1:5556 --listen tcp://127.0.0.1:5557
--profile lte`` (or ``--delay-ms 10 --jitter-ms 2 --bandwidth 1e6``)

Three parts: the link model — a :class:`~tandem.bench.link.LinkProfile` (the built-in ones in
:data:`~tandem.bench.link.PROFILES`) and the schedule that says when each message is delivered
(:mod:`tandem.bench.link`); the relay's event loop, which forwards, drops during outages and
bounds its queues (:class:`~tandem.bench.relay.Relay`, :mod:`tandem.bench.relay`); and this
module, which runs a relay in a child process of its own (:func:`start_relay`: it shares no
GIL with the process measured) and is its command line. The profiles are importable from here
too: ``from tandem.bench.netem import custom, profile, start_relay``.

**CLI output.** The first line on stdout is the bound endpoint; a line a second on stderr
gives messages and bytes forwarded each way, drops and queue depths (``--stats-every-s``); on
SIGTERM/SIGINT the relay stops, drops what it still holds and prints its counters as one JSON
line on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import IO, Any

import zmq

from tandem.bench.link import PROFILES, LinkProfile, custom, profile
from tandem.bench.relay import Relay

__all__ = ["PROFILES", "LinkProfile", "RelayHandle", "custom", "main", "profile", "start_relay"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- in a child process
class RelayHandle:
    """A relay in a child process (:func:`start_relay`). ``endpoint`` is where clients
    connect; :meth:`stop` ends it and returns its counters (:meth:`Relay.stats`)."""

    def __init__(self, proc: subprocess.Popen[bytes], endpoint: str) -> None:
        self.proc = proc
        self.endpoint = endpoint
        self.final_stats: dict[str, Any] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """SIGTERM, wait, return the relay's final counters ({} if it had to be killed)."""
        if self.final_stats is not None:
            return self.final_stats
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            log.warning("relay %d did not stop in %.1f s: killed", self.pid, timeout_s)
        self.final_stats = {}
        for line in reversed(out.decode(errors="replace").splitlines()):
            if line.startswith("{"):
                self.final_stats = json.loads(line)
                break
        return self.final_stats

    def __enter__(self) -> RelayHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_relay(
    target: str,
    link: LinkProfile | str = "lan",
    listen: str = "tcp://127.0.0.1:0",
    *,
    outages: Sequence[tuple[float, float]] = (),
    seed: int | None = None,
    max_clients: int = 256,
    idle_s: float = 120.0,
    stats_every_s: float = 0.0,
    startup_timeout_s: float = 10.0,
    stderr: IO[Any] | int | None = None,
) -> RelayHandle:
    """Start ``python -m tandem.bench.netem`` relaying ``listen`` → ``target`` with ``link``
    (a :class:`LinkProfile` or a built-in profile's name); returns once it is bound. Outage
    windows count from the bind, i.e. from about when this returns."""
    if isinstance(link, str):
        link = profile(link)
    opts = {
        "--target": target,
        "--listen": listen,
        "--name": link.name,
        "--delay-ms": link.delay_ms,
        "--jitter-ms": link.jitter_ms,
        "--max-clients": max_clients,
        "--idle-s": idle_s,
        "--stats-every-s": stats_every_s,
    }
    cmd = [sys.executable, "-m", "tandem.bench.netem"]
    cmd += [str(x) for kv in opts.items() for x in kv]
    if link.bandwidth is not None:
        cmd += ["--bandwidth", str(link.bandwidth)]
    if link.down:
        cmd.append("--down")
    if seed is not None:
        cmd += ["--seed", str(seed)]
    for a, b in outages:
        cmd += ["--outage", f"{a}:{b}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr)
    assert proc.stdout is not None
    deadline = time.monotonic() + startup_timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"relay not bound after {startup_timeout_s:.0f} s")
        line = proc.stdout.readline().decode().strip()
        if line:
            return RelayHandle(proc, line)
        proc.wait()
        raise RuntimeError(f"relay exited with code {proc.returncode} during start-up")


# ---------------------------------------------------------------------- CLI
def _outage(text: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"an outage is START:END in seconds, got {text!r}"
        ) from None
    return a, b


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m tandem.bench.netem",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--target", required=True, help="the worker's endpoint")
    ap.add_argument("--listen", default="tcp://127.0.0.1:*", help="where clients connect")
    ap.add_argument("--profile", choices=sorted(PROFILES), help="a built-in profile")
    ap.add_argument("--name", help="the profile's name in logs")
    ap.add_argument("--delay-ms", type=float, help="one-way delay, ms (overrides --profile)")
    ap.add_argument("--jitter-ms", type=float, help="uniform ± jitter, ms (overrides --profile)")
    ap.add_argument("--bandwidth", type=float, help="bytes/s each way (overrides --profile)")
    ap.add_argument("--down", action="store_true", help="the link is down (drop everything)")
    ap.add_argument(
        "--outage",
        type=_outage,
        action="append",
        default=[],
        metavar="START:END",
        help="seconds after the bind when the link is down; repeatable",
    )
    ap.add_argument("--seed", type=int, help="seed of the jitter draws")
    ap.add_argument("--max-clients", type=int, default=256, help="client DEALERs kept at most")
    ap.add_argument("--idle-s", type=float, default=120.0, help="close a client silent this long")
    ap.add_argument("--max-queue-messages", type=int, default=1024, help="per direction")
    ap.add_argument("--max-queue-bytes", type=int, default=64 * 1024 * 1024, help="per direction")
    ap.add_argument("--stats-every-s", type=float, default=1.0, help="0: no stats lines")
    ap.add_argument("--quiet", action="store_true", help="warnings only on stderr")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s netem %(message)s",
        stream=sys.stderr,
    )
    link = profile(args.profile) if args.profile else custom()
    overrides: dict[str, Any] = {
        k: v
        for k, v in (
            ("name", args.name),
            ("delay_ms", args.delay_ms),
            ("jitter_ms", args.jitter_ms),
            ("bandwidth", args.bandwidth),
        )
        if v is not None
    }
    if args.down:
        overrides["down"] = True
    try:
        link = replace(link, **overrides)
        relay = Relay(
            args.target,
            link,
            listen=args.listen,
            outages=args.outage,
            seed=args.seed,
            max_clients=args.max_clients,
            idle_s=args.idle_s,
            max_queue_messages=args.max_queue_messages,
            max_queue_bytes=args.max_queue_bytes,
            stats_every_s=args.stats_every_s,
            context=zmq.Context(),
        )
    except ValueError as e:
        ap.error(str(e))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: relay.stop())

    def ready(endpoint: str) -> None:
        print(endpoint, flush=True)

    stats = relay.serve(ready)
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
