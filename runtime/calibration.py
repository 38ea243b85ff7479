"""Temperature scaling and calibration error: how far an edge model's confidence is from
how often it is right, and the one-parameter fix (Guo et al. 2017, "On Calibration of Modern
Neural Networks"). :func:`fit_temperature` for logits, :func:`fit_score_temperature` for a
score already in [0, 1] (a token gate's statistic), :func:`expected_calibration_error` and
:func:`reliability_diagram` to show the result. ``tandem calibrate`` reports these before and
after, and writes the temperature into the policy (``gate.temperature``); ``tandem evolve``
judges and recalibrates each new edge model with the same functions (both sides import them
from here, below the router and the cloud)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

# Temperatures searched, as bounds on log T: wider than any sane model needs, inside what a
# policy accepts (0 < T <= 1000).
T_BOUNDS = (0.01, 100.0)


def _clean_rows(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows a likelihood can be taken of: no NaN or +inf, a finite logit somewhere, the label
    in range with a finite logit (-inf elsewhere is fine: a probability of 0)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64, copy=False)
    if z.ndim != 2 or len(z) != len(y):
        raise ValueError(f"logits must be (N, C) with N labels, got {z.shape} and {y.shape}")
    ok = ~(np.isnan(z) | np.isposinf(z)).any(axis=1) & (y >= 0) & (y < z.shape[1])
    ok &= np.isfinite(z).any(axis=1)
    ok[ok] &= np.isfinite(z[ok, y[ok]])
    return z[ok], y[ok]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise ``softmax(logits / temperature)`` in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, *, bounds: tuple[float, float] = T_BOUNDS
) -> float:
    """The temperature T that minimises the mean negative log-likelihood of
    ``softmax(logits / T)`` on ``labels`` (Guo et al. 2017), searched over log T within
    ``bounds``. Temperature keeps every row's argmax, so accuracy is unchanged; T > 1 softens
    an overconfident model. Rows with NaN/+inf logits, or -inf at their label, are dropped;
    :class:`ValueError` when none are left."""
    from scipy.optimize import minimize_scalar

    z, y = _clean_rows(logits, labels)
    if not len(z):
        raise ValueError("no row with finite logits and a valid label to fit a temperature on")
    z = z - z.max(axis=1, keepdims=True)
    zy = z[np.arange(len(z)), y]

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        return float(np.mean(np.log(np.exp(s).sum(axis=1)) - zy / np.exp(log_t)))

    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    res = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(res.x))


def fit_score_temperature(
    scores: np.ndarray, correct: np.ndarray, *, bounds: tuple[float, float] = T_BOUNDS
) -> float:
    """One-parameter calibration of a score in [0, 1] read as "probability the edge answer is
    right" (a token gate's statistic): ``p ** (1 / T)``, i.e. the log-probabilities divided by
    T, with T minimising the binary log-loss on ``correct``. Monotone, so it changes the
    score's calibration but never which answers a threshold accepts. Scores outside [0, 1] or
    not finite are dropped."""
    from scipy.optimize import minimize_scalar

    p = np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(p) & (p >= 0) & (p <= 1)
    p, c = p[ok], np.asarray(correct, dtype=bool)[ok]
    if not len(p):
        raise ValueError("no finite score in [0, 1] to fit a temperature on")
    logp = np.log(np.clip(p, 1e-300, 1.0))

    def loss(log_t: float) -> float:
        q = np.clip(np.exp(logp / np.exp(log_t)), 1e-12, 1 - 1e-12)
        return float(-np.mean(np.where(c, np.log(q), np.log1p(-q))))

    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    return float(np.exp(minimize_scalar(loss, bounds=(lo, hi), method="bounded").x))


def scale_scores(scores: np.ndarray, temperature: float) -> np.ndarray:
    """``scores ** (1 / temperature)``: what :func:`fit_score_temperature` fitted."""
    return np.asarray(scores, dtype=np.float64) ** (1.0 / temperature)


def _confidence_correct(
    probs_or_logits: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(probs_or_logits, dtype=np.float64)
    if a.ndim == 1:  # already a confidence, labels say whether the answer was right
        ok = np.isfinite(a)
        return np.clip(a[ok], 0.0, 1.0), np.asarray(labels, dtype=bool)[ok]
    z, y = _clean_rows(a, labels) if a.ndim == 2 else (a, labels)
    is_prob = len(z) and np.all(z >= 0) and np.allclose(z.sum(axis=1), 1.0, atol=1e-3)
    p = z if is_prob else softmax(z)
    return p.max(axis=1), p.argmax(axis=1) == y


def reliability_bins(
    probs_or_logits: np.ndarray, labels: np.ndarray, n_bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin over [0, 1]: mean confidence, accuracy, row count (NaN
    where a bin is empty). Inputs as :func:`expected_calibration_error`."""
    conf, correct = _confidence_correct(probs_or_logits, labels)
    b = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(b, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(b, conf, n_bins) / count
        acc = np.bincount(b, correct.astype(np.float64), n_bins) / count
    return mean_conf, acc, count


def expected_calibration_error(
    probs_or_logits: np.ndarray, labels: np.ndarray, n_bins: int = 15
) -> float:
    """ECE: the row-weighted mean over ``n_bins`` equal-width confidence bins of
    |accuracy - mean confidence|. ``probs_or_logits`` is (N, C) logits or probabilities
    (confidence = the top probability, correct = argmax == label), or (N,) confidences with
    ``labels`` saying whether each answer was right (a gate score read as a probability).
    E.g. confidences [0.9, 0.9, 0.6, 0.6] with outcomes [1, 0, 1, 1] and 15 bins: two bins,
    |0.5 - 0.9| * 0.5 + |1.0 - 0.6| * 0.5 = 0.4."""
    mean_conf, acc, count = reliability_bins(probs_or_logits, labels, n_bins)
    n = count.sum()
    if not n:
        return float("nan")
    used = count > 0
    return float(np.sum(np.abs(acc[used] - mean_conf[used]) * count[used]) / n)


def reliability_diagram(
    path: str | Path,
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    n_bins: int = 15,
    title: str = "Reliability",
) -> Path:
    """Write a reliability diagram (PNG): accuracy against confidence per bin for each named
    ``(probs_or_logits, labels)`` curve (e.g. "before", "after"), ECE in the legend, and the
    confidence histogram below. Needs matplotlib (``pip install 'tandem-infer[bench]'``)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "the reliability diagram needs matplotlib: pip install 'tandem-infer[bench]'"
        ) from None
    fig = Figure(figsize=(5.5, 6.5))
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect")
    edges = np.linspace(0, 1, n_bins + 1)
    for name, (a, labels) in curves.items():
        mean_conf, acc, count = reliability_bins(a, labels, n_bins)
        ece = expected_calibration_error(a, labels, n_bins)
        used = count > 0
        top.plot(mean_conf[used], acc[used], marker="o", label=f"{name} (ECE {ece:.3f})")
        bottom.stairs(count, edges, label=name)
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title)
    top.legend(loc="upper left")
    bottom.set(xlabel="confidence", ylabel="rows")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out
