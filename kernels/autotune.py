"""Per-machine choice between Tandem's kernel and the library call (Triton's autotune pattern).

A kernel tuned on one CPU can lose to BLAS on another (the skinny GEMM that beat torch 2× on
an AMD EPYC with AVX2 ran 2.5× slower than numpy's ``@`` on an Intel Xeon with AVX-512). So
every hot-path operation that has both a Tandem kernel and a library formulation asks
:func:`choose` once per *shape class* (a bucket of sizes whose best implementation is the
same): each candidate runs once to warm up (JIT compile, caches), then the candidates are timed
in interleaved rounds (so a change in the machine's load hits all of them alike) and the one
with the lowest median wins. The winner is cached for the process, logged once, and reported
by :func:`choices` (what ``health`` and the benchmarks print).

Candidate names say the side: a name starting with ``"tandem"`` is Tandem's kernel, any other
name a library formulation (numpy/torch BLAS, transformers' own loops). A Tandem candidate must
beat the best library one by :data:`TANDEM_MARGIN` to be chosen: on a tie the library call,
which its vendor tuned for this CPU, is the safer pick.

Cost, bounded per shape class: one warm-up call per candidate, then at most ``repeats`` rounds
and no more than :data:`BUDGET_S` of timing once :data:`MIN_REPEATS` rounds are in; a candidate
:data:`DROP_FACTOR` times slower than the best after the first round is not timed again; a
sample of a very short call repeats it until it lasts :data:`MIN_SAMPLE_S` (timer resolution).
For the linear kernel that is a few milliseconds per class on an idle machine; for a whole MoE
block, a few calls of each formulation. Choices are made under whatever load the machine has
at warm-up, and kept: a choice made on a busy machine can be the wrong one later.

``TANDEM_KERNELS`` (environment, read at import and by :func:`reset`) forces a side:

* ``auto`` (default): time the candidates, keep the fastest;
* ``tandem``: only Tandem's candidates (the kernels as written, whatever this machine makes
  of them) — for tests and for benchmarks that measure both sides;
* ``library``: only the library candidates.

A side with no candidate for an operation falls back to all of them. Within the forced side,
several candidates are still timed.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BUDGET_S",
    "ENV_VAR",
    "MODES",
    "Choice",
    "choices",
    "choose",
    "forced",
    "mode",
    "on_reset",
    "reset",
    "set_mode",
    "timings",
]

log = logging.getLogger(__name__)

ENV_VAR = "TANDEM_KERNELS"
MODES = ("auto", "tandem", "library")
TANDEM_PREFIX = "tandem"

# Rounds of timing per shape class: the median of these decides.
DEFAULT_REPEATS = 5
MIN_REPEATS = 3
# Once MIN_REPEATS rounds are in, stop timing a shape class after this long (seconds).
BUDGET_S = 0.02
# A sample repeats a short call until it lasts this long (the clock's resolution and the
# Python loop are then under 1% of it), at most MAX_INNER times.
MIN_SAMPLE_S = 20e-6
MAX_INNER = 64
# Tandem's candidate must be this much faster (relative) than the best library candidate.
TANDEM_MARGIN = 0.03
# After the first round, a candidate this many times slower than the fastest stops being timed
# (it cannot win; on a loaded VM a library's spinning thread pool can take 1000× its time).
DROP_FACTOR = 8.0


@dataclass(frozen=True, slots=True)
class Choice:
    """The winner for one (op, shape class), with the median µs per call of each candidate
    (empty when only one candidate was left to run)."""

    winner: str
    times_us: Mapping[str, float] = field(default_factory=dict)
    mode: str = "auto"


_lock = threading.RLock()
_choices: dict[tuple[str, tuple[Any, ...]], Choice] = {}
_reset_hooks: list[Callable[[], None]] = []


def _mode_from_env() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV_VAR}={value!r}: use one of {', '.join(MODES)}")
    return value


_mode = _mode_from_env()


def is_tandem(name: str) -> bool:
    """Whether a candidate name is Tandem's side (``"tandem"``, ``"tandem_serial"``…)."""
    return name.startswith(TANDEM_PREFIX)


def shape_key(shape_class: tuple[Any, ...]) -> str:
    """The printable form of a shape class: its parts joined with commas."""
    return ",".join(str(p) for p in shape_class)


