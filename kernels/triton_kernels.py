"""Triton twins of the CPU kernels, for CUDA tensors. The public functions in
:mod:`~tandem.kernels.confidence`, :mod:`~tandem.kernels.gating` and
:mod:`~tandem.kernels.dispatch` call these when their input lives on a GPU.

Gating and the dispatch plan fused into one launch for small batches are in
:mod:`~tandem.kernels.triton_route`.

On a machine without a GPU they run under ``TRITON_INTERPRET=1`` on CPU tensors (set before
this module is imported): that is how CI tests them against the same references as the Numba
kernels. Grouped top-k with a number of experts or groups that is not a power of two runs as
its torch reference on the GPU (correct, not fast).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from tandem.kernels.dispatch import MoEPlan
from tandem.kernels.gating import check_gating_args, topk_gating_reference

_SOFTMAX, _SIGMOID = 0, 1


# --------------------------------------------------------------------------- confidence
@triton.jit
def _confidence_kernel(
    x_ptr, top1_ptr, maxp_ptr, margin_ptr, ent_ptr, n_cols, stride, BLOCK: tl.constexpr
):
    """One program per row; the row is read once, in BLOCK-wide chunks, with the running max,
    runner-up, sum exp(x - m) and sum exp(x - m)(x - m) rescaled when the max moves."""
    row = tl.program_id(0)
    base = x_ptr + row * stride
    m = -float("inf")
    v2 = -float("inf")
    i1 = -1
    s = 0.0
    t = 0.0
    bad = 0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < n_cols
        x = tl.load(base + cols, mask=inside, other=-float("inf")).to(tl.float32)
        bad += tl.sum(((x != x) | (x == float("inf"))).to(tl.int32), axis=0)
        c1 = tl.max(x, axis=0)
        j1 = tl.min(tl.where(x == c1, cols, 2147483647), axis=0)
        c2 = tl.max(tl.where(cols == j1, -float("inf"), x), axis=0)
        # merge the chunk's top two into the running top two (ties: the earlier index stays)
        new_top = c1 > m
        v2 = tl.where(new_top, tl.maximum(m, c2), tl.maximum(v2, c1))
        i1 = tl.where(new_top, j1, i1)
        m_new = tl.maximum(m, c1)
        if m_new > -float("inf"):
            scale = tl.where(m > -float("inf"), tl.exp(m - m_new), 0.0)
            d_old = tl.where(m > -float("inf"), m - m_new, 0.0)
            t = scale * (t + d_old * s)
            s = scale * s
            d = tl.where(x > -float("inf"), x - m_new, 0.0)
            e = tl.where(x > -float("inf"), tl.exp(d), 0.0)
            s += tl.sum(e, axis=0)
            t += tl.sum(e * d, axis=0)
        m = m_new
    valid = (bad == 0) & (i1 >= 0)
    nan = float("nan")
    tl.store(top1_ptr + row, tl.where(valid, i1, -1).to(tl.int64))
    tl.store(maxp_ptr + row, tl.where(valid, 1.0 / s, nan))
    tl.store(margin_ptr + row, tl.where(valid, (1.0 - tl.exp(v2 - m)) / s, nan))
    tl.store(ent_ptr + row, tl.where(valid, tl.maximum(tl.log(s) - t / s, 0.0), nan))


def confidence_triton(logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(top1, max_prob, margin, entropy, valid) of (N, C) logits; float32 statistics."""
    x = logits.contiguous()
    n, c = x.shape
    dev = x.device
    top1 = torch.empty(n, dtype=torch.int64, device=dev)
    out = [torch.empty(n, dtype=torch.float32, device=dev) for _ in range(3)]
    if n:
        block = min(triton.next_power_of_2(c), 4096)
        _confidence_kernel[(n,)](x, top1, *out, c, x.stride(0), BLOCK=block)
    return (top1, *out, top1 >= 0)


