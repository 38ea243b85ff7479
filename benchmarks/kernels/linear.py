"""``linear`` (autotuned) vs numpy's ``@`` and torch's ``F.linear``, same run.

``python -m benchmarks.kernels.linear``

Reference: ``np.matmul(x, w.T, out=out)`` (OpenBLAS: sgemv at one row, sgemm above) — what
:func:`tandem.kernels.linear.linear` must never be slower than — and torch's ``F.linear``.
Tandem: the skinny kernel (parallel over features, and serial), and ``linear``, which runs
whichever autotune chose for the row bucket; the "chosen" column says which. Shapes: the
projections of a Mixtral expert at H = 512, I = 1024 (gate/up 512 → 2048, down 1024 → 512)
and a square 512 × 512, at decode (1 row) to small-batch (32 rows) sizes.

Goal: ``linear`` ≤ 1.0× numpy's time everywhere (it picks numpy where numpy is faster), and
the dispatch itself (``linear`` minus the function it chose) well under a microsecond.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from benchmarks.common import emit, interleaved_median_s
from tandem.kernels import autotune
from tandem.kernels.linear import IMPLEMENTATIONS, _chosen, linear, skinny_linear

SHAPES = ((512, 2048), (1024, 512), (512, 512))  # (K, N)
ROWS = (1, 2, 4, 8, 16, 32)


def interleaved_us(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median µs per call of each function, timed in alternating rounds of ~5 ms each."""
    return {k: v * 1e6 for k, v in interleaved_median_s(fns, repeat, 0.005).items()}


def dispatch_overhead_ns(repeat: int) -> tuple[float, float]:
    """(``linear`` ns, the chosen function's ns) at a tiny shape, best of ``repeat`` loops."""
    x, w = np.ones((1, 8), np.float32), np.ones((4, 8), np.float32)
    out = np.empty((1, 4), np.float32)
    linear(x, w, out)
    chosen = _chosen[(0, 8, 4)]
    best = {"linear": float("inf"), "chosen": float("inf")}
    for _ in range(repeat):
        for name, fn in (("linear", linear), ("chosen", chosen)):
            t0 = time.perf_counter_ns()
            for _ in range(20000):
                fn(x, w, out)
            best[name] = min(best[name], (time.perf_counter_ns() - t0) / 20000)
    return best["linear"], best["chosen"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", default=None, help="default bench-linear.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    rows, data = [], {}
    tune_start = time.perf_counter()
    tune_ms = {}
    for k, n in SHAPES:
        w = rng.standard_normal((n, k), dtype=np.float32)
        wt = torch.from_numpy(w)
        for m in ROWS:
            x = rng.standard_normal((m, k), dtype=np.float32)
            xt = torch.from_numpy(x)
            out = np.empty((m, n), np.float32)
            t0 = time.perf_counter()
            np.testing.assert_allclose(linear(x, w, out), x @ w.T, rtol=1e-4, atol=1e-4)
            tune_ms[f"M={m},K={k},N={n}"] = (time.perf_counter() - t0) * 1e3
            chosen = next(name for name, fn in IMPLEMENTATIONS.items() if fn is _lookup(m, k, n))
            us = interleaved_us(
                {
                    "numpy": lambda x=x, w=w, out=out: np.matmul(x, w.T, out=out),
                    "torch": lambda xt=xt, wt=wt: torch.nn.functional.linear(xt, wt),
                    "skinny": lambda x=x, w=w, out=out: skinny_linear(x, w, out),
                    "skinny serial": lambda x=x, w=w, out=out: skinny_linear(
                        x, w, out, parallel=False
                    ),
                    "linear": lambda x=x, w=w, out=out: linear(x, w, out),
                },
                args.repeat,
            )
            ratio = us["linear"] / us["numpy"]
            rows.append(
                [
                    f"{m}×{k} · {k}×{n}",
                    *(round(v, 1) for v in us.values()),
                    chosen,
                    f"{ratio:.2f}×",
                    f"{us['numpy'] / us['skinny']:.2f}×",
                ]
            )
            data[f"M={m},K={k},N={n}"] = {
                **{f"{n_}_us": v for n_, v in us.items()},
                "chosen": chosen,
            }
    total_tune_s = time.perf_counter() - tune_start
    lin_ns, chosen_ns = dispatch_overhead_ns(args.repeat)
    data["dispatch_overhead_ns"] = lin_ns - chosen_ns
    data["first_call_ms"] = tune_ms
    data["autotune"] = {"choices": autotune.choices(), "timings_us": autotune.timings()}
    emit(
        "linear",
        f"x @ w.T, float32, µs per call (median of {args.repeat} interleaved rounds; load average "
        f"{os.getloadavg()[0]:.1f}); dispatch overhead {lin_ns - chosen_ns:.0f} ns per call; "
        f"run incl. tuning {total_tune_s:.1f} s",
        [
            "shape",
            "numpy",
            "torch",
            "skinny",
            "skinny serial",
            "linear",
            "chosen",
            "linear ÷ numpy",
            "skinny speed-up vs numpy",
        ],
        rows,
        data,
        args.json,
    )


def _lookup(m: int, k: int, n: int):
    from tandem.kernels.linear import _LARGE, _ROW_CLASS, LARGE_ROWS

    return _chosen[(_ROW_CLASS[m] if m < LARGE_ROWS else _LARGE, k, n)]


if __name__ == "__main__":
    main()
