from __future__ import annotations

import numpy as np
import pytest

from tandem.kernels import autotune
from tandem.kernels.linear import linear, skinny_linear, skinny_linear_reference, tune_linear


@pytest.mark.parametrize(
    ("m", "k", "n"),
    # both kernels: serial below SERIAL_MAX_MACS multiply-adds, parallel above
    [(0, 8, 4), (1, 1, 1), (1, 512, 2048), (4, 33, 7), (16, 128, 64), (1, 64, 256), (3, 256, 512)],
)
def test_skinny_linear_matches_torch(m, k, n) -> None:
    rng = np.random.default_rng(m * k + n)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = rng.normal(size=(n, k)).astype(np.float32)
    got = skinny_linear(x, w)
    assert got.shape == (m, n)
    np.testing.assert_allclose(got, skinny_linear_reference(x, w), rtol=1e-4, atol=1e-4)


def test_skinny_linear_writes_into_a_view_and_propagates_nan() -> None:
    x = np.ones((2, 3), np.float32)
    x[1, 1] = np.nan
    out = np.zeros((4, 2), np.float32)
    skinny_linear(x, np.eye(2, 3, dtype=np.float32), out=out[1:3])
    assert out[0].tolist() == [0.0, 0.0] and out[3].tolist() == [0.0, 0.0]
    assert out[1].tolist() == [1.0, 1.0]
    assert np.isnan(out[2]).all()  # nan * 0 is nan: the row is poisoned, not hidden


def test_skinny_linear_argument_errors() -> None:
    with pytest.raises(ValueError):
        skinny_linear(np.ones((2, 3), np.float32), np.ones((4, 5), np.float32))
    with pytest.raises(TypeError):
        skinny_linear(np.ones((2, 3)), np.ones((4, 3)))


# --------------------------------------------------------------------------- linear (autotuned)
@pytest.fixture(params=["auto", "tandem", "library"])
def side(request, monkeypatch: pytest.MonkeyPatch):
    """Each test below runs with autotune free, and with each side forced (TANDEM_KERNELS)."""
    monkeypatch.setenv(autotune.ENV_VAR, request.param)
    autotune.reset()
    yield request.param
    monkeypatch.delenv(autotune.ENV_VAR)
    autotune.reset()


# every row bucket (both ends), the large class, and K or N = 1
LINEAR_SHAPES = [
    (m, k, n) for m in (1, 2, 4, 5, 8, 9, 16, 17, 64, 65, 300) for k, n in ((64, 96), (33, 7))
] + [(1, 1, 5), (3, 5, 1), (16, 1, 1), (17, 128, 1), (2, 1, 300)]


@pytest.mark.parametrize(("m", "k", "n"), LINEAR_SHAPES)
def test_linear_matches_numpy(side, m, k, n) -> None:
    rng = np.random.default_rng(m * 1000 + k * 10 + n)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = rng.normal(size=(n, k)).astype(np.float32)
    got = linear(x, w)
    assert got.shape == (m, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, x @ w.T, rtol=2e-5, atol=2e-5)
    label = next(iter(autotune.choices()["linear"]))
    assert label.endswith(f"K={k},N={n}")
    winner = autotune.choices()["linear"][label]
    if side == "library":
        assert winner == "library"
    elif side == "tandem":
        assert winner.startswith("tandem")


def test_linear_empty_and_zero_sized(side) -> None:
    assert linear(np.ones((0, 8), np.float32), np.ones((4, 8), np.float32)).shape == (0, 4)
    np.testing.assert_array_equal(
        linear(np.ones((3, 0), np.float32), np.ones((4, 0), np.float32)), np.zeros((3, 4))
    )
    assert linear(np.ones((3, 8), np.float32), np.ones((0, 8), np.float32)).shape == (3, 0)
    assert "linear" not in autotune.choices()  # nothing to multiply: no class tuned


@pytest.mark.parametrize("m", [1, 3, 16, 300])
def test_linear_nan_and_inf_propagate_like_numpy(side, m) -> None:
    rng = np.random.default_rng(m)
    x = rng.normal(size=(m, 40)).astype(np.float32)
    w = rng.normal(size=(9, 40)).astype(np.float32)
    x[0, 3] = np.nan
    x[-1, 5] = np.inf  # inf * (weights of both signs) → NaN in every column, as numpy
    w[2, 7] = -np.inf  # a column of ±inf (or NaN where x has the other sign's inf)
    with np.errstate(invalid="ignore"):
        got, want = linear(x, w), x @ w.T
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=2e-5, atol=2e-5)


def test_linear_writes_into_out(side) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    w = np.eye(4, 3, dtype=np.float32)
    out = np.full((4, 4), -1.0, np.float32)
    got = linear(x, w, out=out[1:3])
    assert np.shares_memory(got, out)
    np.testing.assert_array_equal(out[1:3], x @ w.T)
    assert (out[0] == -1).all() and (out[3] == -1).all()


def test_linear_argument_errors(side) -> None:
    with pytest.raises(ValueError, match=r"x @ w\.T"):
        linear(np.ones((2, 3), np.float32), np.ones((4, 5), np.float32))
    with pytest.raises(ValueError):
        linear(np.ones(3, np.float32), np.ones((4, 3), np.float32))
    with pytest.raises(TypeError, match="float32"):
        linear(np.ones((2, 3)), np.ones((4, 3)))
    linear(np.ones((2, 3), np.float32), np.ones((4, 3), np.float32))  # tunes the class …
    with pytest.raises(TypeError, match="float32"):  # … and float64 is still refused after
        linear(np.ones((2, 3)), np.ones((4, 3)))


def test_tune_linear_covers_each_bucket_once(side, monkeypatch) -> None:
    got = tune_linear([(96, 64), np.ones((7, 33), np.float32)], rows=[1, 2, 3, 16, 40, 200])
    assert set(got) == {
        f"{rows},K={k},N={n}"
        for k, n in ((64, 96), (33, 7))
        for rows in ("M=1", "M=2-4", "M=9-16", "M=17-64", "M>64")
    }
    assert got == autotune.choices()["linear"]

    def no_more_tuning(*args, **kwargs):
        raise AssertionError("linear re-tuned a class tune_linear covered")

    monkeypatch.setattr(autotune, "choose", no_more_tuning)
    rng = np.random.default_rng(0)
    for m in (1, 4, 12, 64, 65, 1000):
        x = rng.normal(size=(m, 64)).astype(np.float32)
        w = rng.normal(size=(96, 64)).astype(np.float32)
        np.testing.assert_allclose(linear(x, w), x @ w.T, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize(("m", "k", "n"), [(1, 7, 3), (2, 64, 5), (5, 130, 9), (16, 512, 1026)])
def test_skinny_kernel_blocks_and_tails(parallel, m, k, n) -> None:
    """The 4 × 2 register block with every remainder: odd M, N % 4 ≠ 0, N < 4."""
    rng = np.random.default_rng(m + k + n)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = rng.normal(size=(n, k)).astype(np.float32)
    got = skinny_linear(x, w, parallel=parallel)
    np.testing.assert_allclose(got, x @ w.T, rtol=2e-5, atol=5e-5)