# --------------------------------------------------------------------------- gating
@triton.jit
def _gating_kernel(
    logits_ptr,
    bias_ptr,
    w_ptr,
    ids_ptr,
    ok_ptr,
    n_exp,
    stride,
    k,
    SCORING: tl.constexpr,
    RENORM: tl.constexpr,
    USE_BIAS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    N_GROUPS: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
):
    """One program per row: scores, then k rounds of arg-max over the not-yet-taken experts
    (ties: lowest id), weights from the unbiased scores."""
    row = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    inside = e < n_exp
    x = tl.load(logits_ptr + row * stride + e, mask=inside, other=-float("inf")).to(tl.float32)
    bad = tl.sum((((x != x) | (x == float("inf"))) & inside).to(tl.int32), axis=0)
    m = tl.max(x, axis=0)
    if SCORING == 0:
        p = tl.where(inside, tl.exp(x - m), 0.0)
        score = p / tl.sum(p, axis=0)
        bad += (m == -float("inf")).to(tl.int32)
    else:
        score = tl.sigmoid(x)
    if USE_BIAS:  # noqa: SIM108 - a constexpr branch, resolved when the kernel compiles
        key = score + tl.load(bias_ptr + e, mask=inside, other=0.0)
    else:
        key = x
    taken = e >= n_exp
    if N_GROUPS > 1:  # keep the TOPK_GROUPS best groups (ties: lowest group id)
        gs: tl.constexpr = BLOCK_E // N_GROUPS
        g = tl.reshape(key, (N_GROUPS, gs))
        g1 = tl.max(g, axis=1)
        if USE_BIAS:  # DeepSeek-V3: a group scores the sum of its best two
            col = tl.arange(0, gs)[None, :]
            first = tl.min(tl.where(g == g1[:, None], col, gs), axis=1)
            gscore = g1 + tl.max(tl.where(col == first[:, None], -float("inf"), g), axis=1)
        else:
            gscore = g1
        gid = tl.arange(0, N_GROUPS)
        kept = gid < 0
        for _ in range(TOPK_GROUPS):
            masked = tl.where(kept, -float("inf"), gscore)
            top = tl.max(masked, axis=0)
            best = tl.min(tl.where((masked == top) & (~kept), gid, N_GROUPS), axis=0)
            kept = kept | (gid == best)
        eligible = tl.reshape(tl.broadcast_to(kept[:, None], (N_GROUPS, gs)), (BLOCK_E,))
        taken = taken | (~eligible)
    total = 0.0
    for j in range(k):
        masked = tl.where(taken, -float("inf"), key)
        best = tl.max(masked, axis=0)
        idx = tl.min(tl.where((masked == best) & (~taken), e, 2147483647), axis=0)
        w = tl.sum(tl.where(e == idx, score, 0.0), axis=0)
        tl.store(ids_ptr + row * k + j, idx.to(tl.int32))
        tl.store(w_ptr + row * k + j, w)
        total += w
        taken = taken | (e == idx)
    if RENORM:
        bad += (total <= 0.0).to(tl.int32)
        for j in range(k):
            w = tl.load(w_ptr + row * k + j)
            tl.store(w_ptr + row * k + j, w / total)
    tl.store(ok_ptr + row, (bad == 0).to(tl.int8))


def topk_gating_triton(
    logits: torch.Tensor,
    k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    bias: Any = None,
    n_groups: int | None = None,
    topk_groups: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_exp = logits.shape
    check_gating_args(n_exp, k, scoring, None if bias is None else len(bias), n_groups, topk_groups)
    block_e = triton.next_power_of_2(n_exp)
    groups_fit = n_groups is None or (block_e == n_exp and n_groups & (n_groups - 1) == 0)
    if not groups_fit:  # grouped selection on odd sizes: the torch reference, on the device
        w, ids = topk_gating_reference(
            logits,
            k,
            scoring=scoring,
            renormalize=renormalize,
            bias=bias,
            n_groups=n_groups,
            topk_groups=topk_groups,
        )
        return w, ids
    x = logits.contiguous()
    dev = x.device
    w = torch.empty(n_rows, k, dtype=torch.float32, device=dev)
    ids = torch.empty(n_rows, k, dtype=torch.int32, device=dev)
    ok = torch.empty(n_rows, dtype=torch.int8, device=dev)
    b = torch.as_tensor(bias, dtype=torch.float32, device=dev) if bias is not None else w
    if n_rows:
        _gating_kernel[(n_rows,)](
            x,
            b,
            w,
            ids,
            ok,
            n_exp,
            x.stride(0),
            k,
            SCORING=_SOFTMAX if scoring == "softmax" else _SIGMOID,
            RENORM=renormalize,
            USE_BIAS=bias is not None,
            BLOCK_E=block_e,
            N_GROUPS=n_groups or 1,
            TOPK_GROUPS=topk_groups or 1,
        )
        bad = torch.nonzero(ok == 0)[:10, 0].tolist()
        if bad:
            raise ValueError(f"gate logits rows {bad} hold NaN/+inf: cannot route them")
    return w, ids


# --------------------------------------------------------------------------- dispatch
@triton.jit
def _align_count_kernel(ids_ptr, counts_ptr, n_slots, BLOCK: tl.constexpr):
    """_count: one program per expert scans every slot (no atomics: deterministic)."""
    e = tl.program_id(0)
    total = 0
    for start in range(0, n_slots, BLOCK):
        s = start + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + s, mask=s < n_slots, other=-1)
        total += tl.sum((ids == e).to(tl.int32), axis=0)
    tl.store(counts_ptr + e, total)


