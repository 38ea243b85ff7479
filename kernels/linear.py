"""Skinny matrix products: ``x @ w.T`` for a few rows of ``x`` against a large ``w``, and
:func:`linear`, which picks per shape class between that kernel and BLAS on this machine.

An MoE expert or a decode step sees a handful of tokens, so its GEMMs are (M ≤ 16) × K × N
with M tiny. :func:`skinny_linear` parallelises over the N output features; each block of
four weight rows is read once and multiplied with two rows of ``x`` at a time (a 4 × 2
register block: eight 8-wide accumulators, each weight load feeding two FMAs and each ``x``
load four). :func:`linear` is what callers use: per (row bucket, K, N) it runs whichever of
:data:`IMPLEMENTATIONS` — the kernel (parallel from :data:`SERIAL_MAX_MACS`), the kernel on
one thread, numpy's ``np.matmul(x, w.T)`` (OpenBLAS sgemv at M = 1, sgemm above) —
:mod:`~tandem.kernels.autotune` found fastest here, lazily on first use of a class or up front
with :func:`tune_linear` at warm-up. After that a call costs a dict lookup keyed by the shapes
more than the chosen function (0.4–0.6 µs measured on the loaded EPYC VM; the smallest
product costs 2.5 µs, a decode-sized one 20–100 µs).

Why the kernel loses to BLAS on some CPUs (profiled on the AMD EPYC VM, Zen 3, AVX2; the
AVX-512 code was compiled and read, not run: ``NUMBA_CPU_NAME=skylake-avx512`` +
``inspect_asm``):

* **Vector width.** Numba compiles for the host CPU, but LLVM's tuning for Skylake-SP /
  Cascade Lake / Ice Lake servers prefers 256-bit vectors (``prefer-256-bit``): the kernel's
  inner loop is ``vfmadd231ps ymm`` there too, half of what AVX-512 allows, while OpenBLAS's
  SkylakeX kernels use ``zmm``. (``NUMBA_CPU_FEATURES=...,-prefer-256-bit`` at process start
  makes Numba emit ``zmm``: a process-wide switch, not a library's to set.)
* **Loads per FMA.** The first kernel took one dot product per (row, feature): every FMA
  needed two loads (x and w), so it ran at the load ports' rate — one FMA per cycle instead of
  two — plus a horizontal reduction (~8 shuffles/adds) per output. OpenBLAS's sgemv_t kernel
  does four weight rows per pass with ``x`` loaded once (1.25 loads per FMA). The 4 × 2 block
  here needs 0.75 (six loads, eight FMAs per 8-wide step, no spills in the loop):
  single-threaded, 1.4–2.6× the first kernel's
  speed at M = 2–16 and 1.0–1.7× at M = 1 (EPYC VM, min of 15 interleaved rounds). The
  reduction order is what ``fastmath={"reassoc"}`` allows (8 lanes × 8 partial sums, summed
  at the end): float32 rounding like BLAS's, not bit-equal to it.
* **Where the weights live.** At M = 1, K = 512, N = 1024 the 2 MiB of ``w`` is the whole
  cost. 34 µs on the Intel VM is 62 GB/s: served from its large per-core L2 (1 MiB and up on
  Xeon Scalable), so instruction throughput decides, and ``zmm`` with fewer loads wins
  (86 vs 34 µs). On the EPYC VM (512 KiB L2) it streams from L3 and both are bandwidth-bound
  (≈ parity at M = 1).
* **Thread wake-up.** A Numba parallel region wakes the pool (the ``omp`` layer: libgomp
  spins briefly, then sleeps on a futex; waking a halted vCPU is an IPI and a VM exit, tens of
  µs; with another process on the cores, a scheduler time slice). OpenBLAS's threads spin for
  ~2^28 cycles after each call, so back-to-back calls find them awake — and on an
  oversubscribed VM the same spinning makes sgemm take 30–100 ms where it takes 0.1 (measured
  here at load average 8). Hence the serial candidate: autotune keeps whichever survives the
  machine.
* **Where it wins.** M = 2–16 against OpenBLAS sgemm, which packs all of ``w`` into panels
  before multiplying (one extra read and write of the weights per call): with the first
  kernel already 2.0–2.9× at M = 2 and 1.15–1.3× at M = 4 on the EPYC VM (K = 512, N = 1024
  and K = 1024, N = 512). At M = 1 against sgemv, and at M > 16, BLAS usually wins.
  :func:`linear` measures instead of assuming.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numba
import numpy as np

from tandem.kernels import autotune

# Callers send more rows than this to a GEMM without asking (fast_decode's prefill); up to it
# the choice is :func:`linear`'s. On the EPYC VM the kernel beat torch's F.linear up to here
# (K = 512, N = 2048 fp32: 23 vs 55 µs at M = 1, 42 vs 180 at M = 4, 147 vs 266 at M = 16).
SKINNY_MAX_ROWS = 16

# Below this many multiply-adds (m · n · k) one thread is faster: a parallel region costs a
# wake-up of the pool's threads (microseconds when they are idle, a scheduler time slice —
# milliseconds — when another process keeps the cores busy), more than a small product takes.
SERIAL_MAX_MACS = 1 << 17

# Row buckets of :func:`linear`'s shape classes, (first, last) rows: the skinny kernel's time
# grows with every row, sgemm's barely, and sgemv (one row) is its own case. Above the last
# bucket, one class. Each class is timed at both ends of its bucket.
ROW_BUCKETS = ((1, 1), (2, 4), (5, 8), (9, 16), (17, 64))
LARGE_ROWS = ROW_BUCKETS[-1][1] + 1
_ROW_CLASS = (-1, *(i for i, (lo, hi) in enumerate(ROW_BUCKETS) for _ in range(lo, hi + 1)))
_LARGE = len(ROW_BUCKETS)


@numba.njit(inline="always")
def _dot_4x2(x, w, out, m, n, k):  # pragma: no cover - jitted
    """out[m:m+2, n:n+4] = x[m:m+2] @ w[n:n+4].T — eight accumulators, one pass over k."""
    xa = x[m]
    xb = x[m + 1]
    w0 = w[n]
    w1 = w[n + 1]
    w2 = w[n + 2]
    w3 = w[n + 3]
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
    for kk in range(k):
        u = xa[kk]
        v = xb[kk]
        c0 = w0[kk]
        c1 = w1[kk]
        c2 = w2[kk]
        c3 = w3[kk]
        a0 += u * c0
        a1 += u * c1
        a2 += u * c2
        a3 += u * c3
        b0 += v * c0
        b1 += v * c1
        b2 += v * c2
        b3 += v * c3
    out[m, n] = a0
    out[m, n + 1] = a1
    out[m, n + 2] = a2
    out[m, n + 3] = a3
    out[m + 1, n] = b0
    out[m + 1, n + 1] = b1
    out[m + 1, n + 2] = b2
    out[m + 1, n + 3] = b3


@numba.njit(inline="always")
def _dot_4x1(x, w, out, m, n, k):  # pragma: no cover - jitted
    """out[m, n:n+4] = x[m] @ w[n:n+4].T — the odd last row, and M = 1."""
    xa = x[m]
    w0 = w[n]
    w1 = w[n + 1]
    w2 = w[n + 2]
    w3 = w[n + 3]
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for kk in range(k):
        u = xa[kk]
        a0 += u * w0[kk]
        a1 += u * w1[kk]
        a2 += u * w2[kk]
        a3 += u * w3[kk]
    out[m, n] = a0
    out[m, n + 1] = a1
    out[m, n + 2] = a2
    out[m, n + 3] = a3


@numba.njit(inline="always")
def _feature_block(x, w, out, n, k):  # pragma: no cover - jitted
    m_rows = x.shape[0]
    for m in range(0, m_rows - 1, 2):
        _dot_4x2(x, w, out, m, n, k)
    if m_rows % 2:
        _dot_4x1(x, w, out, m_rows - 1, n, k)


def _skinny_py(x, w, out):  # pragma: no cover - jitted
    """Blocks of four features in parallel (prange), then the last N % 4 features one by one."""
    k = x.shape[1]
    n_feat = w.shape[0]
    n_blocks = n_feat // 4
    for b in numba.prange(n_blocks):
        _feature_block(x, w, out, 4 * b, k)
    for n in range(4 * n_blocks, n_feat):
        for m in range(x.shape[0]):
            acc = np.float32(0.0)
            for kk in range(k):
                acc += x[m, kk] * w[n, kk]
            out[m, n] = acc


_FLAGS = dict(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})
_skinny = numba.njit(parallel=True, **_FLAGS)(_skinny_py)
_skinny_serial = numba.njit(parallel=False, **_FLAGS)(_skinny_py)  # prange runs as range


def skinny_linear(
    x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None, *, parallel: bool | None = None
) -> np.ndarray:
    """``x @ w.T`` for float32 ``x`` (M, K) and ``w`` (N, K), written into ``out`` (M, N).
    Always the Numba kernel: parallel over features from :data:`SERIAL_MAX_MACS` multiply-adds
    (or as ``parallel`` says); :func:`linear` is the function that picks between it and BLAS.

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
        if parallel is None:
            parallel = x.shape[0] * w.size > SERIAL_MAX_MACS
        kernel = _skinny if parallel else _skinny_serial
        kernel(np.ascontiguousarray(x), np.ascontiguousarray(w), out)
    return out