def choose(
    op: str,
    shape_class: tuple[Any, ...],
    candidates: Mapping[str, Callable[[], object]],
    *,
    repeats: int = DEFAULT_REPEATS,
    budget_s: float = BUDGET_S,
) -> str:
    """The name of the fastest of ``candidates`` (zero-argument callables that each run the
    operation once on representative inputs) for ``op`` at ``shape_class``, timed on the first
    call for that pair and cached for the process. Thread-safe: concurrent first calls time
    once, the others wait for the answer. A candidate that raises while warming up drops out
    (logged); if all do, the last error is raised.

    >>> choose("demo", (1,), {"tandem": lambda: sum(range(10)), "library": lambda: 45})
    'library'
    """
    key = (op, tuple(shape_class))
    done = _choices.get(key)
    if done is not None:
        return done.winner
    if not candidates:
        raise ValueError(f"autotune {op}: no candidates")
    with _lock:
        done = _choices.get(key)
        if done is not None:
            return done.winner
        current = _mode
        pool = _side(candidates, current)
        times = _measure(op, pool, repeats, budget_s) if len(pool) > 1 else {}
        winner = _winner(times) if times else next(iter(pool))
        _choices[key] = Choice(winner, times, current)
    log.info(
        "autotune %s [%s] -> %s (%s)",
        op,
        shape_key(key[1]),
        winner,
        ", ".join(f"{n} {t:.1f} µs" for n, t in times.items()) or f"{current}: only candidate",
        extra={"op": op, "shape_class": shape_key(key[1]), "winner": winner, "times_us": times},
    )
    return winner


def _side(candidates: Mapping[str, Callable[[], object]], current: str) -> dict:
    if current == "auto":
        return dict(candidates)
    want = current == "tandem"
    pool = {n: f for n, f in candidates.items() if is_tandem(n) == want}
    return pool or dict(candidates)


def _measure(
    op: str, pool: dict[str, Callable[[], object]], repeats: int, budget_s: float
) -> dict[str, float]:
    """Median µs per call of each candidate that survives its warm-up call."""
    live: dict[str, Callable[[], object]] = {}
    error: Exception | None = None
    for name, fn in pool.items():
        try:
            fn()
        except Exception as e:  # a formulation this machine or torch build cannot run
            log.warning("autotune %s: candidate %s failed (%s); left out", op, name, e)
            error = e
        else:
            live[name] = fn
    if not live:
        assert error is not None
        raise error
    if len(live) == 1:
        return {next(iter(live)): float("nan")}
    samples: dict[str, list[float]] = {n: [] for n in live}
    inner = dict.fromkeys(live, 1)
    clock = time.perf_counter
    start = clock()
    for r in range(max(repeats, 1)):
        for name, fn in live.items():
            n = inner[name]
            t0 = clock()
            for _ in range(n):
                fn()
            dt = (clock() - t0) / n
            samples[name].append(dt)
            if r == 0:
                inner[name] = max(1, min(MAX_INNER, int(MIN_SAMPLE_S / max(dt, 1e-9))))
        if r == 0:
            fastest = min(v[0] for v in samples.values())
            live = {n: f for n, f in live.items() if samples[n][0] <= DROP_FACTOR * fastest}
        if r + 1 >= MIN_REPEATS and clock() - start > budget_s:
            break
    return {n: statistics.median(v) * 1e6 for n, v in samples.items()}


def _winner(times: Mapping[str, float]) -> str:
    ours = {n: t for n, t in times.items() if is_tandem(n)}
    theirs = {n: t for n, t in times.items() if not is_tandem(n)}
    best_ours = min(ours, key=ours.__getitem__) if ours else None
    best_theirs = min(theirs, key=theirs.__getitem__) if theirs else None
    if best_ours is None or best_theirs is None:
        return best_ours or best_theirs  # type: ignore[return-value]
    return best_ours if ours[best_ours] < theirs[best_theirs] * (1 - TANDEM_MARGIN) else best_theirs


def choices() -> dict[str, dict[str, str]]:
    """op → {shape class → winner}: what this process chose so far (``health``, benchmarks)."""
    out: dict[str, dict[str, str]] = {}
    for (op, shape), c in list(_choices.items()):
        out.setdefault(op, {})[shape_key(shape)] = c.winner
    return out


def timings() -> dict[str, dict[str, dict[str, float]]]:
    """op → {shape class → {candidate → median µs}} behind each choice (empty when forced to
    a single candidate)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (op, shape), c in list(_choices.items()):
        out.setdefault(op, {})[shape_key(shape)] = dict(c.times_us)
    return out


def mode() -> str:
    """``auto``, ``tandem`` or ``library`` (see the module docstring)."""
    return _mode


def on_reset(hook: Callable[[], None]) -> None:
    """Call ``hook`` whenever the choices are dropped (a caller's own memo of them)."""
    with _lock:
        _reset_hooks.append(hook)


def reset() -> None:
    """Forget every choice and read ``TANDEM_KERNELS`` again."""
    global _mode
    with _lock:
        _mode = _mode_from_env()
        _clear()


def set_mode(value: str) -> None:
    """Force a side (``auto``/``tandem``/``library``) for this process and forget the choices;
    overrides ``TANDEM_KERNELS`` until the next :func:`reset`."""
    global _mode
    if value not in MODES:
        raise ValueError(f"mode {value!r}: use one of {', '.join(MODES)}")
    with _lock:
        _mode = value
        _clear()


@contextmanager
def forced(value: str) -> Iterator[None]:
    """``with forced("tandem"): ...`` — run a block with one side forced, then restore the
    previous mode (choices made inside are dropped on the way in and out)."""
    before = _mode
    set_mode(value)
    try:
        yield
    finally:
        set_mode(before)


def _clear() -> None:
    _choices.clear()
    for hook in _reset_hooks:
        hook()
