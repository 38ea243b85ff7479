"""The co-evolution experiment's machinery (:mod:`tandem.bench.coevolve` runs it): traffic
from several threads through a running :class:`~tandem.edge.EdgeRuntime`, rounds of ``tandem
evolve`` every K escalations with the hot swap under load, the held-out figures of each round,
the summary against the issue's goals, and the plot."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandem.router.calibrate import RoutingCurve, escalation_for_recovery, routing_curve
from tandem.runtime.machine import machine

EQUAL_ACCURACY_POINTS = 0.5  # "at equal routed accuracy": within this many points of round 0
GOAL_REDUCTION = 0.30
GOAL_CPT = {"digits": 0.30, "sort": 0.50}


def say(msg: str) -> None:
    print(f"[coevolve {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Round:
    """One round's figures: ``stream_*`` from the live traffic of the round (before the swap
    that ends it), ``heldout_*`` on the held-out stream with the version serving after it."""

    round: int
    version: str
    traffic: int  # requests sent so far
    escalations: int  # escalations so far (gate + audit)
    stream_escalation_rate: float
    heldout_edge_accuracy: float
    heldout_cloud_accuracy: float
    heldout_threshold: float
    heldout_escalation_rate: float
    heldout_routed_accuracy: float
    heldout_equal_accuracy_escalation: float
    cpt80: float
    evolve_s: float = 0.0
    evolve_report: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def measured(cls, r: int, version: str, traffic: Traffic, f: dict[str, float]) -> Round:
        """Round ``r`` from :func:`held_out_figures` ``f`` and the traffic so far."""
        answered, escalated = traffic.counts()
        return cls(
            round=r, version=version, traffic=answered, escalations=escalated,
            stream_escalation_rate=0.0, heldout_edge_accuracy=f["edge_accuracy"],
            heldout_cloud_accuracy=f["cloud_accuracy"], heldout_threshold=f["threshold"],
            heldout_escalation_rate=f["escalation_rate"],
            heldout_routed_accuracy=f["routed_accuracy"],
            heldout_equal_accuracy_escalation=f["equal_accuracy_escalation"],
            cpt80=f["cpt80"],
        )  # fmt: skip


def held_out_figures(
    scores: np.ndarray,
    edge_correct: np.ndarray,
    cloud_correct: np.ndarray,
    threshold: float,
    target_accuracy: float | None,
) -> dict[str, float]:
    """What one version buys on the held-out stream: at its live ``threshold`` (escalate when
    the score is below it), at equal routed accuracy (the fewest escalations whose accuracy is
    at least ``target_accuracy`` minus :data:`EQUAL_ACCURACY_POINTS`; None: this round sets the
    target), and CPT(80%)."""
    s = np.where(np.isnan(scores), -np.inf, scores)
    esc = s < threshold
    routed = np.where(esc, cloud_correct, edge_correct)
    curve = routing_curve(s, edge_correct, cloud_correct)
    acc = float(routed.mean())
    target = acc if target_accuracy is None else target_accuracy
    return {
        "edge_accuracy": curve.edge_accuracy,
        "cloud_accuracy": curve.cloud_accuracy,
        "threshold": float(threshold),
        "escalation_rate": float(esc.mean()),
        "routed_accuracy": acc,
        "equal_accuracy_escalation": _escalation_for_accuracy(
            curve, target - EQUAL_ACCURACY_POINTS / 100
        ),
        "cpt80": escalation_for_recovery(curve, 0.8),
    }


def _escalation_for_accuracy(curve: RoutingCurve, accuracy: float) -> float:
    ok = np.flatnonzero(curve.accuracy >= accuracy - 1e-12)
    return float(curve.escalation_rate[ok].min()) if len(ok) else 1.0


def summary(task: str, rounds: list[Round]) -> dict[str, Any]:
    """First round against the last, and whether the issue's goals were met."""
    first, last = rounds[0], rounds[-1]
    e0 = first.heldout_equal_accuracy_escalation
    e1 = last.heldout_equal_accuracy_escalation
    reduction = 1.0 - e1 / e0 if e0 > 0 else 0.0
    return {
        "task": task,
        "rounds": len(rounds) - 1,
        "escalation_at_equal_accuracy": {"first": e0, "last": e1, "reduction": reduction},
        "routed_accuracy_target": first.heldout_routed_accuracy,
        "cpt80": {"first": first.cpt80, "last": last.cpt80},
        "edge_accuracy": {
            "first": first.heldout_edge_accuracy,
            "last": last.heldout_edge_accuracy,
        },
        "goals": {
            f"escalation at equal accuracy falls >= {GOAL_REDUCTION:.0%}": reduction
            >= GOAL_REDUCTION,
            f"final CPT(80%) <= {GOAL_CPT[task]:.0%}": last.cpt80 <= GOAL_CPT[task],
        },
    }