def skinny_linear_serial(x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """:func:`skinny_linear` on the calling thread only: no pool to wake (the candidate that
    wins where waking threads costs more than the product, e.g. on a loaded VM)."""
    return skinny_linear(x, w, out, parallel=False)


def blas_linear(x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The library side: numpy's ``np.matmul(x, w.T, out=out)`` (BLAS; ``w.T`` is a view, BLAS
    reads it transposed), with :func:`skinny_linear`'s argument checks."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"shapes {x.shape} and {w.shape} do not make x @ w.T")
    if x.dtype != np.float32 or w.dtype != np.float32:
        raise TypeError("linear takes float32 arrays")
    return np.matmul(x, w.T, out=out)


IMPLEMENTATIONS: dict[str, Callable[..., np.ndarray]] = {
    "tandem": skinny_linear,
    "tandem_serial": skinny_linear_serial,
    "library": blas_linear,
}

# (row class, K, N) → the chosen function; a memo of autotune's choices for the hot path
_chosen: dict[tuple[int, int, int], Callable[..., np.ndarray]] = {}
autotune.on_reset(_chosen.clear)


def linear(x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``x @ w.T`` for float32 ``x`` (M, K) and ``w`` (N, K) → (M, N) (into ``out`` if given),
    by whichever of :func:`skinny_linear` and BLAS is faster on this machine for M's bucket
    (:data:`ROW_BUCKETS`) and this (K, N). The first call of a class times both (about a
    millisecond); NaN and inf propagate as in numpy.

    >>> linear(np.ones((1, 3), np.float32), np.arange(6, dtype=np.float32).reshape(2, 3))
    array([[ 3., 12.]], dtype=float32)
    """
    try:
        m, k = x.shape
        fn = _chosen[(_ROW_CLASS[m] if m < LARGE_ROWS else _LARGE, k, w.shape[0])]
    except (KeyError, ValueError, IndexError, AttributeError):
        fn = _resolve(x, w)
    return fn(x, w, out)


def _resolve(x: np.ndarray, w: np.ndarray) -> Callable[..., np.ndarray]:
    """The slow path of :func:`linear`: check the arguments, then tune the class."""
    x, w = np.asarray(x), np.asarray(w)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"shapes {x.shape} and {w.shape} do not make x @ w.T")
    if x.dtype != np.float32 or w.dtype != np.float32:
        raise TypeError(f"linear takes float32 arrays, got {x.dtype} and {w.dtype}")
    m, k = x.shape
    if m == 0 or k == 0 or w.shape[0] == 0:
        return blas_linear  # nothing to multiply: not worth a class
    return _tune(m, w)


def _tune(m: int, w: np.ndarray) -> Callable[..., np.ndarray]:
    """Time both implementations for ``m``'s row bucket on ``w`` (autotune's lock makes
    concurrent first calls time once), and memoise the winner for :func:`linear`."""
    n, k = w.shape
    row_class = _ROW_CLASS[m] if m < LARGE_ROWS else _LARGE
    rows = ROW_BUCKETS[row_class] if row_class < _LARGE else (m, m)
    rng = np.random.default_rng(k * 7919 + n)
    xs = [rng.standard_normal((r, k), dtype=np.float32) for r in sorted(set(rows))]
    outs = [np.empty((len(xi), n), np.float32) for xi in xs]

    def run(impl: Callable[..., np.ndarray]) -> Callable[[], None]:
        def once() -> None:
            for xi, oi in zip(xs, outs, strict=True):
                impl(xi, w, oi)

        return once

    names = list(IMPLEMENTATIONS)
    if rows[1] * n * k <= SERIAL_MAX_MACS:
        names.remove("tandem_serial")  # skinny_linear runs serially here anyway
    winner = autotune.choose(
        "linear",
        (_class_label(row_class), f"K={k}", f"N={n}"),
        {name: run(IMPLEMENTATIONS[name]) for name in names},
    )
    fn = IMPLEMENTATIONS[winner]
    _chosen[(row_class, k, n)] = fn
    return fn


def tune_linear(
    shapes: Iterable[tuple[int, int] | np.ndarray], rows: Iterable[int]
) -> dict[str, str]:
    """Choose, at warm-up, for every weight shape and every row bucket that ``rows`` touches.
    ``shapes`` are the weights' shapes **(N, K) = ``w.shape``** (out features, in features, as
    a torch ``Linear.weight``) — or the weight arrays themselves (then those are timed, from
    wherever they live in memory). Returns {shape class → winner} for what was tuned.

    >>> tune_linear([(1024, 512)], rows=range(1, 17))  # doctest: +SKIP
    {'M=1,K=512,N=1024': 'library', 'M=2-4,K=512,N=1024': 'tandem', ...}
    """
    row_list = sorted({int(r) for r in rows if int(r) > 0})
    out: dict[str, str] = {}
    for shape in shapes:
        if isinstance(shape, np.ndarray):
            w = np.ascontiguousarray(shape, dtype=np.float32)
        else:
            n, k = (int(s) for s in shape)
            w = np.full((n, k), 0.01, np.float32)
        if w.ndim != 2 or 0 in w.shape:
            continue
        seen: set[int] = set()
        for m in row_list:
            row_class = _ROW_CLASS[m] if m < LARGE_ROWS else _LARGE
            if row_class in seen:
                continue
            seen.add(row_class)
            fn = _tune(m, w)
            out[f"{_class_label(row_class)},K={w.shape[1]},N={w.shape[0]}"] = _name_of(fn)
    return out


def _class_label(row_class: int) -> str:
    if row_class == _LARGE:
        return f"M>{LARGE_ROWS - 1}"
    lo, hi = ROW_BUCKETS[row_class]
    return f"M={lo}" if lo == hi else f"M={lo}-{hi}"


def _name_of(fn: Callable[..., np.ndarray]) -> str:
    return next(name for name, impl in IMPLEMENTATIONS.items() if impl is fn)


def skinny_linear_reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    import torch

    return torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w)).numpy()
