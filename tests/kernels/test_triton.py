"""Triton kernels against the same references as the Numba kernels. Without a GPU they run on
CPU tensors under TRITON_INTERPRET=1 (set here, before triton is imported)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tandem.kernels import (
    combine_reference,
    confidence_reference,
    moe_align,
    permute_reference,
    topk_gating_reference,
)
from tandem.kernels import triton_kernels as tk
from tandem.kernels import triton_route as tr

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on(x: torch.Tensor) -> torch.Tensor:
    return x.to(DEVICE)


@pytest.mark.parametrize(("n", "c"), [(0, 10), (1, 1), (3, 2), (8, 10), (2, 5000)])
def test_confidence_matches_reference(n, c) -> None:
    x = torch.randn(n, c, generator=torch.Generator().manual_seed(n + c)) * 3
    got = tk.confidence_triton(on(x))
    want = confidence_reference(x.numpy())
    np.testing.assert_array_equal(got[0].cpu().numpy(), want.top1)
    for g, w in zip(got[1:4], want[1:4], strict=True):
        np.testing.assert_allclose(g.cpu().numpy(), w, rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(got[4].cpu().numpy(), want.valid)


def test_confidence_edge_rows() -> None:
    x = torch.tensor(
        [
            [1.0, float("nan"), 0.0],
            [float("inf"), 0.0, 0.0],
            [float("-inf")] * 3,
            [2.0, 2.0, 1.0],  # tie: lowest index, zero margin
            [0.0, float("-inf"), 1.0],
        ]
    )
    top1, maxp, margin, ent, valid = tk.confidence_triton(on(x))
    np.testing.assert_allclose(maxp.cpu().numpy()[3:], [0.4223188, 0.7310586], rtol=1e-5)
    want = confidence_reference(x.numpy())
    assert top1.cpu().tolist() == want.top1.tolist() == [-1, -1, -1, 0, 2]
    assert valid.cpu().tolist() == [False, False, False, True, True]
    np.testing.assert_allclose(margin.cpu().numpy()[3:], want.margin[3:], atol=1e-6)
    np.testing.assert_allclose(ent.cpu().numpy()[3:], want.entropy[3:], rtol=1e-5)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"renormalize": False},
        {"scoring": "sigmoid"},
        {"bias": "random"},
        {"scoring": "sigmoid", "bias": "random", "renormalize": False},
        {"scoring": "sigmoid", "bias": "random", "n_groups": 4, "topk_groups": 2},
        {"n_groups": 4, "topk_groups": 2},
        {"n_groups": 8, "topk_groups": 3},
    ],
)
@pytest.mark.parametrize(("t", "e", "k"), [(0, 8, 2), (1, 16, 1), (9, 16, 16), (17, 64, 8)])
def test_gating_matches_reference(kw, t, e, k) -> None:
    if "n_groups" in kw and kw["topk_groups"] * (e // kw["n_groups"]) < k:
        pytest.skip("fewer experts in the kept groups than k")
    if "bias" in kw:
        kw = {**kw, "bias": torch.randn(e, generator=torch.Generator().manual_seed(1)) * 0.1}
    x = torch.randn(t, e, generator=torch.Generator().manual_seed(t * e + k))
    w, ids = tk.topk_gating_triton(on(x), k, **kw)
    wr, idr = topk_gating_reference(x, k, **{**kw})
    assert ids.cpu().tolist() == idr.tolist()
    torch.testing.assert_close(w.cpu(), wr, rtol=2e-5, atol=1e-6)


def test_grouped_gating_on_odd_sizes_falls_back_to_the_reference() -> None:
    x = torch.randn(5, 12)
    w, ids = tk.topk_gating_triton(on(x), 2, n_groups=3, topk_groups=2)
    wr, idr = topk_gating_reference(x, 2, n_groups=3, topk_groups=2)
    assert ids.cpu().tolist() == idr.tolist()
    torch.testing.assert_close(w.cpu(), wr)


def test_gating_ties_and_bad_rows() -> None:
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    assert tk.topk_gating_triton(on(x), 2)[1].cpu().tolist() == [[1, 2], [0, 1]]
    bad = torch.zeros(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        tk.topk_gating_triton(on(bad), 2)


@pytest.mark.parametrize(("t", "k", "e", "h"), [(0, 2, 4, 8), (1, 1, 4, 3), (13, 2, 4, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_permute_and_combine_match_reference(t, k, e, h, dtype) -> None:
    g = torch.Generator().manual_seed(t + h)
    x = torch.randn(t, h, generator=g).to(dtype)
    plan = moe_align(torch.randint(0, e, (t, k), generator=g), e, 4)
    xp = tk.permute_triton(on(x), plan)
    torch.testing.assert_close(xp.cpu(), permute_reference(x, plan))
    y = torch.randn(plan.num_tokens_post_padded, h, generator=g).to(dtype)
    w = torch.rand(t, k, generator=g)
    out = tk.combine_triton(on(y), plan, on(w))
    want = combine_reference(y.float(), plan, w).to(dtype)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("t", "k", "e", "bs"),
    [(0, 2, 4, 4), (1, 1, 1, 1), (5, 2, 4, 4), (300, 8, 64, 16), (700, 2, 3, 64)],
)
def test_moe_align_matches_reference(t, k, e, bs, assert_same_plan) -> None:
    from tandem.kernels import moe_align_reference

    ids = torch.randint(0, e, (t, k), generator=torch.Generator().manual_seed(t + k))
    got, want = tk.moe_align_triton(on(ids), e, bs), moe_align_reference(ids, e, bs)
    assert_same_plan(got, want)
    with pytest.raises(ValueError):
        tk.moe_align_triton(on(torch.tensor([[e]])), e, bs)


# --------------------------------------------------------------------------- fused gating + plan
FUSED_CASES = [
    {},
    {"renormalize": False},
    {"scoring": "sigmoid"},
    {"scoring": "sigmoid", "renormalize": False},
    {"bias": "random"},
    {"scoring": "sigmoid", "bias": "random"},
]


@pytest.mark.parametrize("kw", FUSED_CASES)
@pytest.mark.parametrize(
    ("t", "e", "k", "bs"),
    [(0, 8, 2, 4), (1, 8, 1, 1), (1, 8, 8, 16), (5, 6, 6, 4), (16, 64, 8, 16), (64, 16, 2, 4)],
)
def test_fused_gate_align_matches_the_two_references(kw, t, e, k, bs, assert_same_plan) -> None:
    """One launch = topk_gating_reference then moe_align_reference: k = 1, k = E, T = 0, odd
    E, and the largest batch the fused path takes."""
    from tandem.kernels import route_reference

    if kw.get("bias") == "random":
        kw = {**kw, "bias": torch.randn(e, generator=torch.Generator().manual_seed(2)) * 0.1}
    x = torch.randn(t, e, generator=torch.Generator().manual_seed(t * e + k)) * 2
    w, ids, plan = tr.gate_align_triton(on(x), k, bs, **kw)
    wr, idr, want = route_reference(x, k, bs, **kw)
    assert ids.cpu().tolist() == idr.tolist()
    torch.testing.assert_close(w.cpu(), wr, rtol=2e-5, atol=1e-6)
    assert_same_plan(plan, want)
    assert plan.top_k == k and plan.block_size == bs


def test_fused_gate_align_ties_and_neg_inf(assert_same_plan) -> None:
    from tandem.kernels import route_reference

    inf = float("inf")
    x = torch.tensor(
        [
            [1.0, 3.0, 3.0, 0.0],  # tie: lowest id first
            [2.0, 2.0, 2.0, 2.0],  # all tied
            [-inf, 1.0, -inf, 0.5],  # -inf experts come last
            [-inf, -inf, -inf, 0.0],  # one finite logit: k = 2 takes the lowest -inf expert
        ]
    )
    w, ids, plan = tr.gate_align_triton(on(x), 2, 2)
    assert ids.cpu().tolist() == [[1, 2], [0, 1], [1, 3], [3, 0]]
    wr, idr, want = route_reference(x, 2, 2)
    assert ids.cpu().tolist() == idr.tolist()
    torch.testing.assert_close(w.cpu(), wr, rtol=2e-5, atol=1e-6)
    assert_same_plan(plan, want)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computes on NaN
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fused_gate_align_refuses_rows_the_reference_refuses(bad) -> None:
    from tandem.kernels import topk_gating_reference

    x = torch.zeros(4, 8)
    x[2, 5] = bad
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        tr.gate_align_triton(on(x), 2, 4)
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        topk_gating_reference(x, 2)
    only_neg_inf = torch.full((1, 4), float("-inf"))
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        tr.gate_align_triton(on(only_neg_inf), 2, 4)
    # sigmoid of -inf is 0: nothing to renormalize; refused as the unfused Triton kernel does
    # (the torch reference answers NaN weights there, the Numba kernel equal weights)
    for gate in (tr.gate_align_triton, tk.topk_gating_triton):
        with pytest.raises(ValueError, match=r"rows \[0\]"):
            gate(
                on(only_neg_inf),
                2,
                *([4] if gate is tr.gate_align_triton else []),
                scoring="sigmoid",
            )
    w, _, _ = tr.gate_align_triton(on(only_neg_inf), 2, 4, scoring="sigmoid", renormalize=False)
    assert w.cpu().tolist() == [[0.0, 0.0]]


def test_fused_gate_align_limits_and_arguments() -> None:
    with pytest.raises(ValueError, match="fused"):
        tr.gate_align_triton(on(torch.zeros(tr.FUSED_MAX_TOKENS + 1, 4)), 2, 4)
    with pytest.raises(ValueError, match="k must be"):
        tr.gate_align_triton(on(torch.zeros(2, 4)), 5, 4)
    with pytest.raises(ValueError, match="block_size"):
        tr.gate_align_triton(on(torch.zeros(2, 4)), 2, 0)


def test_route_on_cpu_is_the_two_kernels(assert_same_plan) -> None:
    from tandem.kernels import route, route_reference

    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    w, ids, plan = route(x, 4, 16, n_groups=4, topk_groups=2)
    wr, idr, want = route_reference(x, 4, 16, n_groups=4, topk_groups=2)
    assert ids.tolist() == idr.tolist()
    torch.testing.assert_close(w, wr, rtol=2e-6, atol=1e-7)
    assert_same_plan(plan, want)
