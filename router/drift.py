"""The drift alarm: is live traffic still the traffic the gate was calibrated on?

A :class:`DriftMonitor` per task is fed every request's gate score and the gate's verdict
(escalate or not, before rules, budget and audit). Feeding is O(1): a lock, two counters and a
:func:`bisect.bisect_left` into the score bins (measured in the README). At the end of each
``window`` requests it runs two tests:

* **rate**: the window's escalation rate against the calibrated interval
  (``calibration.escalation_rate``): a binomial test against the interval's bound nearest the
  observed rate (inside the interval: p = 1), so the calibration's own uncertainty is allowed
  for. Without a calibration record: a 2x2 chi-square (homogeneity) against the first window.
* **scores**: the window's score histogram over the bins the calibration's ``score_quantiles``
  cut (deciles: 10 bins, 10% each) — a chi-square goodness of fit, or, when the calibration
  says how many rows it saw (``data.rows``), a 2xB homogeneity test that allows for its
  sampling error. Quantiles that tie or sit at 0 or 1 (a point mass, e.g. max_prob = 1.0)
  are merged away, so every bin's expected share is known. Without quantiles: the first window's deciles and
  counts are the baseline.

An alarm needs ``min(p_rate, p_scores) < alpha / tests`` (Bonferroni). On an alarm: one
warning line (at most one per :data:`LOG_EVERY_S` per task), the counters in
:meth:`DriftMonitor.stats`, and ``on_alarm(DriftAlarm)`` — called on the request's thread that
closed the window, after the lock is released; an exception from it is logged, never raised.
"""

from __future__ import annotations

import bisect
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tandem.router.policy import CalibrationRecord, DriftSpec

log = logging.getLogger(__name__)
LOG_EVERY_S = 60.0  # at most one drift warning per task this often


@dataclass(frozen=True)
class DriftAlarm:
    """One window that left the calibrated behaviour. p-values are None for a test not run."""

    task: str
    window: int  # 1 = the first window
    requests: int
    escalation_rate: float
    p_rate: float | None
    p_scores: float | None
    alpha: float


def _chi2_sf(stat: float, df: int) -> float:
    from scipy.special import chdtrc  # scikit-learn's dependency; loaded at start (warm_up)

    return float(chdtrc(df, stat)) if df > 0 else 1.0