def plot(task: str, rounds: list[Round], path: Path) -> Path:
    """Three panels over rounds: escalation rates, routed accuracy, CPT(80%)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = [r.round for r in rounds]
    fig = Figure(figsize=(12, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots(1, 3)
    ax[0].plot(x, [r.stream_escalation_rate for r in rounds], "o-", label="live stream")
    ax[0].plot(x, [r.heldout_escalation_rate for r in rounds], "s-", label="held-out, live gate")
    ax[0].plot(
        x,
        [r.heldout_equal_accuracy_escalation for r in rounds],
        "^-",
        label="held-out, equal accuracy",
    )
    ax[0].set_title("escalation rate")
    ax[1].plot(x, [r.heldout_routed_accuracy for r in rounds], "o-", label="routed")
    ax[1].plot(x, [r.heldout_edge_accuracy for r in rounds], "s--", label="edge alone")
    ax[1].plot(x, [r.heldout_cloud_accuracy for r in rounds], ":", label="cloud alone")
    ax[1].set_title("held-out accuracy")
    ax[2].plot(x, [r.cpt80 for r in rounds], "o-", label="CPT(80%)")
    ax[2].axhline(GOAL_CPT[task], color="grey", ls="--", lw=1, label="goal")
    ax[2].set_title("CPT(80%): escalations for 80% of the gap")
    for a in ax:
        a.set_xlabel("round (tandem evolve runs)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(f"co-evolution, {task}: {machine()['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path


class Traffic:
    """Unlabelled requests from ``threads`` threads at ``rate_per_s`` in all, each sent by
    ``send(rt, item) -> (escalated, edge version)``; counts what was sent, answered and escalated, and every edge version that
    answered. Exceptions are counted, never swallowed silently (a dropped request fails the
    run)."""

    def __init__(
        self,
        rt: Any,
        make: Callable[[int], Any],
        send: Callable[[Any, Any], tuple[bool, str]],
        setup: Any,
    ) -> None:
        self.rt, self.make, self.send, self.setup = rt, make, send, setup
        self.lock = threading.Lock()
        self.sent = self.answered = self.escalated = self.failed = 0
        self.versions: dict[str, int] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._go = threading.Event()  # cleared: paused (tandem evolve runs)
        self._go.set()
        self._inflight = 0
        self._pool = ThreadPoolExecutor(setup.threads, thread_name_prefix="traffic")
        self._futures = [self._pool.submit(self._run, i) for i in range(setup.threads)]

    def _run(self, i: int) -> None:
        period = self.setup.threads / self.setup.rate_per_s
        nxt = time.monotonic()
        batch = self.make(256)
        j = 0
        while not self._stop.is_set():
            if not self._go.is_set():
                self._go.wait(0.1)
                nxt = time.monotonic()
                continue
            if j == len(batch):
                batch, j = self.make(256), 0
            with self.lock:
                self.sent += 1
                self._inflight += 1
            try:
                escalated, version = self.send(self.rt, batch[j])
            except Exception as e:  # a failed request: counted and reported
                with self.lock:
                    self.failed += 1
                    if len(self.errors) < 10:
                        self.errors.append(f"{type(e).__name__}: {e}")
            else:
                with self.lock:
                    self.answered += 1
                    self.escalated += escalated
                    self.versions[version] = self.versions.get(version, 0) + 1
            finally:
                with self.lock:
                    self._inflight -= 1
            j += 1
            nxt += period
            time.sleep(max(0.0, nxt - time.monotonic()))

    def pause(self) -> None:
        """Stop sending and wait for the requests in flight to be answered."""
        self._go.clear()
        while True:
            with self.lock:
                if self._inflight == 0:
                    return
            time.sleep(0.005)

    def resume(self) -> None:
        self._go.set()

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.answered, self.escalated

    def wait_for_escalations(self, n: int, timeout_s: float = 3600.0) -> None:
        self._wait(1, n, timeout_s)

    def wait_for_answers(self, n: int, timeout_s: float = 3600.0) -> None:
        self._wait(0, n, timeout_s)

    def _wait(self, which: int, n: int, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while self.counts()[which] < n:
            if time.monotonic() > end:
                raise TimeoutError(f"traffic did not reach {n} in {timeout_s:.0f} s")
            if self.failed:
                raise RuntimeError(f"requests failed: {self.errors}")
            time.sleep(0.05)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        for f in self._futures:
            f.result()
        self._pool.shutdown()
        return {
            "sent": self.sent,
            "answered": self.answered,
            "failed": self.failed,
            "escalated": self.escalated,
            "versions": dict(self.versions),
            "errors": self.errors,
        }


def send_digits(rt: Any, x: np.ndarray) -> tuple[bool, str]:
    r = rt.infer(x, "digits")
    return r.tier.value != "edge", r.model_versions.get("edge", "?")


def send_sort(rt: Any, item: Any) -> tuple[bool, str]:
    r = rt.generate(item.prompt, "sort", max_tokens=item.difficulty + 1)
    return r.escalated_at is not None, r.model_versions.get("edge", "?")


def _rounds(
    rt: Any,
    make: Callable[[int], Any],
    send: Callable[[Any, Any], tuple[bool, str]],
    setup: Any,
    measure: Callable[[int, Traffic, float | None], Round],
    evolve: Callable[[int], dict[str, Any]],
) -> tuple[list[Round], dict[str, Any]]:
    """Round 0 is measured as the system starts; then, ``setup.rounds`` times: wait for K
    escalations of traffic, pause it (the log is distilled now), run ``evolve(round)``,
    resume the traffic and hot-swap under it, measure."""
    rounds: list[Round] = []
    with rt:
        traffic = Traffic(rt, make, send, setup)
        try:
            rounds.append(measure(0, traffic, None))
            target = rounds[0].heldout_routed_accuracy
            say(_line(rounds[-1]))
            last_a, last_e = traffic.counts()
            for r in range(1, setup.rounds + 1):
                traffic.wait_for_escalations(last_e + setup.escalations_per_round)
                traffic.pause()  # K escalations: the log is distilled now
                a, e = traffic.counts()
                rounds[-1].stream_escalation_rate = (e - last_e) / max(1, a - last_a)
                assert rt.escalation_log is not None
                rt.escalation_log.flush()
                t0 = time.perf_counter()
                report = evolve(r)
                evolve_s = time.perf_counter() - t0
                traffic.resume()
                time.sleep(0.2)  # the swap happens under load
                swapped = rt.reload_models()
                last_a, last_e = traffic.counts()
                rounds.append(measure(r, traffic, target))
                rounds[-1].evolve_s = evolve_s
                rounds[-1].evolve_report = {**_brief(report), "serving": swapped}
                say(_line(rounds[-1]))
            traffic.wait_for_answers(last_a + 2 * setup.escalations_per_round)
            a, e = traffic.counts()  # the last version's live rate, over as many requests
            rounds[-1].stream_escalation_rate = (e - last_e) / max(1, a - last_a)
        finally:
            load = traffic.stop()
    return rounds, load


def _section(
    task: str, setup: Any, got: tuple[list[Round], dict[str, Any]], out: Path
) -> dict[str, Any]:
    rounds, load = got
    section = {
        "setup": asdict(setup),
        "rounds": [asdict(r) for r in rounds],
        "traffic": load,
        "summary": summary(task, rounds),
    }
    section["summary"]["hot_swap"] = {
        "sent": load["sent"],
        "answered": load["answered"],
        "failed": load["failed"],
        "versions_served": len(load["versions"]),
    }
    plot(task, rounds, out / f"coevolve-{task}.png")
    return section


def run_evolve(policy: Path, task: str, json_out: Path, *args: Any) -> dict[str, Any]:
    """``tandem evolve POLICY --task TASK ARGS`` in its own process, as an operator runs it;
    its JSON report. A rejected model (exit 2) is a result, not an error: nothing was
    published and the old version serves on."""
    cmd = [sys.executable, "-m", "tandem.cli", "evolve", str(policy), "--task", task]
    cmd += [str(a) for a in args] + ["--json", str(json_out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode not in (0, 2):
        raise RuntimeError(f"tandem evolve failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(json_out.read_text())


def _brief(report: dict[str, Any]) -> dict[str, Any]:
    """What the JSON keeps of one ``tandem evolve`` report."""
    keep = ("accepted", "published", "rows", "holdout", "verdict", "routing", "seconds")
    return {k: report[k] for k in keep if k in report}


def _line(r: Round) -> str:
    return (
        f"round {r.round} ({r.version}): edge acc {r.heldout_edge_accuracy:.3f}, held-out "
        f"escalation {r.heldout_escalation_rate:.3f} (routed acc {r.heldout_routed_accuracy:.3f}),"
        f" at equal accuracy {r.heldout_equal_accuracy_escalation:.3f}, CPT80 {r.cpt80:.3f}"
    )
