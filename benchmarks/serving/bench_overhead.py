"""Is ``tandem bench`` the bottleneck? Its load generator against a bare pyzmq loop, same worker.

``python -m benchmarks.serving.bench_overhead [--seconds S] [--concurrency 1 4] [--rounds R] [--json PATH]``

One real worker process with no models on TCP loopback answers ``echo`` requests; at each
concurrency level (closed loop, that many client threads) three clients take turns:

* **bare** (the reference): per thread one DEALER socket connected to the worker, sending the
  same encoded echo envelope the :class:`CloudClient` sends (encoded once per thread with the
  project's :class:`WireCodec`) and receiving the reply, nothing else — the fastest loop a user
  would write for this exchange. One envelope per thread is enough: a worker answers ``echo``
  before it looks at its reply cache, so a repeated request id is answered afresh, never
  replayed, and the budget in it is not checked for ``echo``.
* **tool**: :func:`tandem.bench.load.run_level` in closed loop whose call is that same
  exchange on the same sockets: the load generator as ``tandem bench`` runs it (HDR histograms,
  windows, the shared lock) around the bare exchange. **The goal is on this side**: the tool
  sustains ≥ 0.90 of the bare loop's rate (``tool/bare``), i.e. it is not the bottleneck.
* **client**: :meth:`CloudClient.echo` in a plain loop (one client shared by the threads, as
  the edge runtime shares it): what Tandem's client library costs — part of the system a
  scenario measures, not of the tool.
* **tool+client**: ``run_level`` calling ``CloudClient.echo``: what ``tandem bench`` against
  an SDK target adds on top of the client (``tool+client / client``).

Each side runs for the same warm-up and the same measured time, in rounds whose order
alternates (bare, tool, client, tool+client, then the reverse, ...) so drift in machine load
hits all alike; rates are answers over measured seconds, summed over the rounds. The client
process's CPU time per answer (all its threads, ZeroMQ's I/O thread included) says where the
client side's time goes even when the worker, not the client, sets the rate. Last, per level,
**generator only**: ``run_level`` with a call that returns at once — the load generator's own
ceiling, no I/O.

The bare and client loops (:func:`_measure_threads`) are deliberately not the tool's closed
loop (:mod:`tandem.bench.load`): they are what it is measured against.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from benchmarks.common import emit
from tandem.bench.load import run_level
from tandem.bench.stats import Outcome
from tandem.cloud.config import WorkerConfig
from tandem.cloud.process import WorkerProcess
from tandem.runtime.client import CloudClient
from tandem.runtime.wire import Envelope, Kind, WireCodec, deadline_after

GOAL = 0.90
SIDES = ("bare", "tool", "client", "tool+client")
_WINDOWS = 3  # windows per tool round (min_windows = max_windows: every round runs as long)
_TIMEOUT_S = 2.0  # per request, every side (a lost worker fails the run, never hangs it)


@dataclass
class Span:
    """One side's turn: answers in ``seconds`` of measured time, and the client process's CPU
    seconds (all threads) over the same span."""

    answers: int
    seconds: float
    cpu_s: float
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.answers / self.seconds if self.seconds > 0 else 0.0


def echo_payload(n_bytes: int) -> np.ndarray:
    """A float32 array of ``n_bytes`` (rounded down to whole floats): what a small model's
    request carries (256 bytes: one 8×8 digit as 64 floats)."""
    return np.arange(max(1, n_bytes // 4), dtype=np.float32)


_Loop = Callable[[int, list[int], list[int], list[bool]], None]


def _measure_threads(
    loop: _Loop, concurrency: int, warmup_s: float, measure_s: float
) -> tuple[int, float, float, int]:
    """Run ``loop(k, counts, errors, stop)`` on ``concurrency`` threads; count answers (the
    threads bump ``counts[k]``) from ``warmup_s`` after the start for ``measure_s``."""
    counts = [0] * concurrency
    errors = [0] * concurrency
    stop: list[bool] = [False]
    threads = [
        threading.Thread(target=loop, args=(k, counts, errors, stop), daemon=True)
        for k in range(concurrency)
    ]
    for th in threads:
        th.start()
    time.sleep(warmup_s)
    n0, e0, c0, t0 = sum(counts), sum(errors), time.process_time(), time.perf_counter()
    time.sleep(measure_s)
    n1, e1, c1, t1 = sum(counts), sum(errors), time.process_time(), time.perf_counter()
    stop[0] = True
    for th in threads:
        th.join(_TIMEOUT_S * 2)
    return n1 - n0, t1 - t0, c1 - c0, e1 - e0


def run_bare(
    socks: list[zmq.Socket], frames: list[list[bytes]], warmup_s: float, measure_s: float
) -> Span:
    """The reference loop: send the encoded envelope, receive the reply, count it."""

    def loop(k: int, counts: list[int], errors: list[int], stop: list[bool]) -> None:
        sock = socks[k]
        (frame,) = frames[k]
        send, recv = sock.send, sock.recv
        try:
            while not stop[0]:
                send(frame)
                recv()
                counts[k] += 1
        except zmq.ZMQError:  # no reply in _TIMEOUT_S: the worker is gone; this thread stops
            errors[k] += 1

    n, secs, cpu, err = _measure_threads(loop, len(socks), warmup_s, measure_s)
    return Span(n, secs, cpu, err)


def run_client(
    client: CloudClient, payload: Any, concurrency: int, warmup_s: float, measure_s: float
) -> Span:
    """``CloudClient.echo`` in the same plain loop: the library without the load generator."""

    def loop(k: int, counts: list[int], errors: list[int], stop: list[bool]) -> None:
        echo = client.echo
        while not stop[0]:
            try:
                echo(payload, _TIMEOUT_S)
            except Exception:
                errors[k] += 1
                continue
            counts[k] += 1

    n, secs, cpu, err = _measure_threads(loop, concurrency, warmup_s, measure_s)
    return Span(n, secs, cpu, err)


def run_tool(
    call: Callable[[int], Outcome], concurrency: int, warmup_s: float, measure_s: float
) -> Span:
    """``run_level`` (closed loop) calling ``call``, ``_WINDOWS`` windows."""
    c0 = time.process_time()
    run = run_level(
        call,
        1,
        mode="closed",
        point=concurrency,
        warmup_s=warmup_s,
        window_s=measure_s / _WINDOWS,
        min_windows=_WINDOWS,
        max_windows=_WINDOWS,
        stable_windows=_WINDOWS,
    )
    cpu = time.process_time() - c0  # the whole run: warm-up, windows, drain
    s = run.stats
    done = run.warmup_answers + s.answers + run.drained
    return Span(s.answers, s.span_s, cpu * s.answers / max(done, 1), sum(s.errors.values()))


def bare_call(socks: list[zmq.Socket], frames: list[list[bytes]]) -> Callable[[int], Outcome]:
    """The bare exchange as a ``run_level`` call: each client thread takes one of the sockets
    (and its envelope) for good on its first call."""
    cloud = Outcome(tier="cloud")
    free = list(zip(socks, frames, strict=True))
    lock = threading.Lock()
    mine = threading.local()

    def call(i: int) -> Outcome:
        pair = getattr(mine, "pair", None)
        if pair is None:
            with lock:
                pair = mine.pair = free.pop()
        sock, (frame,) = pair
        sock.send(frame)
        sock.recv()
        return cloud

    return call


def client_call(client: CloudClient, payload: Any) -> Callable[[int], Outcome]:
    cloud = Outcome(tier="cloud")  # what an escalated answer's call returns, minus the split

    def call(i: int) -> Outcome:
        client.echo(payload, _TIMEOUT_S)
        return cloud

    return call


def generator_ceiling(concurrency: int, warmup_s: float, measure_s: float) -> Span:
    """``run_level`` with a call that returns at once: the most answers/s the load generator
    itself can count at this concurrency on this machine (its own cost, no I/O at all)."""
    cloud = Outcome(tier="cloud")
    return run_tool(lambda i: cloud, concurrency, warmup_s, measure_s)


def measure(
    endpoint: str,
    *,
    concurrency: list[int],
    seconds: float,
    rounds: int = 5,
    warmup_s: float = 0.25,
    payload_bytes: int = 256,
) -> dict[str, Any]:
    """Measure all three sides at each concurrency against the worker at ``endpoint``:
    ``seconds`` of measured time per side and level, split over ``rounds`` interleaved rounds
    (each preceded by ``warmup_s`` of warm-up). Returns the results' JSON (rates in answers/s,
    CPU in µs per answer)."""
    payload = echo_payload(payload_bytes)
    codec = WireCodec()
    ctx = zmq.Context.instance()
    measure_s = seconds / rounds
    levels: dict[str, Any] = {}
    with CloudClient(endpoint) as client:
        np.testing.assert_array_equal(client.echo(payload), payload)
        for c in concurrency:
            socks, frames = [], []
            for _ in range(c):
                env = Envelope(kind=Kind.ECHO, payload=payload, deadline=deadline_after(_TIMEOUT_S))
                f = codec.encode(env)
                if len(f) != 1:
                    raise ValueError("payload_bytes too large: the bare loop sends one frame")
                frames.append(f)
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVTIMEO, int(_TIMEOUT_S * 1e3))
                sock.connect(endpoint)
                socks.append(sock)
            spans: dict[str, list[Span]] = {k: [] for k in SIDES}
            runners = {
                "bare": lambda socks=socks, frames=frames: run_bare(
                    socks, frames, warmup_s, measure_s
                ),
                # a fresh call each turn: its threads take the sockets anew
                "tool": lambda c=c, socks=socks, frames=frames: run_tool(
                    bare_call(socks, frames), c, warmup_s, measure_s
                ),
                "client": lambda c=c: run_client(client, payload, c, warmup_s, measure_s),
                "tool+client": lambda c=c: run_tool(
                    client_call(client, payload), c, warmup_s, measure_s
                ),
            }
            try:
                for r in range(rounds):
                    for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                        spans[side].append(runners[side]())
            finally:
                for sock in socks:
                    sock.close(linger=0)
            levels[str(c)] = _level_json(spans)
            g = generator_ceiling(c, warmup_s, measure_s)
            levels[str(c)]["generator_only"] = {
                "rate": g.rate,
                "cpu_us_per_answer": g.cpu_s / g.answers * 1e6 if g.answers else None,
            }
    return {
        "goal": GOAL,
        "reference": "bare pyzmq DEALER loop, same encoded echo envelope, same worker",
        "payload_bytes": int(payload.nbytes),
        "seconds": seconds,
        "rounds": rounds,
        "warmup_s": warmup_s,
        "levels": levels,
    }


def _level_json(spans: dict[str, list[Span]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side, ss in spans.items():
        n = sum(s.answers for s in ss)
        secs = sum(s.seconds for s in ss)
        out[side] = {
            "rate": n / secs if secs > 0 else 0.0,
            "answers": n,
            "seconds": secs,
            "errors": sum(s.errors for s in ss),
            "cpu_us_per_answer": sum(s.cpu_s for s in ss) / n * 1e6 if n else None,
            "round_rates": [s.rate for s in ss],
        }
    rate = {side: out[side]["rate"] for side in SIDES}
    bare = rate["bare"]
    out["ratio"] = rate["tool"] / bare if bare > 0 else 0.0
    out["client_ratio"] = rate["client"] / bare if bare > 0 else 0.0
    out["tool_client_ratio"] = rate["tool+client"] / bare if bare > 0 else 0.0
    out["tool_vs_client"] = rate["tool+client"] / rate["client"] if rate["client"] > 0 else 0.0
    out["round_ratios"] = [
        t.rate / b.rate if b.rate > 0 else 0.0
        for t, b in zip(spans["tool"], spans["bare"], strict=True)
    ]
    out["round_ratio_median"] = float(np.median(out["round_ratios"]))
    out["meets_goal"] = out["ratio"] >= GOAL and out["tool"]["errors"] == 0
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--seconds",
        type=float,
        default=3.0,
        help="measured seconds per side and concurrency, over all rounds (default 3)",
    )
    ap.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 4], help="client threads (default 1 4)"
    )
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument(
        "--warmup", type=float, default=0.25, help="warm-up s before each turn (default 0.25)"
    )
    ap.add_argument("--payload-bytes", type=int, default=256, help="echo payload (default 256)")
    ap.add_argument("--json", default=None, help="results file (default bench-overhead.json)")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1 or min(args.concurrency) < 1:
        ap.error("--seconds, --rounds and --concurrency must be positive")

    with WorkerProcess(WorkerConfig(bind="tcp://127.0.0.1:*")) as worker:
        assert worker.endpoint is not None
        data = measure(
            worker.endpoint,
            concurrency=args.concurrency,
            seconds=args.seconds,
            rounds=args.rounds,
            warmup_s=args.warmup,
            payload_bytes=args.payload_bytes,
        )
    rows = []
    for c, lv in data["levels"].items():
        rows.append(
            [
                c,
                f"{lv['bare']['rate']:,.0f}",
                f"{lv['tool']['rate']:,.0f}",
                f"{lv['ratio']:.3f}",
                f"{min(lv['round_ratios']):.2f}–{max(lv['round_ratios']):.2f}",
                "yes" if lv["meets_goal"] else "NO",
                f"{lv['client']['rate']:,.0f}",
                f"{lv['tool+client']['rate']:,.0f}",
                f"{lv['tool_vs_client']:.2f}",
                f"{lv['generator_only']['rate']:,.0f}",
                _us(lv["bare"]["cpu_us_per_answer"]),
                _us(lv["tool"]["cpu_us_per_answer"]),
                _us(lv["client"]["cpu_us_per_answer"]),
            ]
        )
    emit(
        "overhead",
        f"tandem bench's load generator vs a bare pyzmq loop: echo of {data['payload_bytes']} B "
        f"to one worker over TCP loopback (answers/s; {args.rounds} interleaved rounds, "
        f"{args.seconds:g} s measured per side)",
        [
            "clients",
            "bare req/s",
            "tool req/s",
            "tool/bare",
            "per round",
            f"≥{GOAL:.2f}",
            "CloudClient req/s",
            "tool+CloudClient req/s",
            "tool overhead on CloudClient",
            "generator only req/s",
            "bare CPU µs/req",
            "tool CPU µs/req",
            "CloudClient CPU µs/req",
        ],
        rows,
        data,
        args.json,
    )


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


if __name__ == "__main__":
    main()