def homogeneity_p(a: np.ndarray, b: np.ndarray) -> float:
    """p-value of the chi-square test that two count vectors come from one distribution (bins
    empty in both are dropped). E.g. ``homogeneity_p([50, 50], [50, 50])`` is 1.0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    if len(a) < 2 or a.sum() == 0 or b.sum() == 0:
        return 1.0
    total = a.sum() + b.sum()
    col = a + b
    ea, eb = col * a.sum() / total, col * b.sum() / total
    stat = float(((a - ea) ** 2 / ea).sum() + ((b - eb) ** 2 / eb).sum())
    return _chi2_sf(stat, len(a) - 1)


def goodness_p(counts: np.ndarray, expected_share: np.ndarray) -> float:
    """p-value of the chi-square goodness-of-fit test of ``counts`` against shares summing to
    1. E.g. ``goodness_p([10] * 10, [0.1] * 10)`` is 1.0."""
    c = np.asarray(counts, np.float64)
    n = c.sum()
    if n == 0 or len(c) < 2:
        return 1.0
    e = np.asarray(expected_share, np.float64) * n
    stat = float(((c - e) ** 2 / e).sum())
    return _chi2_sf(stat, len(c) - 1)


def rate_p(k: int, n: int, low: float, high: float) -> float:
    """Two-sided binomial p-value of ``k`` escalations in ``n`` against the interval
    ``[low, high]``: against its nearest bound, 1.0 inside it. E.g. ``rate_p(50, 100, 0.4,
    0.6)`` is 1.0; ``rate_p(90, 100, 0.4, 0.6)`` is about 1e-11."""
    from scipy.special import bdtr, bdtrc

    if n == 0:
        return 1.0
    r = k / n
    if r > high:  # P(X >= k | high)
        p = 1.0 if k == 0 else float(bdtrc(k - 1, n, high))
    elif r < low:  # P(X <= k | low)
        p = float(bdtr(k, n, low))
    else:
        return 1.0
    return min(1.0, 2.0 * p)


def _cuts(quantiles: list[float] | np.ndarray) -> tuple[list[float], np.ndarray]:
    """Bin edges and each bin's expected share from evenly spaced quantiles (q_i at level
    i/(k+1)): tied quantiles, and quantiles at a gate score's bounds 0 and 1 (where a
    saturated softmax piles scores up), are dropped, merging the bins around them, so a point
    mass sits inside a bin whose share is still known. E.g. quantiles [0.2, 0.5, 0.5] (levels
    .25, .5, .75) give edges [0.2] and shares [0.25, 0.75]; [0.3, 0.6, 1.0] give [0.3, 0.6]
    and [0.25, 0.25, 0.5]."""
    q = [float(v) for v in quantiles]
    k = len(q)
    edges, levels = [], []
    for i, v in enumerate(q):
        if q.count(v) == 1 and math.isfinite(v) and v not in (0.0, 1.0):
            edges.append(v)
            levels.append((i + 1) / (k + 1))
    shares = np.diff(np.asarray([0.0, *levels, 1.0]))
    return edges, shares


class DriftMonitor:
    """Tests each ``spec.window`` requests of one task against ``calibration`` (or, without
    one, against the first window); see the module docstring."""

    def __init__(
        self,
        spec: DriftSpec,
        calibration: CalibrationRecord | None,
        *,
        task: str = "",
        on_alarm: Callable[[DriftAlarm], None] | None = None,
    ) -> None:
        self.spec, self.task, self.on_alarm = spec, task, on_alarm
        self._lock = threading.Lock()
        self._window = spec.window
        self._interval: tuple[float, float] | None = None
        self._ref_rate: np.ndarray | None = None  # [escalated, not] of the first window
        self._edges: list[float] | None = None
        self._shares: np.ndarray | None = None
        self._ref_bins: np.ndarray | None = None  # counts to compare with (homogeneity)
        self.baseline = "first-window"
        if calibration is not None:
            er = calibration.escalation_rate
            self._interval = (er.low, er.high)
            self.baseline = "calibration"
            if len(calibration.score_quantiles) >= 1:
                self._set_bins(calibration.score_quantiles)
                rows = calibration.data.get("rows")
                if isinstance(rows, int) and rows > 0 and self._shares is not None:
                    self._ref_bins = self._shares * rows
        self._first: np.ndarray | None = None  # the first window's scores, while needed
        if self._edges is None:
            self._first = np.empty(self._window, np.float64)
        self._n = self._esc = self._nan = 0
        self._bins = [0] * (len(self._edges) + 1 if self._edges is not None else 1)
        self.windows = self.alarms = 0
        self.last_alarm_window: int | None = None
        self.p_rate: float | None = None
        self.p_scores: float | None = None
        self.last_rate: float | None = None
        self.state = "baseline" if self._first is not None or self._interval is None else "ok"
        self._logged_at = -math.inf
        self._suppressed = 0

    def _set_bins(self, quantiles: list[float] | np.ndarray) -> None:
        edges, shares = _cuts(quantiles)
        if edges:
            self._edges, self._shares = edges, shares

    # ------------------------------------------------------------------ per request
    def observe(self, score: float, escalated: bool) -> None:
        """One request's gate score (NaN: no score, counted for the rate only) and verdict."""
        alarm = None
        with self._lock:
            n = self._n
            self._esc += escalated
            if self._first is not None:
                self._first[n] = score
            elif score == score:
                self._bins[bisect.bisect_left(self._edges, score)] += 1  # type: ignore[arg-type]
            else:
                self._nan += 1
            self._n = n + 1
            if n + 1 >= self._window:
                alarm = self._close()
        if alarm is not None:
            self._raise(alarm)

    # ------------------------------------------------------------------ per window
    def _close(self) -> DriftAlarm | None:
        """End of a window (under the lock): test it, or make it the baseline."""
        self.windows += 1
        n, k = self._n, self._esc
        self.last_rate = k / n
        alarm = None
        if self._first is not None or (self._interval is None and self._ref_rate is None):
            self._baseline_from_window(n, k)
        else:
            tests = []
            if self._interval is not None:
                self.p_rate = rate_p(k, n, *self._interval)
            else:
                assert self._ref_rate is not None
                self.p_rate = homogeneity_p(self._ref_rate, np.array([k, n - k]))
            tests.append(self.p_rate)
            if self._edges:
                bins = np.asarray(self._bins, np.float64)
                if self._ref_bins is not None:
                    self.p_scores = homogeneity_p(self._ref_bins, bins)
                else:
                    self.p_scores = goodness_p(bins, self._shares)  # type: ignore[arg-type]
                tests.append(self.p_scores)
            if min(tests) < self.spec.alpha / len(tests):
                self.alarms += 1
                self.last_alarm_window = self.windows
                self.state = "alarm"
                alarm = DriftAlarm(
                    self.task, self.windows, n, k / n, self.p_rate, self.p_scores, self.spec.alpha
                )
            else:
                self.state = "ok"
        self._n = self._esc = self._nan = 0
        self._bins = [0] * len(self._bins)
        return alarm

    def _baseline_from_window(self, n: int, k: int) -> None:
        if self._interval is None:
            self._ref_rate = np.array([k, n - k], np.float64)
        if self._first is not None:
            scores = self._first[:n]
            scores = scores[~np.isnan(scores)]
            if len(scores):
                self._set_bins(np.quantile(scores, np.arange(1, 10) / 10))
            if self._edges is None:  # one value throughout: nothing to bin by
                self._edges, self._shares = [], None
            else:
                idx = np.searchsorted(np.asarray(self._edges), scores, side="left")
                self._ref_bins = np.bincount(idx, minlength=len(self._edges) + 1).astype(np.float64)
                self._bins = [0] * (len(self._edges) + 1)
            self._first = None
        self.state = "ok"

    def _raise(self, alarm: DriftAlarm) -> None:
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            log.warning(
                "task %s: drift alarm in window %d: escalation rate %.3f (p=%s), scores p=%s, "
                "alpha %g (%d more alarms not logged since the last line)",
                alarm.task,
                alarm.window,
                alarm.escalation_rate,
                _fmt(alarm.p_rate),
                _fmt(alarm.p_scores),
                alarm.alpha,
                self._suppressed,
                extra={"task": alarm.task, "drift_window": alarm.window},
            )
            self._logged_at, self._suppressed = now, 0
        else:
            self._suppressed += 1
        if self.on_alarm is not None:
            try:
                self.on_alarm(alarm)
            except Exception:  # a monitoring hook must not break the request that ran it
                log.exception("task %s: the drift callback raised", alarm.task)

    def stats(self) -> dict[str, object]:
        """State (``baseline``, ``ok``, ``alarm``: the last window), the last window's
        p-values and escalation rate, windows tested, alarms and the last alarm's window."""
        with self._lock:
            return {
                "state": self.state,
                "baseline": self.baseline,
                "window": self._window,
                "windows": self.windows,
                "p_rate": self.p_rate,
                "p_scores": self.p_scores,
                "escalation_rate": self.last_rate,
                "alarms": self.alarms,
                "last_alarm_window": self.last_alarm_window,
            }


