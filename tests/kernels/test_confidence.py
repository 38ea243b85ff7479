from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tandem.kernels.confidence import all_finite, confidence, confidence_reference, confidence_row

# the package re-exports the function under the module's name
conf_mod = importlib.import_module("tandem.kernels.confidence")
FIELDS = ("top1", "max_prob", "margin", "entropy", "valid")


def assert_matches_reference(x: np.ndarray, rtol: float = 1e-9) -> None:
    got, want = confidence(x), confidence_reference(x)
    np.testing.assert_array_equal(got.valid, want.valid)
    np.testing.assert_array_equal(got.top1, want.top1)
    for f in ("max_prob", "margin", "entropy"):
        np.testing.assert_allclose(
            getattr(got, f), getattr(want, f), rtol=rtol, atol=1e-12, err_msg=f
        )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("n", "c"), [(1, 1), (1, 2), (7, 2), (5, 10), (64, 1000), (300, 77), (3, 32000)]
)
def test_random_logits_match_reference(dtype, n, c) -> None:
    x = (np.random.default_rng(n * c).normal(size=(n, c)) * 4).astype(dtype)
    assert_matches_reference(x, rtol=1e-9 if dtype == np.float64 else 1e-6)


def test_parallel_and_serial_kernels_agree() -> None:
    x = np.random.default_rng(1).normal(size=(64, conf_mod.PARALLEL_MIN_ELEMENTS // 32)) * 3
    a = [np.empty(64, t) for t in (np.int64, np.float64, np.float64, np.float64)]
    b = [np.empty(64, t) for t in (np.int64, np.float64, np.float64, np.float64)]
    conf_mod._serial(x, *a)
    conf_mod._parallel(x, *b)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)


def test_empty_batch() -> None:
    s = confidence(np.zeros((0, 10), np.float32))
    assert all(len(getattr(s, f)) == 0 for f in FIELDS)


def test_single_class_is_certain() -> None:
    s = confidence(np.array([[3.0], [-1e30]]))
    assert s.top1.tolist() == [0, 0]
    assert s.max_prob.tolist() == [1.0, 1.0]
    assert s.margin.tolist() == [1.0, 1.0]
    assert s.entropy.tolist() == [0.0, 0.0]


def test_ties_pick_lowest_index_and_zero_margin() -> None:
    s = confidence(np.array([[1.0, 5.0, 5.0, 5.0], [2.0, 2.0, 2.0, 2.0]]))
    assert s.top1.tolist() == [1, 0]
    np.testing.assert_allclose(s.margin, [0.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(s.entropy[1], np.log(4))
    assert_matches_reference(np.array([[1.0, 5.0, 5.0, 5.0], [2.0, 2.0, 2.0, 2.0]]))


def test_huge_and_tiny_logits_stay_finite() -> None:
    x = np.array([[1e300, 1e300 - 1e290, -1e300], [1e-300, -1e-300, 0.0], [88.0, 89.0, -1e4]])
    s = confidence(x)
    assert s.valid.all()
    assert np.isfinite(s.max_prob).all() and np.isfinite(s.entropy).all()
    assert_matches_reference(x)
    x32 = np.array([[3e38, -3e38, 0.0]], np.float32)
    s32 = confidence(x32)
    assert s32.top1[0] == 0 and s32.max_prob[0] == 1.0


def test_nan_and_inf_rows_are_flagged_not_confident() -> None:
    x = np.array(
        [
            [1.0, np.nan, 0.0],
            [np.inf, 0.0, 0.0],
            [-np.inf, -np.inf, -np.inf],
            [0.0, -np.inf, 1.0],  # -inf is a legal logit: probability 0
        ]
    )
    s = confidence(x)
    assert s.valid.tolist() == [False, False, False, True]
    assert s.top1.tolist() == [-1, -1, -1, 2]
    assert np.isnan(s.max_prob[:3]).all() and np.isnan(s.entropy[:3]).all()
    assert_matches_reference(x)
    assert confidence_row(x[0])[0] == -1


@settings(max_examples=150, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
        elements=st.floats(-1e6, 1e6) | st.sampled_from([np.nan, np.inf, -np.inf, 0.0]),
    )
)
def test_property_matches_reference(x) -> None:
    assert_matches_reference(x, rtol=1e-7)


def test_row_function_matches_batched() -> None:
    x = np.random.default_rng(3).normal(size=(20, 10)).astype(np.float32)
    s = confidence(x)
    for i, row in enumerate(x):
        top1, p, m, h = confidence_row(row)
        assert (top1, p, m, h) == (s.top1[i], s.max_prob[i], s.margin[i], s.entropy[i])


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="C = 0"):
        confidence(np.zeros((3, 0)))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        confidence(np.zeros((2, 2, 2)))
    with pytest.raises(TypeError):
        confidence(np.array([["a", "b"]]))
    s = confidence(np.array([1, 3, 2], dtype=np.int32))  # ints and float16 are upcast
    assert s.top1.tolist() == [1]
    assert confidence(np.array([[0.5, 1.5]], np.float16)).top1.tolist() == [1]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32])
def test_all_finite_matches_numpy(dtype) -> None:
    rng = np.random.default_rng(0)
    for shape in [(0,), (1, 64), (3, 4, 5), ()]:
        x = rng.normal(size=shape).astype(dtype)
        assert all_finite(x) == bool(np.isfinite(x).all())
        if x.size and dtype != np.int32:
            for bad in (np.nan, np.inf, -np.inf):
                y = x.copy()
                y.flat[-1] = bad
                assert all_finite(y) is False
    assert all_finite(np.zeros((4, 4))[:, ::2])  # non-contiguous


def test_float32_exp_polynomial_matches_numpy() -> None:
    import numba

    @numba.njit
    def run(d):
        out = np.empty_like(d)
        for i in range(d.shape[0]):
            out[i] = conf_mod._exp_f32(d[i])
        return out

    d = np.concatenate([np.linspace(-87, 0, 200_001), [-87.0, -0.5 * np.log(2), -1e-8, 0.0]])
    d = d.astype(np.float32)
    want = np.exp(d.astype(np.float64))
    np.testing.assert_allclose(run(d), want, rtol=3e-7)


def test_masked_logits_keep_entropy_exact() -> None:
    """Large vocabularies with most logits masked to -inf: the masked ones count for nothing."""
    x = np.full((2, 32000), -np.inf, np.float32)
    x[0, :4] = [1.0, 1.0, 1.0, 1.0]
    x[1, 100] = 3.0
    s = confidence(x)
    np.testing.assert_allclose(s.entropy, [np.log(4), 0.0], atol=1e-6)
    np.testing.assert_allclose(s.max_prob, [0.25, 1.0], rtol=1e-6)
    assert s.top1.tolist() == [0, 100]
