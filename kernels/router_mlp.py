"""A learned router's score of logits rows: features of the softmax, standardised, through
logistic regression or a one-hidden-layer ReLU MLP, out as P(the edge's answer stands).

The edge scores one row per request inside a p99 budget of 20 µs, which a Python call into
ONNX Runtime does not meet, so :func:`router_score_row` is one jitted pass over the row
(about 1 µs). :func:`router_scores_reference` is the plain numpy version over (N, C) rows
that it is tested against; :func:`router_features` and :func:`mlp_scores` are its two
halves (training reads the features; a token router feeds its own features to the MLP).

The features of a (C,) row, in order (F = 2k + 3 + C·uses_logits + H):

* ``[0, k)``: the top-k softmax probabilities, descending;
* ``k``: margin, top-1 minus top-2 probability (C >= 2);
* ``k + 1``: entropy over log C, with log-probabilities clipped at :data:`LOGP_FLOOR`;
* ``[k + 2, 2k + 2)``: the top-k clipped log-probabilities, descending;
* ``2k + 2``: log-sum-exp of the logits, clipped to ±:data:`LSE_CLIP`;
* then every class's clipped log-probability in class order (``uses_logits``), then the
  hidden vector (H wide; empty when unused).

Rows holding NaN or +inf, no finite logit, or a non-finite hidden value are invalid: their
features are NaN and their score NaN (a NaN never clears a threshold).

The weights (arrays, float64): ``mean``, ``inv_std`` (F,); ``w0`` (F, W), ``b0`` (W,); and
for a two-layer router ``w1`` (W, 1), ``b1`` (1,) with ``two_layers`` true (for logistic
regression W = 1 and ``w1``/``b1`` are ignored placeholders). The output is
``sigmoid(-z)`` of the last layer's one output z (z is the logit of P(benefit)).
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np

LOGP_FLOOR = -30.0  # log-probabilities are clipped here, so exp(-inf) * -inf never makes NaN
LSE_CLIP = 1e4  # |log-sum-exp of the logits| is clipped here
Z_CLIP = 700.0  # |z| is clipped here before exp, which overflows float64 past 709


def n_router_features(n_classes: int, top_k: int, uses_logits: bool, hidden_dim: int) -> int:
    """F, the width of :func:`router_features` rows."""
    return 2 * top_k + 3 + n_classes * uses_logits + hidden_dim


# ---------------------------------------------------------------------------- numpy reference
def router_features(
    logits: np.ndarray, top_k: int, uses_logits: bool = False, hidden: np.ndarray | None = None
) -> np.ndarray:
    """(N, F) float64 features of (N, C) logits (and (N, H) hidden vectors), invalid rows all
    NaN. With C = 3, top_k = 1: ``[[2, 1, 0]]`` gives ``[[0.665, 0.421, 0.758, -0.408,
    2.408]]`` (p_top, margin, entropy 0.832 nats / log 3, logp_top, logsumexp)."""
    x = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    c = x.shape[1]
    bad = np.isnan(x).any(1) | np.isposinf(x).any(1) | np.isneginf(x).all(1)
    parts_h: list[np.ndarray] = []
    if hidden is not None:
        h = np.atleast_2d(np.asarray(hidden, dtype=np.float64))
        bad = bad | ~np.isfinite(h).all(1)
        parts_h = [np.where(bad[:, None], 0.0, h)]
    x = np.where(bad[:, None], 0.0, x)
    m = x.max(1, keepdims=True)
    lse = m + np.log(np.exp(x - m).sum(1, keepdims=True))
    lp = x - lse
    p = np.exp(lp)
    lpc = np.maximum(lp, LOGP_FLOOR)
    p_sorted = -np.sort(-p, axis=1)
    parts = [
        p_sorted[:, :top_k],
        p_sorted[:, :1] - p_sorted[:, 1:2],
        -(p * lpc).sum(1, keepdims=True) / math.log(c),
        -np.sort(-lpc, axis=1)[:, :top_k],
        np.clip(lse, -LSE_CLIP, LSE_CLIP),
    ]
    if uses_logits:
        parts.append(lpc)
    f = np.concatenate(parts + parts_h, axis=1)
    f[bad] = np.nan
    return f


def mlp_scores(
    features: np.ndarray,
    mean: np.ndarray,
    inv_std: np.ndarray,
    w0: np.ndarray,
    b0: np.ndarray,
    w1: np.ndarray,
    b1: np.ndarray,
    two_layers: bool,
) -> np.ndarray:
    """(N,) ``sigmoid(-z)`` of (N, F) features standardised and through the layers, float64;
    NaN rows stay NaN. E.g. features ``[[0.5]]``, mean 0, inv_std 2, w0 ``[[1]]``, b0 0 (one
    layer): z = 1, score 1 / (1 + e) = 0.269."""
    a = (np.asarray(features, np.float64) - mean) * inv_std
    a = a @ w0 + b0
    if two_layers:
        a = np.maximum(a, 0.0) @ w1 + b1
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(np.clip(a[:, 0], -Z_CLIP, Z_CLIP)))


def router_scores_reference(
    logits: np.ndarray,
    hidden: np.ndarray | None,
    top_k: int,
    uses_logits: bool,
    *weights: Any,
) -> np.ndarray:
    """(N,) scores of (N, C) logits: :func:`router_features` then :func:`mlp_scores` with
    ``weights`` = (mean, inv_std, w0, b0, w1, b1, two_layers), the reference for
    :func:`router_score_row` (``hidden`` None or (N, 0) when unused)."""
    h = None if hidden is None or np.shape(hidden)[-1] == 0 else hidden
    return mlp_scores(router_features(logits, top_k, uses_logits, h), *weights)


# ---------------------------------------------------------------------------- jitted rows
@numba.njit(cache=True, nogil=True)
def mlp_score_row(f, mean, inv_std, w0, b0, w1, b1, two_layers):  # pragma: no cover - jitted
    """:func:`mlp_scores` of one (F,) feature row, as a float."""
    n_f, n_h = w0.shape
    z = 0.0
    if two_layers:
        for j in range(n_h):
            a = b0[j]
            for i in range(n_f):
                a += (f[i] - mean[i]) * inv_std[i] * w0[i, j]
            if a > 0.0:
                z += a * w1[j, 0]
        z += b1[0]
    else:
        z = b0[0]
        for i in range(n_f):
            z += (f[i] - mean[i]) * inv_std[i] * w0[i, 0]
    z = min(max(z, -Z_CLIP), Z_CLIP)
    return 1.0 / (1.0 + math.exp(z))


@numba.njit(cache=True, nogil=True)
def router_score_row(
    row, hidden, top_k, uses_logits, mean, inv_std, w0, b0, w1, b1, two_layers
):  # pragma: no cover - jitted
    """The router's score of one (C,) logits row and (H,) hidden vector (empty when unused):
    :func:`router_scores_reference` of one row, NaN for an invalid one. The top-k comes from
    repeated selection (k is small) in (value descending, index ascending) order, so ties
    give the same features as a sort. E.g. row ``[2, 1, 0]``, no hidden, top_k 1, one layer
    with mean 0, inv_std 1, w0 ``[[-1], [0], [0], [0], [0]]``, b0 0: z = -p_top = -0.665,
    score 1 / (1 + e^-0.665) = 0.660."""
    k = top_k
    f = np.empty(mean.shape[0])
    c = row.shape[0]
    m = -math.inf
    for j in range(c):
        x = row[j]
        if not x < math.inf:  # NaN or +inf
            return math.nan
        m = max(m, x)
    if m == -math.inf:
        return math.nan
    for j in range(hidden.shape[0]):
        if not math.isfinite(hidden[j]):
            return math.nan
    s = 0.0
    for j in range(c):
        s += math.exp(row[j] - m)
    lse = m + math.log(s)
    ent = 0.0
    for j in range(c):
        lp = row[j] - lse
        ent -= math.exp(lp) * max(lp, LOGP_FLOOR)
    base = k + 2 + k + 1
    if uses_logits:
        for j in range(c):
            f[base + j] = max(row[j] - lse, LOGP_FLOOR)
        base += c
    for j in range(hidden.shape[0]):
        f[base + j] = hidden[j]
    prev_v = math.inf
    prev_i = -1
    p1 = 0.0
    for t in range(max(k, 2)):  # at least the top 2, for the margin
        best_v = -math.inf
        best_i = -1
        for j in range(c):  # the largest after (prev_v, prev_i) in (value desc, index asc)
            v = row[j]
            if (v < prev_v or (v == prev_v and j > prev_i)) and (best_i < 0 or v > best_v):
                best_v = v
                best_i = j
        lp = best_v - lse
        p = math.exp(lp)
        if t == 0:
            p1 = p
        elif t == 1:
            f[k] = p1 - p
        if t < k:
            f[t] = p
            f[k + 2 + t] = max(lp, LOGP_FLOOR)
        prev_v, prev_i = best_v, best_i
    f[k + 1] = ent / math.log(c)
    f[k + 2 + k] = min(max(lse, -LSE_CLIP), LSE_CLIP)
    return mlp_score_row(f, mean, inv_std, w0, b0, w1, b1, two_layers)
