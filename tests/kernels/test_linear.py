from __future__ import annotations

import numpy as np
import pytest

from tandem.kernels.linear import skinny_linear, skinny_linear_reference


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