@triton.jit
def _align_scatter_kernel(
    ids_ptr, offsets_ptr, sorted_ptr, slot_pos_ptr, n_slots, BLOCK: tl.constexpr
):
    """_scatter: one program per expert writes its slots, in slot order (a running prefix sum),
    from the expert's padded offset on."""
    e = tl.program_id(0)
    at = tl.load(offsets_ptr + e)
    for start in range(0, n_slots, BLOCK):
        s = start + tl.arange(0, BLOCK)
        mine = (tl.load(ids_ptr + s, mask=s < n_slots, other=-1) == e).to(tl.int32)
        pos = at + tl.cumsum(mine, axis=0) - mine
        tl.store(sorted_ptr + pos, s, mask=mine == 1)
        tl.store(slot_pos_ptr + s, pos, mask=mine == 1)
        at += tl.sum(mine, axis=0)


def moe_align_triton(expert_ids: torch.Tensor, n_experts: int, block_size: int) -> MoEPlan:
    """Two kernels (count, scatter) with the ``_prefix_sum`` pass in torch between them; the
    plan comes back as host arrays, like the CPU kernel's."""
    ids = expert_ids.reshape(-1).to(torch.int32).contiguous()
    n_slots = ids.numel()
    if n_slots and (int(ids.min()) < 0 or int(ids.max()) >= n_experts):
        raise ValueError(f"expert ids must lie in [0, {n_experts})")
    dev = ids.device
    counts = torch.zeros(n_experts, dtype=torch.int32, device=dev)
    block = 1024
    if n_slots:
        _align_count_kernel[(n_experts,)](ids, counts, n_slots, BLOCK=block)
    padded = (counts + block_size - 1) // block_size * block_size
    offsets = torch.zeros(n_experts + 1, dtype=torch.int32, device=dev)
    offsets[1:] = torch.cumsum(padded, 0)
    total = int(offsets[-1])
    sorted_ids = torch.full((total,), n_slots, dtype=torch.int32, device=dev)
    slot_pos = torch.empty(n_slots, dtype=torch.int32, device=dev)
    if n_slots:
        _align_scatter_kernel[(n_experts,)](
            ids, offsets, sorted_ids, slot_pos, n_slots, BLOCK=block
        )
    blocks = torch.repeat_interleave(
        torch.arange(n_experts, dtype=torch.int32, device=dev), (padded // block_size).long()
    )
    k = expert_ids.shape[1]
    return MoEPlan(
        sorted_ids.cpu().numpy(),
        blocks.cpu().numpy(),
        total,
        counts.cpu().numpy(),
        offsets.cpu().numpy(),
        slot_pos.cpu().numpy(),
        k,
        block_size,
    )


@triton.jit
def _permute_kernel(x_ptr, sorted_ptr, out_ptr, h, sentinel, top_k, BLOCK_H: tl.constexpr):
    p = tl.program_id(0)
    slot = tl.load(sorted_ptr + p)
    valid = slot != sentinel
    token = tl.where(valid, slot // top_k, 0)
    for start in range(0, h, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        inside = cols < h
        v = tl.load(x_ptr + token * h + cols, mask=inside, other=0.0)
        tl.store(out_ptr + p * h + cols, tl.where(valid, v, tl.zeros_like(v)), mask=inside)


def permute_triton(x: torch.Tensor, plan: MoEPlan) -> torch.Tensor:
    xs = x.contiguous()
    t, h = xs.shape
    out = torch.empty(plan.num_tokens_post_padded, h, dtype=xs.dtype, device=xs.device)
    sorted_ids = torch.as_tensor(np.asarray(plan.sorted_token_ids), device=xs.device)
    if len(out):
        block = min(triton.next_power_of_2(h), 1024)
        _permute_kernel[(len(out),)](
            xs, sorted_ids, out, h, t * plan.top_k, plan.top_k, BLOCK_H=block
        )
    return out


@triton.jit
def _combine_kernel(y_ptr, pos_ptr, w_ptr, out_ptr, h, top_k, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    for start in range(0, h, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        inside = cols < h
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for j in range(top_k):
            pos = tl.load(pos_ptr + t * top_k + j)
            w = tl.load(w_ptr + t * top_k + j)
            acc += w * tl.load(y_ptr + pos * h + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * h + cols, acc.to(out_ptr.dtype.element_ty), mask=inside)


def combine_triton(y: torch.Tensor, plan: MoEPlan, weights: torch.Tensor) -> torch.Tensor:
    ys = y.contiguous()
    h = ys.shape[1]
    n_tokens = len(plan.slot_positions) // plan.top_k if plan.top_k else 0
    out = torch.empty(n_tokens, h, dtype=ys.dtype, device=ys.device)
    pos = torch.as_tensor(np.asarray(plan.slot_positions), device=ys.device)
    w = weights.to(device=ys.device, dtype=torch.float32).contiguous()
    if n_tokens:
        block = min(triton.next_power_of_2(h), 1024)
        _combine_kernel[(n_tokens,)](ys, pos, w, out, h, plan.top_k, BLOCK_H=block)
    return out
