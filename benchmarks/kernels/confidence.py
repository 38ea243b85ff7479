"""The confidence kernel vs numpy, same run.

``python -m benchmarks.kernels.confidence``

Reference: the numpy a user would write for top-1, max probability, margin and entropy of
``softmax(logits)`` in float32 — max, exp, sum, a partial sort for the top two, a log — each a
full pass over the batch. Tandem: :func:`tandem.kernels.confidence`, one pass per row (Numba,
parallel over rows above :data:`~tandem.kernels.confidence.PARALLEL_MIN_ELEMENTS`). The serial
and parallel kernels are also timed on their own: that is how the threshold was chosen.

Goal: ≥ 2× numpy at N ≥ 64.
"""

from __future__ import annotations

import argparse
import importlib

import numpy as np

from benchmarks.common import best_of_ms, emit

GOAL = 2.0
conf = importlib.import_module("tandem.kernels.confidence")


def numpy_confidence(x: np.ndarray) -> tuple[np.ndarray, ...]:
    """What a user writes with numpy (float32 throughout)."""
    m = x.max(axis=1, keepdims=True)
    e = np.exp(x - m)
    z = e.sum(axis=1, keepdims=True)
    p = e / z
    top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:] if p.shape[1] > 1 else None
    margin = top2[:, 1] - top2[:, 0] if top2 is not None else np.ones(len(x), x.dtype)
    entropy = np.log(z[:, 0]) - (e * (x - m)).sum(axis=1) / z[:, 0]
    return x.argmax(axis=1), p.max(axis=1), margin, entropy


def _raw(kernel, x: np.ndarray) -> None:
    n = len(x)
    kernel(x, np.empty(n, np.int64), np.empty(n), np.empty(n), np.empty(n))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", default=None, help="default bench-confidence.json")
    args = ap.parse_args(argv)

    rows, data = [], {}
    rng = np.random.default_rng(0)
    for n in (1, 64, 4096):
        for c in (10, 1000, 32000):
            x = (rng.normal(size=(n, c)) * 3).astype(np.float32)
            got, want = conf.confidence(x), numpy_confidence(x)
            np.testing.assert_array_equal(got.top1, want[0])
            np.testing.assert_allclose(got.max_prob, want[1], rtol=1e-4)
            repeat = max(3, args.repeat if n * c < 10**7 else 3)
            t_np = best_of_ms(lambda x=x: numpy_confidence(x), repeat)
            t_tandem = best_of_ms(lambda x=x: conf.confidence(x), repeat)
            t_serial = best_of_ms(lambda x=x: _raw(conf._serial, x), repeat)
            t_par = best_of_ms(lambda x=x: _raw(conf._parallel, x), repeat)
            ratio = t_np / t_tandem
            goal = ("yes" if ratio >= GOAL else "NO") if n >= 64 else "-"
            rows.append([n, c, t_np, t_tandem, t_serial, t_par, f"{ratio:.1f}×", goal])
            data[f"N={n},C={c}"] = {
                "numpy_ms": t_np,
                "tandem_ms": t_tandem,
                "serial_kernel_ms": t_serial,
                "parallel_kernel_ms": t_par,
                "speedup": ratio,
                "goal": GOAL if n >= 64 else None,
            }
    emit(
        "confidence",
        "confidence statistics over (N, C) float32 logits, ms per call",
        ["N", "C", "numpy", "tandem", "serial", "parallel", "speedup", f"≥{GOAL}× (N≥64)"],
        rows,
        data,
        args.json,
    )


if __name__ == "__main__":
    main()
