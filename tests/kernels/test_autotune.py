"""The per-machine kernel registry: timing, caching, forcing a side, threads."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from tandem.kernels import autotune


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(autotune.ENV_VAR, raising=False)
    autotune.reset()
    yield
    monkeypatch.delenv(autotune.ENV_VAR, raising=False)
    autotune.reset()


def counted(calls: Counter, name: str, seconds: float = 0.0):
    def run() -> None:
        calls[name] += 1
        if seconds:
            time.sleep(seconds)

    return run


def test_picks_the_faster_and_caches_it() -> None:
    calls: Counter = Counter()
    slow, fast = counted(calls, "tandem", 0.002), counted(calls, "library")
    assert autotune.choose("op", (1, "K=8"), {"tandem": slow, "library": fast}) == "library"
    # warmed, timed once, then dropped: 2 ms is more than DROP_FACTOR times a no-op
    assert calls["tandem"] == 2
    before = dict(calls)
    # the second ask is answered from the cache: nothing runs, even if speeds changed
    again = {"tandem": counted(calls, "tandem"), "library": counted(calls, "library", 0.002)}
    assert autotune.choose("op", (1, "K=8"), again) == "library"
    assert dict(calls) == before
    assert autotune.choices() == {"op": {"1,K=8": "library"}}
    times = autotune.timings()["op"]["1,K=8"]
    assert times["tandem"] > 1000 > times["library"]  # µs


def test_tandem_wins_when_it_is_faster() -> None:
    calls: Counter = Counter()
    pool = {"library": counted(calls, "library", 0.002), "tandem": counted(calls, "tandem")}
    assert autotune.choose("op", ("x",), pool) == "tandem"


def test_shape_classes_are_separate() -> None:
    calls: Counter = Counter()
    autotune.choose("op", ("a",), {"tandem": counted(calls, "t", 0.002), "lib": lambda: None})
    autotune.choose("op", ("b",), {"tandem": lambda: None, "lib": counted(calls, "l", 0.002)})
    autotune.choose("other", ("a",), {"tandem": lambda: None, "lib": counted(calls, "l", 0.002)})
    assert autotune.choices() == {"op": {"a": "lib", "b": "tandem"}, "other": {"a": "tandem"}}


def test_close_candidates_are_timed_every_round() -> None:
    calls: Counter = Counter()
    pool = {"tandem": counted(calls, "tandem", 0.002), "library": counted(calls, "library", 0.002)}
    autotune.choose("op", ("close",), pool, repeats=4, budget_s=60)
    assert calls["tandem"] == calls["library"] == 1 + 4


def test_time_budget_bounds_slow_candidates() -> None:
    calls: Counter = Counter()
    pool = {"tandem": counted(calls, "tandem", 0.01), "library": counted(calls, "library", 0.01)}
    autotune.choose("op", ("slow",), pool, repeats=50)
    # the budget (20 ms) is spent after the minimum rounds: one warm-up + MIN_REPEATS samples
    assert calls["tandem"] == calls["library"] == 1 + autotune.MIN_REPEATS


def test_short_calls_are_repeated_within_a_sample() -> None:
    calls: Counter = Counter()
    pool = {"tandem": counted(calls, "tandem"), "library": counted(calls, "library")}
    autotune.choose("op", ("tiny",), pool, repeats=3)
    assert calls["tandem"] > 1 + 3  # later rounds run the call several times per sample


@pytest.mark.parametrize(("side", "expected"), [("tandem", "tandem"), ("library", "lib")])
def test_env_var_forces_a_side_without_timing(monkeypatch, side, expected) -> None:
    monkeypatch.setenv(autotune.ENV_VAR, side)
    autotune.reset()
    assert autotune.mode() == side
    calls: Counter = Counter()
    pool = {"tandem": counted(calls, "tandem", 0.002), "lib": counted(calls, "lib", 0.002)}
    assert autotune.choose("op", ("f",), pool) == expected
    assert not calls  # one candidate left: nothing to time
    assert autotune.timings() == {"op": {"f": {}}}


def test_forced_side_still_times_its_own_candidates(monkeypatch) -> None:
    monkeypatch.setenv(autotune.ENV_VAR, "library")
    autotune.reset()
    calls: Counter = Counter()
    pool = {
        "tandem": counted(calls, "tandem"),
        "torch_loop": counted(calls, "torch_loop", 0.002),
        "torch_grouped_mm": counted(calls, "torch_grouped_mm"),
    }
    assert autotune.choose("op", ("g",), pool) == "torch_grouped_mm"
    assert calls["tandem"] == 0


def test_a_side_without_candidates_falls_back_to_all(monkeypatch) -> None:
    monkeypatch.setenv(autotune.ENV_VAR, "tandem")
    autotune.reset()
    assert autotune.choose("op", ("h",), {"library": lambda: None}) == "library"


def test_bad_env_value_is_refused(monkeypatch) -> None:
    monkeypatch.setenv(autotune.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="TANDEM_KERNELS"):
        autotune.reset()


def test_forced_context_restores_the_mode_and_drops_choices() -> None:
    autotune.choose("op", ("c",), {"tandem": lambda: None, "library": lambda: None})
    with autotune.forced("tandem"):
        assert autotune.mode() == "tandem"
        assert autotune.choices() == {}
        assert autotune.choose("op", ("c",), {"tandem": lambda: 1, "library": lambda: 2}) == (
            "tandem"
        )
    assert autotune.mode() == "auto"
    assert autotune.choices() == {}
    with pytest.raises(ValueError):
        autotune.set_mode("fast")


def test_reset_calls_the_hooks() -> None:
    memo = {"x": 1}
    autotune.on_reset(memo.clear)
    autotune.reset()
    assert memo == {}


def test_a_failing_candidate_drops_out_and_all_failing_raises() -> None:
    def broken() -> None:
        raise RuntimeError("no kernel for this build")

    assert autotune.choose("op", ("e",), {"tandem": broken, "library": lambda: None}) == "library"
    with pytest.raises(RuntimeError, match="no kernel"):
        autotune.choose("op", ("e2",), {"tandem": broken, "library": broken})
    with pytest.raises(ValueError):
        autotune.choose("op", ("e3",), {})


def test_concurrent_first_calls_time_once(monkeypatch) -> None:
    measured: Counter = Counter()
    real = autotune._measure

    def counting(*args, **kwargs):
        measured["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(autotune, "_measure", counting)
    pool = {"tandem": lambda: time.sleep(0.001), "library": lambda: None}
    start = threading.Barrier(8)
    winners: list[str] = []

    def ask() -> None:
        start.wait()
        winners.append(autotune.choose("op", ("threads",), pool))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert winners == ["library"] * 8
    assert measured["n"] == 1


def test_nested_choices_do_not_deadlock() -> None:
    """A candidate may itself ask for a choice (the MoE path tunes its linear layers)."""

    def outer() -> None:
        autotune.choose("inner", ("n",), {"tandem": lambda: None, "library": lambda: None})

    assert autotune.choose("outer", ("n",), {"tandem": outer, "library": outer}) in (
        "tandem",
        "library",
    )
    assert "inner" in autotune.choices()
