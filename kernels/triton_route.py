"""Gating and the MoE dispatch plan in one Triton launch, for small batches on CUDA.

At decode and speculative-verification sizes (a few to a few dozen tokens) the GPU path of
``topk_gating`` then ``moe_align`` costs more in launches and host syncs than in work: a gating
kernel and its bad-row check, a min/max check of the ids, a count kernel, a cumulative sum, a
fill, a scatter kernel, a repeat — six launches and three device→host syncs. Here one program
holds the whole (T, E) batch of logits, gates every row and builds the plan, and the plan comes
back in one copy. :func:`~tandem.kernels.dispatch.route` calls :func:`gate_align_triton` for
CUDA logits up to :data:`FUSED_MAX_TOKENS` rows (ungrouped selection); larger batches and
grouped selection take the two kernels of :mod:`~tandem.kernels.triton_kernels`.

Same semantics as :func:`~tandem.kernels.gating.topk_gating` (ranking by logits, or by score +
bias; ties to the lowest id; rows with NaN/+inf, only -inf under softmax, or zero total weight
refused) and :func:`~tandem.kernels.dispatch.moe_align` (slots in order within each expert's
padded segment). Without a GPU it runs under ``TRITON_INTERPRET=1`` on CPU tensors: that is how
the tests compare it with the references (no GPU was available to time it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from tandem.kernels.dispatch import MoEPlan
from tandem.kernels.gating import check_gating_args

_SOFTMAX, _SIGMOID = 0, 1

# Up to this many tokens (and 256 experts) one program holds the whole (T, E) batch of logits
# in registers, so gating and the dispatch plan are one launch and one copy back to the host
# instead of the six launches and three host syncs of topk_gating_triton + moe_align_triton.
# Decode and speculative verification batches live here; above it the batch is spread over
# programs (one per row, one per expert) where the extra launches no longer matter. Not yet
# measured (no GPU was lent): set from the register tile, 64 × 256 floats for one program;
# ``python -m benchmarks.kernels.gpu`` on a GPU is where to move it.
FUSED_MAX_TOKENS = 64
FUSED_MAX_EXPERTS = 256


@triton.jit
def _gate_align_kernel(
    logits_ptr,
    bias_ptr,
    w_ptr,
    ids_ptr,
    meta_ptr,
    n_rows,
    n_exp,
    stride,
    k,
    block_size,
    counts_at,
    offsets_at,
    pos_at,
    sorted_at,
    n_sorted,
    SCORING: tl.constexpr,
    RENORM: tl.constexpr,
    USE_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """One program for the whole batch, in named passes:

    * ``_fill``: the plan's slots all start as the sentinel T·k;
    * ``_gate``: scores of every row, then k rounds of arg-max over the experts not yet taken
      (ties: lowest id), as in ``_gating_kernel`` but for all rows at once; each round marks
      the (token, expert) pairs it picked in ``hit``;
    * ``_count`` / ``_prefix_sum``: slots per expert = column sums of ``hit``; padded segment
      starts by a cumulative sum over experts;
    * ``_scatter``: a slot (t, j) with expert e goes to start(e) + the number of earlier tokens
      that picked e (a token picks an expert at most once, so slot order within a segment is
      token order) — a cumulative sum of ``hit`` down the tokens. The rounds are replayed (the
      same arg-maxes, no memory round trip) to store weights, ids and positions.

    ``meta`` (int32) holds, from these offsets: row ok flags (T) | counts (E) | offsets (E + 1)
    | slot positions (T·k) | sorted token ids (``n_sorted``, an upper bound on the plan)."""
    t = tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    row_in = t < n_rows
    col_in = e < n_exp
    inside = row_in[:, None] & col_in[None, :]
    # _fill
    sentinel = n_rows * k
    for start in range(0, n_sorted, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        tl.store(meta_ptr + sorted_at + p, tl.zeros_like(p) + sentinel, mask=p < n_sorted)
    tl.debug_barrier()
    # _gate
    x = tl.load(logits_ptr + t[:, None] * stride + e[None, :], mask=inside, other=-float("inf")).to(
        tl.float32
    )
    bad = tl.sum((((x != x) | (x == float("inf"))) & inside).to(tl.int32), axis=1)
    m = tl.max(x, axis=1)
    if SCORING == 0:
        finite_m = tl.where(m > -float("inf"), m, 0.0)  # padding rows: all -inf
        z = tl.where(inside, tl.exp(x - finite_m[:, None]), 0.0)
        z_sum = tl.sum(z, axis=1)
        score = z / tl.where(z_sum > 0.0, z_sum, 1.0)[:, None]
        bad += (m == -float("inf")).to(tl.int32)
    else:
        score = tl.sigmoid(x)
    if USE_BIAS:  # noqa: SIM108 - a constexpr branch, resolved when the kernel compiles
        key = score + tl.load(bias_ptr + e, mask=col_in, other=0.0)[None, :]
    else:
        key = x
    out_of_range = tl.broadcast_to((e >= n_exp)[None, :], (BLOCK_T, BLOCK_E))
    taken = out_of_range
    hit = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32)
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for _ in range(k):
        masked = tl.where(taken, -float("inf"), key)
        best = tl.max(masked, axis=1)
        idx = tl.min(tl.where((masked == best[:, None]) & (~taken), e[None, :], BLOCK_E), axis=1)
        pick = e[None, :] == idx[:, None]
        total += tl.sum(tl.where(pick, score, 0.0), axis=1)
        taken = taken | pick
        hit += (pick & row_in[:, None]).to(tl.int32)
    if RENORM:
        bad += (total <= 0.0).to(tl.int32)
        denom = tl.where(total > 0.0, total, 1.0)
    else:
        denom = tl.full((BLOCK_T,), 1.0, tl.float32)
    tl.store(meta_ptr + t, (bad == 0).to(tl.int32), mask=row_in)
    # _count, _prefix_sum
    counts = tl.sum(hit, axis=0)
    padded = (counts + block_size - 1) // block_size * block_size
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    tl.store(meta_ptr + counts_at + e, counts, mask=col_in)
    tl.store(meta_ptr + offsets_at + 1 + e, ends, mask=col_in)
    tl.store(meta_ptr + offsets_at + e, starts, mask=e == 0)
    # _scatter: before[t, e] = tokens above t that picked e
    before = tl.cumsum(hit, axis=0) - hit
    taken = out_of_range
    for j in range(k):
        masked = tl.where(taken, -float("inf"), key)
        best = tl.max(masked, axis=1)
        idx = tl.min(tl.where((masked == best[:, None]) & (~taken), e[None, :], BLOCK_E), axis=1)
        pick = e[None, :] == idx[:, None]
        w = tl.sum(tl.where(pick, score, 0.0), axis=1) / denom
        pos = tl.sum(tl.where(pick, starts[None, :] + before, 0), axis=1)
        slot = t * k + j
        tl.store(w_ptr + slot, w, mask=row_in)
        tl.store(ids_ptr + slot, idx.to(tl.int32), mask=row_in)
        tl.store(meta_ptr + pos_at + slot, pos, mask=row_in)
        tl.store(meta_ptr + sorted_at + pos, slot, mask=row_in)
        taken = taken | pick


def gate_align_triton(
    logits: torch.Tensor,
    k: int,
    block_size: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    bias: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, MoEPlan]:
    """``topk_gating`` then ``moe_align`` in one launch, for up to :data:`FUSED_MAX_TOKENS`
    rows and :data:`FUSED_MAX_EXPERTS` experts (ungrouped selection): ``(weights (T, k),
    expert ids (T, k))`` on the device, and the plan on the host (one copy back)."""
    n_rows, n_exp = logits.shape
    check_gating_args(n_exp, k, scoring, None if bias is None else len(bias), None, None)
    if block_size < 1:
        raise ValueError("block_size must be positive")
    if n_rows > FUSED_MAX_TOKENS or n_exp > FUSED_MAX_EXPERTS:
        raise ValueError(
            f"the fused launch takes up to {FUSED_MAX_TOKENS} rows and {FUSED_MAX_EXPERTS} "
            f"experts, got ({n_rows}, {n_exp})"
        )
    x = logits.contiguous()
    dev = x.device
    w = torch.empty(n_rows, k, dtype=torch.float32, device=dev)
    ids = torch.empty(n_rows, k, dtype=torch.int32, device=dev)
    n_slots = n_rows * k
    n_sorted = n_slots + min(n_exp, n_slots) * (block_size - 1)
    counts_at = n_rows
    offsets_at = counts_at + n_exp
    pos_at = offsets_at + n_exp + 1
    sorted_at = pos_at + n_slots
    meta = torch.zeros(sorted_at + n_sorted, dtype=torch.int32, device=dev)
    if n_rows:
        b = torch.as_tensor(bias, dtype=torch.float32, device=dev) if bias is not None else w
        _gate_align_kernel[(1,)](
            x,
            b,
            w,
            ids,
            meta,
            n_rows,
            n_exp,
            x.stride(0),
            k,
            block_size,
            counts_at,
            offsets_at,
            pos_at,
            sorted_at,
            n_sorted,
            SCORING=_SOFTMAX if scoring == "softmax" else _SIGMOID,
            RENORM=renormalize,
            USE_BIAS=bias is not None,
            BLOCK_T=max(triton.next_power_of_2(n_rows), 2),
            BLOCK_E=max(triton.next_power_of_2(n_exp), 2),
            BLOCK_P=1024,
        )
    host = meta.cpu().numpy()
    bad = np.flatnonzero(host[:n_rows] == 0)
    if len(bad):
        raise ValueError(
            f"gate logits rows {bad[:10].tolist()} hold NaN/+inf (or only -inf under softmax, "
            "or zero total weight): cannot route them"
        )
    counts = host[counts_at:offsets_at].copy()
    offsets = host[offsets_at:pos_at].copy()
    total = int(offsets[-1])
    blocks = np.repeat(np.arange(n_exp, dtype=np.int32), np.diff(offsets) // block_size)
    plan = MoEPlan(
        host[sorted_at : sorted_at + total].copy(),
        blocks,
        total,
        counts,
        offsets,
        host[pos_at:sorted_at].copy(),
        k,
        block_size,
    )
    return w, ids, plan
