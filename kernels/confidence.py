"""Confidence statistics over a batch of logits: top-1, max probability, margin, entropy.

This is step 3 of the request path: the router's gate reads these numbers to decide whether the
edge answer is good enough. :func:`confidence` picks the implementation;
:func:`confidence_reference` is the plain numpy version every implementation is tested against.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np
from llvmlite import ir as llvm_ir
from numba import types
from numba.extending import intrinsic, overload

from tandem.kernels.arrays import as_numpy, on_gpu

# From this many logits (N * C, N > 1) the parallel kernel wins: numba's thread pool costs
# about 1 µs to wake, which a batch of a few hundred logits repays. Chosen on 2 cores from the
# serial/parallel columns of `python -m benchmarks.kernels.confidence` and a sweep of N = 2..128 at
# C = 10, 100, 1000: the crossover lies between 320 and 1600 logits, and 512 loses at most
# 0.3 µs on either side of it.
PARALLEL_MIN_ELEMENTS = 512


class ConfidenceStats(NamedTuple):
    """Per-row statistics of a (N, C) logits batch; every field has shape (N,).

    ``entropy`` is in nats (divide by ``log(C)`` to normalise into [0, 1]). Rows holding NaN or
    +inf, and rows with no finite logit, have ``valid = False``, ``top1 = -1`` and NaN stats:
    they are reported, never turned into a confident answer.
    """

    top1: np.ndarray  # int64
    max_prob: np.ndarray  # float64
    margin: np.ndarray  # float64, top-1 minus top-2 probability
    entropy: np.ndarray  # float64, nats
    valid: np.ndarray  # bool


# exp for float32 rows: Cody–Waite range reduction, a degree-6 polynomial and an exponent built
# from bits. Branch-free, so LLVM vectorizes the loop that calls it (libm's expf is a scalar
# call): 0.3 ns instead of 3 ns per logit. Max relative error 2e-7 on [-87, 0] (float32 has
# 6e-8), checked in the tests against numpy.
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_F32_EXP_FLOOR = np.float32(-87.0)  # exp(-87) = 1.6e-38, still a normal float32
_F64_EXP_FLOOR = -1e300  # exp gives exactly 0, and 0 * -1e300 = 0 (not 0 * -inf = NaN)


@intrinsic
def _int32_bits_as_float32(typingctx, x):  # pragma: no cover - compile-time
    if x != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.FloatType())

    return types.float32(types.int32), codegen


@numba.njit(inline="always")
def _exp_f32(d):  # pragma: no cover - jitted
    """exp(d) for float32 d in [-87, 0]."""
    k = math.floor(d * _LOG2E + np.float32(0.5))
    r = d - k * _LN2_HI - k * _LN2_LO
    p = np.float32(1.0 / 720)
    p = p * r + np.float32(1.0 / 120)
    p = p * r + np.float32(1.0 / 24)
    p = p * r + np.float32(1.0 / 6)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * _int32_bits_as_float32(np.int32((np.int32(k) + 127) << 23))


def _exp_term(x, m):  # pragma: no cover - replaced by the overload below
    """(d, exp(d)) with d = x - m clamped so that d * exp(d) is never NaN."""


@overload(_exp_term, inline="always")
def _exp_term_impl(x, m):  # pragma: no cover - compile-time
    if x == types.float32:

        def f32(x, m):
            d = max(x - m, _F32_EXP_FLOOR)
            return d, _exp_f32(d)

        return f32

    def f64(x, m):
        d = max(x - m, _F64_EXP_FLOOR)
        return d, math.exp(d)

    return f64


# Rows are read in chunks that stay in L1: each chunk is scanned twice (compare-only for
# validity and the top two, then exp-and-add against the running max), so memory is read once
# and the exp loop has no branches. Between chunks the running sums are rescaled when the max
# moves: the online log-sum-exp of FlashAttention, at chunk rather than element granularity.
_CHUNK = 512


# reassoc lets LLVM vectorize the sums; NaN/inf semantics are kept (no nnan/ninf).
@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"}, error_model="numpy")
def _row_stats(row):  # pragma: no cover - jitted
    """(top1, max_prob, margin, entropy) of one row; top1 = -1 marks an invalid row.

    Invariants after each chunk: m = max so far, s = sum exp(x - m), t = sum exp(x - m)(x - m),
    so that entropy = log(s) - t / s. Accumulation is float64; exp runs in the input's
    precision (the vectorizable :func:`_exp_f32` for float32 rows)."""
    n = row.shape[0]
    b1 = -math.inf  # largest so far
    b2 = -math.inf  # second largest so far
    i1 = -1
    m = -math.inf  # the max the sums are relative to
    s = 0.0
    t = 0.0
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        for j in range(start, stop):
            x = row[j]
            if not x < math.inf:  # NaN or +inf
                return -1, math.nan, math.nan, math.nan
            if x > b1:
                b2 = b1
                b1 = x
                i1 = j
            elif x > b2:
                b2 = x
        if b1 == -math.inf:  # every logit so far is -inf: nothing to add
            continue
        if b1 > m:
            if m > -math.inf:
                d = m - b1
                e = math.exp(d)
                t = e * (t + d * s)
                s = e * s
            m = b1
        mx = row.dtype.type(m)
        for j in range(start, stop):
            d, e = _exp_term(row[j], mx)
            s += e
            t += e * d
    if i1 < 0:  # no finite logit
        return -1, math.nan, math.nan, math.nan
    return i1, 1.0 / s, (1.0 - math.exp(b2 - m)) / s, max(math.log(s) - t / s, 0.0)


@numba.njit(cache=True, nogil=True)
def _serial(logits, top1, max_prob, margin, entropy):  # pragma: no cover - jitted
    for r in range(logits.shape[0]):
        top1[r], max_prob[r], margin[r], entropy[r] = _row_stats(logits[r])


# A function of its own, not njit(parallel=True)(_serial): numba's on-disk cache is keyed by
# the Python function, so two dispatchers of one function would share (and swap) machine code.
@numba.njit(cache=True, nogil=True, parallel=True)
def _parallel(logits, top1, max_prob, margin, entropy):  # pragma: no cover - jitted
    for r in numba.prange(logits.shape[0]):
        top1[r], max_prob[r], margin[r], entropy[r] = _row_stats(logits[r])


def confidence(logits: np.ndarray) -> ConfidenceStats:
    """Top-1 index, max probability, margin and entropy of ``softmax(logits)`` per row, in one
    pass over memory per row (online log-sum-exp over L1-sized chunks, accumulated in float64).

    ``logits`` is (N, C) or (C,) float16/32/64, numpy or torch; N may be 0. CUDA tensors run
    the Triton twin (statistics as float32 tensors). Example::

        >>> s = confidence(np.array([[2.0, 1.0, 0.0], [0.0, 0.0, float("nan")]]))
        >>> s.top1.tolist(), s.max_prob.round(3).tolist(), s.valid.tolist()
        ([0, -1], [0.665, nan], [True, False])
        >>> s.margin.round(3)[0], s.entropy.round(3)[0]     # 0.665 - 0.245; nats
        (0.42, 0.832)
    """
    if on_gpu(logits):
        from tandem.kernels.triton_kernels import confidence_triton

        return ConfidenceStats(*confidence_triton(logits if logits.ndim == 2 else logits[None]))
    x = as_numpy(logits)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"logits must be (N, C) or (C,), got shape {x.shape}")
    if x.dtype not in (np.float32, np.float64):
        if x.dtype.kind not in "fiu":
            raise TypeError(f"logits must be a real number array, got {x.dtype}")
        x = x.astype(np.float32)
    n, c = x.shape
    if c == 0:
        raise ValueError("logits have no classes (C = 0)")
    top1 = np.empty(n, np.int64)
    max_prob = np.empty(n, np.float64)
    margin = np.empty(n, np.float64)
    entropy = np.empty(n, np.float64)
    if n:
        kernel = _parallel if n > 1 and n * c >= PARALLEL_MIN_ELEMENTS else _serial
        kernel(x, top1, max_prob, margin, entropy)
    return ConfidenceStats(top1, max_prob, margin, entropy, top1 >= 0)


def confidence_row(row: np.ndarray) -> tuple[int, float, float, float]:
    """``(top1, max_prob, margin, entropy)`` of one (C,) float32/float64 row, as Python
    scalars; ``top1 = -1`` (and NaN stats) marks a NaN/inf row. The single-request edge path
    calls this directly: one array argument is cheaper to dispatch than the batched kernel.

        >>> confidence_row(np.array([2.0, 1.0, 0.0]))[0]
        0
    """
    return _row_stats(row)


def confidence_reference(logits: np.ndarray) -> ConfidenceStats:
    """Plain numpy version of :func:`confidence` (several passes, float64)."""
    x = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    n, c = x.shape
    valid = np.asarray(~(np.isnan(x) | np.isposinf(x)).any(axis=1) & np.isfinite(x).any(axis=1))
    safe = np.where(valid[:, None], x, 0.0)
    m = safe.max(axis=1, keepdims=True)
    e = np.exp(safe - m)
    p = e / e.sum(axis=1, keepdims=True)
    top1 = np.argmax(safe, axis=1).astype(np.int64)
    if c > 1:
        top2 = -np.partition(-p, 1, axis=1)[:, :2]
        margin = top2[:, 0] - top2[:, 1]
    else:
        margin = np.ones(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.where(p > 0, np.log(p), 0.0)
    entropy = -(p * logp).sum(axis=1)
    nan = np.full(n, np.nan)
    return ConfidenceStats(
        np.where(valid, top1, -1),
        np.where(valid, p.max(axis=1), nan),
        np.where(valid, margin, nan),
        np.where(valid, np.maximum(entropy, 0.0), nan),
        valid,
    )


@numba.njit(cache=True, nogil=True)
def _all_finite(x):  # pragma: no cover - jitted
    for v in x.flat:  # noqa: SIM110 - numba compiles this loop; a generator would not
        if not np.isfinite(v):
            return False
    return True


def all_finite(x: np.ndarray) -> bool:
    """``np.isfinite(x).all()`` for float arrays, without the temporary: 0.1 µs instead of
    1.3 µs on a 64-element input, which matters on the edge's per-request path.

        >>> all_finite(np.array([1.0, np.inf])), all_finite(np.zeros((2, 3)))
        (False, True)
    """
    kind, size = x.dtype.kind, x.dtype.itemsize
    if kind != "f":
        return True
    return _all_finite(x if size > 2 else x.astype(np.float32))
