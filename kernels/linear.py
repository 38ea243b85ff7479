"""Skinny matrix products: ``x @ w.T`` for a few rows of ``x`` against a large ``w``.

An MoE expert at decode time sees a handful of tokens, so its GEMMs are (M ≤ 16) × (K) × (N)
with M tiny: a BLAS GEMM parallelises such shapes poorly and streams the weights at a fraction
of memory bandwidth. This kernel parallelises over the N output features instead: each weight
row is read once, every token's dot product with it taken while it is in cache.
:func:`skinny_linear_reference` (``torch.nn.functional.linear``) is what it is tested against.
"""

from __future__ import annotations

import numba
import numpy as np

# Up to this many rows the kernel beats torch's F.linear (2 cores, K = 512, N = 2048 fp32:
# 23 vs 55 µs at M = 1, 42 vs 180 at M = 4, 147 vs 266 at M = 16, even at M = 32).
SKINNY_MAX_ROWS = 16


# Below this many multiply-adds (m · n · k) one thread is faster: a parallel region costs a
# wake-up of the pool's threads (microseconds when they are idle, a scheduler time slice —
# milliseconds — when another process keeps the cores busy), more than a small product takes.
SERIAL_MAX_MACS = 1 << 17


def _skinny_py(x, w, out):  # pragma: no cover - jitted
    m_rows, k = x.shape
    for n in numba.prange(w.shape[0]):
        for m in range(m_rows):
            acc = np.float32(0.0)
            for kk in range(k):
                acc += x[m, kk] * w[n, kk]
            out[m, n] = acc


_FLAGS = dict(cache=True, nogil=True, fastmath={"reassoc", "contract"})
_skinny = numba.njit(parallel=True, **_FLAGS)(_skinny_py)
_skinny_serial = numba.njit(parallel=False, **_FLAGS)(_skinny_py)  # prange runs as range


def skinny_linear(x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``x @ w.T`` for float32 ``x`` (M, K) and ``w`` (N, K), written into ``out`` (M, N).

    >>> skinny_linear(np.ones((1, 3), np.float32), np.arange(6, dtype=np.float32).reshape(2, 3))
    array([[ 3., 12.]], dtype=float32)
    """
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"shapes {x.shape} and {w.shape} do not make x @ w.T")
    if x.dtype != np.float32 or w.dtype != np.float32:
        raise TypeError("skinny_linear takes float32 arrays")
    if out is None:
        out = np.empty((x.shape[0], w.shape[0]), np.float32)
    if x.shape[0]:
        kernel = _skinny if x.shape[0] * w.size > SERIAL_MAX_MACS else _skinny_serial
        kernel(np.ascontiguousarray(x), np.ascontiguousarray(w), out)
    return out


def skinny_linear_reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    import torch

    return torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w)).numpy()
