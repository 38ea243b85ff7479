"""Gating, dispatch and combine kernels against their torch references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem.kernels.dispatch import (
    combine,
    combine_reference,
    moe_align,
    moe_align_reference,
    permute,
    permute_reference,
)
from tandem.kernels.gating import topk_gating, topk_gating_reference

GATING_CASES = [
    {},
    {"renormalize": False},
    {"scoring": "sigmoid"},
    {"scoring": "sigmoid", "renormalize": False},
    {"bias": "random"},
    {"scoring": "sigmoid", "bias": "random", "n_groups": 8, "topk_groups": 4},
    {"n_groups": 4, "topk_groups": 2},
    {"n_groups": 8, "topk_groups": 8},
]


def gate_both(x: np.ndarray, k: int, **kw):
    if kw.get("bias") == "random":
        kw["bias"] = np.random.default_rng(1).normal(size=x.shape[1]).astype(np.float32) * 0.1
    got = topk_gating(x, k, **kw)
    want = topk_gating_reference(torch.from_numpy(x), k, **kw)
    return got, want


@pytest.mark.parametrize("kw", GATING_CASES)
@pytest.mark.parametrize(
    ("t", "e", "k"), [(1, 64, 8), (7, 64, 1), (300, 64, 8), (200, 64, 64), (33, 16, 2)]
)
def test_gating_matches_reference(kw, t, e, k) -> None:
    if "n_groups" in kw and kw["topk_groups"] * (e // kw["n_groups"]) < k:
        pytest.skip("fewer experts in the kept groups than k")
    x = np.random.default_rng(t * e + k).normal(size=(t, e)).astype(np.float32) * 2
    (w, ids), (wr, idr) = gate_both(x, k, **kw)
    np.testing.assert_array_equal(ids, idr.numpy())
    np.testing.assert_allclose(w, wr.numpy(), rtol=2e-6, atol=1e-7)
    assert ids.dtype == np.int32 and w.dtype == np.float32


def test_gating_parallel_path_matches_reference() -> None:
    x = np.random.default_rng(0).normal(size=(4096, 64)).astype(np.float32)
    for kw in GATING_CASES:
        (w, ids), (wr, idr) = gate_both(x, 8, **kw)
        np.testing.assert_array_equal(ids, idr.numpy())
        np.testing.assert_allclose(w, wr.numpy(), rtol=2e-6, atol=1e-7)


def test_gating_ties_go_to_the_lowest_id() -> None:
    x = np.array([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]], np.float32)
    for kw in ({}, {"scoring": "sigmoid"}, {"bias": np.zeros(5, np.float32)}):
        _, ids = topk_gating(x, 2, **kw)
        assert ids.tolist() == [[1, 2], [0, 1]]
    # tied groups: the lower group wins
    _, ids = topk_gating(np.ones((1, 8), np.float32), 2, n_groups=4, topk_groups=1)
    assert ids.tolist() == [[0, 1]]


def test_gating_empty_batch_and_k_equals_e() -> None:
    w, ids = topk_gating(np.zeros((0, 8), np.float32), 3)
    assert w.shape == (0, 3) and ids.shape == (0, 3)
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    w, ids = topk_gating(x, 8)
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
    assert sorted(ids[0].tolist()) == list(range(8))


def test_gating_neg_inf_logits_are_never_picked_first() -> None:
    x = np.array([[-np.inf, 1.0, -np.inf, 0.5]], np.float32)
    (w, ids), (wr, idr) = gate_both(x, 2)
    assert ids.tolist() == [[1, 3]] == idr.tolist()
    np.testing.assert_allclose(w, wr.numpy(), rtol=1e-6)
    w, ids = topk_gating(x, 3, renormalize=False)
    assert ids[0, 2] == 0 and w[0, 2] == 0.0  # a -inf expert only fills the last place


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_gating_refuses_nan_and_inf_rows(bad) -> None:
    x = np.zeros((4, 8), np.float32)
    x[2, 5] = bad
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        topk_gating(x, 2)
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        topk_gating(np.full((1, 4), -np.inf, np.float32), 2)


def test_gating_argument_errors() -> None:
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="k must be"):
        topk_gating(x, 9)
    with pytest.raises(ValueError, match="scoring"):
        topk_gating(x, 2, scoring="relu")
    with pytest.raises(ValueError, match="divide"):
        topk_gating(x, 2, n_groups=3, topk_groups=1)
    with pytest.raises(ValueError, match="fewer than k"):
        topk_gating(x, 5, n_groups=4, topk_groups=2)


def test_gating_torch_in_torch_out_and_low_precision_logits() -> None:
    x = torch.randn(16, 8)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w, ids = topk_gating(x.to(dtype), 2)
        assert isinstance(w, torch.Tensor) and isinstance(ids, torch.Tensor)
        wr, idr = topk_gating_reference(x.to(dtype).float(), 2)
        torch.testing.assert_close(ids, idr)
        torch.testing.assert_close(w, wr, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("t", "k", "e", "bs"),
    [(0, 2, 4, 4), (1, 1, 1, 1), (5, 2, 4, 4), (300, 8, 64, 16), (64, 4, 4, 1), (17, 3, 8, 64)],
)
def test_moe_align_matches_reference(t, k, e, bs, assert_same_plan) -> None:
    ids = np.random.default_rng(t + k).integers(0, e, size=(t, k))
    got, want = moe_align(ids, e, bs), moe_align_reference(torch.from_numpy(ids), e, bs)
    assert_same_plan(got, want)
    assert got.num_tokens_post_padded % bs == 0
    assert got.sorted_token_ids[got.slot_positions].tolist() == list(range(t * k))


def test_moe_align_all_tokens_to_one_expert_and_bad_ids() -> None:
    p = moe_align(np.full((5, 1), 3), 4, 4)
    assert p.expert_counts.tolist() == [0, 0, 0, 5]
    assert p.block_expert_ids.tolist() == [3, 3]
    assert p.sorted_token_ids.tolist() == [0, 1, 2, 3, 4, 5, 5, 5]
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        moe_align(np.array([[4]]), 4, 2)
    with pytest.raises(ValueError):
        moe_align(np.array([[-1]]), 4, 2)


@pytest.mark.parametrize(
    ("t", "k", "e", "h"), [(0, 2, 4, 8), (1, 1, 4, 3), (9, 2, 4, 16), (257, 8, 64, 64)]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_permute_and_combine_match_reference(t, k, e, h, dtype) -> None:
    rng = np.random.default_rng(t * h)
    x = rng.normal(size=(t, h)).astype(dtype)
    plan = moe_align(rng.integers(0, e, size=(t, k)), e, 4)
    xp = permute(x, plan)
    np.testing.assert_array_equal(xp, permute_reference(x, plan))
    w = rng.uniform(size=(t, k)).astype(np.float32)
    y = rng.normal(size=xp.shape).astype(dtype)
    np.testing.assert_allclose(
        combine(y, plan, w), combine_reference(y, plan, w), rtol=1e-5, atol=1e-6
    )


def test_permute_then_combine_with_unit_weights_sums_copies() -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    plan = moe_align(np.array([[0, 1], [1, 2], [2, 0], [1, 1]]), 3, 2)
    out = combine(permute(x, plan), plan, np.ones((4, 2), np.float32))
    np.testing.assert_array_equal(out, 2 * x)


def test_bfloat16_hidden_states_take_the_torch_path() -> None:
    x = torch.randn(10, 8, dtype=torch.bfloat16)
    plan = moe_align(torch.randint(0, 4, (10, 2)), 4, 4)
    xp = permute(x, plan)
    assert xp.dtype == torch.bfloat16
    out = combine(xp, plan, torch.full((10, 2), 0.5))
    torch.testing.assert_close(out, x, rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------- experts, autotuned
# tandem.runtime.moe.experts_forward picks one of several formulations per token bucket; each
# must give the same numbers (float32 summation order only).
def experts_case(t: int, e: int, k: int, h: int = 24, i: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed + t * 31 + e * 7 + k)
    x = torch.randn(t, h, generator=g)
    ids = torch.argsort(torch.rand(t, e, generator=g), dim=1)[:, :k].to(torch.int32)
    w = torch.rand(t, k, generator=g)
    gate_up = torch.randn(e, 2 * i, h, generator=g) * h**-0.5  # outputs of order one
    return x, ids, w, gate_up, torch.randn(e, h, i, generator=g) * i**-0.5


@pytest.fixture
def fresh_autotune(monkeypatch: pytest.MonkeyPatch):
    from tandem.kernels import autotune

    monkeypatch.delenv(autotune.ENV_VAR, raising=False)
    autotune.reset()
    yield autotune
    autotune.reset()


@pytest.mark.parametrize(("t", "e", "k"), [(1, 8, 2), (3, 4, 1), (16, 4, 4), (40, 8, 2)])
def test_every_experts_formulation_gives_the_same_numbers(t, e, k) -> None:
    from tandem.runtime.moe import IMPLEMENTATIONS, swiglu

    x, ids, w, gate_up, down = experts_case(t, e, k)
    with torch.no_grad():
        want = IMPLEMENTATIONS["tandem"](x, ids, w, gate_up, down)
        for name, impl in IMPLEMENTATIONS.items():
            got = impl(x, ids, w, gate_up, down, swiglu, False)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
            t_up, t_down = gate_up.transpose(1, 2), down.transpose(1, 2)
            got = impl(x, ids, w, t_up, t_down, swiglu, True)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{name} transposed")


@pytest.mark.parametrize("side", ["auto", "tandem", "library"])
def test_experts_forward_records_its_choice_per_token_bucket(fresh_autotune, side) -> None:
    from tandem.runtime.moe import experts_forward

    with fresh_autotune.forced(side), torch.no_grad():
        for t in (1, 3, 16, 300):
            x, ids, w, gate_up, down = experts_case(t, 4, 2)
            want = experts_forward(x, ids, w, gate_up, down)
            got = experts_forward(x, ids, w, gate_up, down)  # now from the memo
            torch.testing.assert_close(got, want)
        chosen = fresh_autotune.choices()["moe_experts"]
        assert set(chosen) == {
            f"{b},E=4,H=24,I=20,k=2,float32" for b in ("T=1", "T=2-4", "T=5-16", "T=257-1024")
        }
        if side == "tandem":
            assert all(impl.startswith("tandem") for impl in chosen.values())
        elif side == "library":
            assert not any(impl.startswith("tandem") for impl in chosen.values())
        # the rows formulation is no candidate above ROWS_MAX_TOKENS
        assert chosen["T=257-1024,E=4,H=24,I=20,k=2,float32"] != "tandem_rows"


def test_experts_forward_refuses_bad_ids_whichever_formulation(fresh_autotune) -> None:
    from tandem.runtime.moe import IMPLEMENTATIONS

    x, ids, w, gate_up, down = experts_case(5, 4, 2)
    for bad in (4, -1):
        ids_bad = ids.clone()
        ids_bad[2, 1] = bad
        for name, impl in IMPLEMENTATIONS.items():
            with pytest.raises(ValueError, match=r"\[0, 4\)"):
                impl(x, ids_bad, w, gate_up, down)
            assert name


def test_experts_forward_is_differentiable_when_asked() -> None:
    from tandem.runtime.moe import experts_forward

    x, ids, w, gate_up, down = experts_case(6, 4, 2)
    gate_up.requires_grad_(True)
    out = experts_forward(x, ids, w, gate_up, down)
    out.sum().backward()
    assert gate_up.grad is not None and gate_up.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(out, experts_forward(x, ids, w, gate_up, down))


def test_experts_forward_empty_batch() -> None:
    from tandem.runtime.moe import experts_forward

    x, ids, w, gate_up, down = experts_case(0, 4, 2)
    assert experts_forward(x, ids, w, gate_up, down).shape == (0, 24)
