"""Fitting a learned router's weights: (N, F) features and (N,) benefit labels in,
:class:`RouterWeights` in the router graph's layout out (:func:`fit_router`).

The candidates are scikit-learn estimators (logistic regression at three strengths,
one-hidden-layer ReLU MLPs) compared by AUROC on a validation share; the winner's
coefficients become the graph's initializers (:func:`tandem.router.learned.export_router`).
This module sits below :mod:`tandem.router.learned` (which re-exports its names); the run
that fits, exports and judges a router is :func:`tandem.router.learned_train.train_router`.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from tandem.kernels.router_mlp import mlp_scores
from tandem.router.calibrate import auroc


@dataclass(frozen=True)
class RouterWeights:
    """A trained router in the graph's layout: ``mean``/``inv_std`` standardise the (F,)
    features; ``layers`` are (W (in, out), b (out,)) with ReLU between; the last layer's one
    output is the logit of P(benefit)."""

    mean: np.ndarray
    inv_std: np.ndarray
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.layers) <= 2 or self.layers[-1][0].shape[1] != 1:
            raise ValueError("a router has one or two dense layers ending in one output")

    def kernel_args(self) -> tuple[Any, ...]:
        """``(mean, inv_std, w0, b0, w1, b1, two_layers)`` as :mod:`tandem.kernels.router_mlp`
        takes them, float64 (a one-layer router gets zero placeholders for layer 1)."""
        (w0, b0), *rest = self.layers
        w1, b1 = rest[0] if rest else (np.zeros((1, 1)), np.zeros(1))
        arrays = (self.mean, self.inv_std, w0, b0, w1, b1)
        return (*(np.ascontiguousarray(a, np.float64) for a in arrays), bool(rest))

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(N,) P(edge stands) of (N, F) features in float64 (NaN rows stay NaN)."""
        return mlp_scores(features, *self.kernel_args())

    def digest(self) -> str:
        h = hashlib.sha256()
        for a in (self.mean, self.inv_std, *(t for layer in self.layers for t in layer)):
            h.update(np.ascontiguousarray(a, np.float32).tobytes())
        return h.hexdigest()


@dataclass
class FittedRouter:
    """The outcome of :func:`fit_router`: the weights, which candidate won and by how much
    (``candidates``: name -> validation AUROC of the score against benefit), and the fitted
    scikit-learn estimator (on standardised features) the weights came from."""

    weights: RouterWeights
    model: str
    candidates: dict[str, float]
    rows: int
    estimator: Any = field(repr=False, default=None)


def _candidates(model: str, seed: int) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    out: dict[str, Any] = {}
    if model in ("auto", "logistic"):
        for c in (0.1, 1.0, 10.0):
            out[f"logistic(C={c:g})"] = LogisticRegression(C=c, max_iter=2000)
    if model in ("auto", "mlp"):
        for width, alpha in ((16, 0.1), (32, 0.01)):
            out[f"mlp({width}, alpha={alpha:g})"] = MLPClassifier(
                (width,), alpha=alpha, max_iter=200, random_state=seed
            )
    if not out:
        raise ValueError(f"model must be auto, logistic or mlp, got {model!r}")
    return out


def _weights(est: Any, mean: np.ndarray, inv_std: np.ndarray) -> RouterWeights:
    if hasattr(est, "coefs_"):  # MLPClassifier: relu hidden layers, logistic output
        if est.activation != "relu" or len(est.coefs_) != 2:
            raise ValueError("the router graph takes one ReLU hidden layer")
        layers = tuple(
            (w.astype(np.float64), b.astype(np.float64))
            for w, b in zip(est.coefs_, est.intercepts_, strict=True)
        )
    else:
        layers = ((est.coef_.T.astype(np.float64), est.intercept_.astype(np.float64)),)
    return RouterWeights(mean, inv_std, layers)


def fit_router(
    features: np.ndarray,
    benefit: np.ndarray,
    *,
    model: Literal["auto", "logistic", "mlp"] = "auto",
    validation_share: float = 0.25,
    seed: int = 0,
) -> FittedRouter:
    """Fit a router on (N, F) features and (N,) benefit labels. The candidates (logistic
    regression at three strengths; with ``model`` auto or mlp, one-hidden-layer MLPs) are
    compared by AUROC on a stratified ``validation_share`` of the rows, and the best is refit
    on every row (logistic regression wins ties). Rows with NaN features are left out.
    :class:`ValueError` when fewer than 4 rows of either class remain."""
    f = np.asarray(features, np.float64)
    b = np.asarray(benefit, bool)
    keep = np.isfinite(f).all(1)
    f, b = f[keep], b[keep]
    pos = int(b.sum())
    if min(pos, len(b) - pos) < 4:
        raise ValueError(
            f"need at least 4 rows where escalating helped and 4 where it did not; "
            f"got {pos} and {len(b) - pos}"
        )
    mean = f.mean(0)
    sd = f.std(0)
    inv_std = np.where(sd > 1e-12, 1.0 / np.where(sd > 1e-12, sd, 1.0), 1.0)
    z = (f - mean) * inv_std
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split

    i_fit, i_val = train_test_split(
        np.arange(len(b)), test_size=validation_share, stratify=b, random_state=seed
    )
    cands = _candidates(model, seed)
    scores: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name, est in cands.items():
            est.fit(z[i_fit], b[i_fit])
            scores[name] = auroc(est.predict_proba(z[i_val])[:, 0], b[i_val])
        best = max(scores, key=lambda n: (np.nan_to_num(scores[n], nan=-1.0), n.startswith("l")))
        est = cands[best]
        est.fit(z, b)
    return FittedRouter(_weights(est, mean, inv_std), best, scores, len(b), est)
