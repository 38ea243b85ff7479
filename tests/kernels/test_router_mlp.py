"""The learned router's jitted row kernel against its numpy reference: random rows and weights
(logistic and MLP, with and without class-ordered log-probs and a hidden vector), and the edge
cases: NaN/inf logits, no finite logit, C = 2, ties, huge logits, k = 1 and k = C."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tandem.kernels.router_mlp import (
    LOGP_FLOOR,
    mlp_score_row,
    mlp_scores,
    n_router_features,
    router_features,
    router_score_row,
    router_scores_reference,
)

INF, NAN = np.inf, np.nan


def _weights(n_f: int, two_layers: bool, seed: int, width: int = 8) -> tuple:
    """Random weights in the kernel's argument order, scaled so that scores spread."""
    rng = np.random.default_rng(seed)
    mean, inv_std = rng.normal(size=n_f) * 0.3, rng.uniform(0.5, 2.0, n_f)
    scale = 1 / math.sqrt(n_f)
    if two_layers:
        w0, b0 = rng.normal(size=(n_f, width)) * scale, rng.normal(size=width)
        w1, b1 = rng.normal(size=(width, 1)), rng.normal(size=1)
    else:
        w0, b0 = rng.normal(size=(n_f, 1)) * scale, rng.normal(size=1)
        w1, b1 = np.zeros((1, 1)), np.zeros(1)
    return mean, inv_std, w0, b0, w1, b1, two_layers


def _rows(logits: np.ndarray, hidden: np.ndarray, k: int, uses_logits: bool, w: tuple):
    return np.array(
        [router_score_row(x, h, k, uses_logits, *w) for x, h in zip(logits, hidden, strict=True)]
    )


def _check(logits, k: int, uses_logits: bool, hidden_dim: int, two: bool, seed: int = 0):
    x = np.asarray(logits, np.float32)
    n, c = x.shape
    h = np.random.default_rng(seed + 1).normal(size=(n, hidden_dim)).astype(np.float32)
    w = _weights(n_router_features(c, k, uses_logits, hidden_dim), two, seed)
    f = router_features(x, k, uses_logits, h if hidden_dim else None)
    f = f[np.isfinite(f).all(1)]
    if len(f) > 1:  # standardise as training does, so the scores spread over (0, 1)
        w = (f.mean(0), 1 / np.maximum(f.std(0), 1e-3), *w[2:])
    got = _rows(x, h, k, uses_logits, w)
    want = router_scores_reference(x, h, k, uses_logits, *w)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    return got


@pytest.mark.parametrize("two", [False, True])
@pytest.mark.parametrize(
    ("c", "k", "uses_logits", "hidden_dim"),
    [(2, 1, False, 0), (2, 2, True, 0), (3, 1, False, 4), (10, 3, False, 0), (10, 10, True, 32),
     (100, 5, True, 0), (7, 7, False, 3)],
)  # fmt: skip
def test_random_rows_match_the_reference(c, k, uses_logits, hidden_dim, two) -> None:
    rng = np.random.default_rng(c * 100 + k)
    logits = rng.normal(size=(64, c)) * rng.uniform(0.1, 8.0, size=(64, 1))
    got = _check(logits, k, uses_logits, hidden_dim, two, seed=c + k)
    assert np.isfinite(got).all() and got.std() > 1e-3  # the weights do move the score


@pytest.mark.parametrize("two", [False, True])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_edge_cases_match_the_reference(k, two) -> None:
    rows = [
        [NAN, 0, 0, 0],  # invalid
        [INF, 0, 0, 0],  # invalid
        [0, 1, NAN, -INF],  # invalid
        [-INF, -INF, -INF, -INF],  # invalid: no finite logit
        [1, 1, 1, 1],  # a four-way tie
        [5, 5, 0, 0],  # a tie for the top
        [0, 3, 3, 3],  # a tie for the top three
        [-INF, 2, -INF, 1],  # valid: some classes impossible
        [-INF, -INF, 7, -INF],  # one possible class: margin 1, entropy 0
        [3e4, 0, 0, -3e4],  # extreme but finite: lse clipped, logp floored
        [-3e38, -3e38, -3e38, -3e38],  # huge negative, equal
        [3e38, 0, -1, 2],  # near float32 max
        [0, 0, 0, 0],
    ]
    got = _check(rows, k, True, 0, two)
    assert np.isnan(got[:4]).all() and np.isfinite(got[4:]).all()


def test_two_classes_and_known_features() -> None:
    """C = 2: the margin is |p0 - p1|, and the entropy of an even split is exactly 1."""
    f = router_features(np.array([[0.0, 0.0], [2.0, 0.0]]), 2, uses_logits=True)
    p = 1 / (1 + math.exp(-2))
    np.testing.assert_allclose(f[0, :5], [0.5, 0.5, 0.0, 1.0, math.log(0.5)], atol=1e-12)
    np.testing.assert_allclose(f[1, [0, 1, 2]], [p, 1 - p, 2 * p - 1], atol=1e-12)
    assert f.shape == (2, n_router_features(2, 2, True, 0)) == (2, 9)
    one = router_features(np.array([[-INF, 4.0, -INF]]), 1, uses_logits=True)
    np.testing.assert_allclose(one[0, :4], [1.0, 1.0, 0.0, 0.0], atol=1e-12)
    assert one[0, -3] == one[0, -1] == LOGP_FLOOR  # impossible classes at the floor


def test_invalid_hidden_vector_scores_nan() -> None:
    w = _weights(n_router_features(3, 2, False, 2), False, 0)
    row = np.array([1.0, 0.0, -1.0])
    for bad in ([NAN, 0.0], [INF, 0.0], [0.0, -INF]):
        h = np.array(bad)
        assert math.isnan(router_score_row(row, h, 2, False, *w))
        assert np.isnan(router_scores_reference(row[None], h[None], 2, False, *w)).all()
    assert math.isfinite(router_score_row(row, np.zeros(2), 2, False, *w))


def test_mlp_row_matches_reference_and_saturates_without_overflow() -> None:
    rng = np.random.default_rng(3)
    for two in (False, True):
        w = _weights(6, two, 4)
        f = rng.normal(size=(50, 6)) * 3
        f[0] = 1e6  # |z| far past 709: clipped, the score is 0 or 1, not NaN
        got = np.array([mlp_score_row(r, *w) for r in f])
        np.testing.assert_allclose(got, mlp_scores(f, *w), rtol=1e-12, atol=1e-300)
        assert np.isfinite(got).all() and (got[0] == 1.0 or 0 < got[0] < 1e-300)