def _fmt(p: float | None) -> str:
    return "-" if p is None else f"{p:.2g}"


def warm_up() -> None:
    """Import and run the tests once, so no request pays for scipy's import (~0.1 s)."""
    rate_p(1, 2, 0.1, 0.2)
    goodness_p(np.ones(2), np.full(2, 0.5))


class AlarmDispatcher:
    """Runs alarm callbacks on one background thread, so a slow or stuck callback never
    holds the request that closed a window. At most ``max_pending`` alarms wait; more are
    dropped and counted (``dropped``), each with a log line. The thread starts with the first
    alarm and is a daemon: a callback that never returns cannot keep the process alive."""

    def __init__(self, call: Callable[[DriftAlarm], None], max_pending: int = 64) -> None:
        self._call = call
        self._queue: queue.Queue[DriftAlarm | None] = queue.Queue(max_pending)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.dropped = 0

    def post(self, alarm: DriftAlarm) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="tandem-drift-alarms", daemon=True
                )
                self._thread.start()
        try:
            self._queue.put_nowait(alarm)
        except queue.Full:
            self.dropped += 1
            log.warning("task %s: drift alarm dropped: callbacks are behind", alarm.task)

    def _run(self) -> None:
        while (alarm := self._queue.get()) is not None:
            try:
                self._call(alarm)
            except Exception:  # a monitoring hook must not take the others down
                log.exception("task %s: a drift callback raised", alarm.task)

    def close(self, timeout_s: float = 2.0) -> None:
        """Let the thread finish what is queued (waiting at most ``timeout_s``)."""
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)
