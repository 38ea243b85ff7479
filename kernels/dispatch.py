"""MoE dispatch and combine: group token slots by expert, gather rows into that order, and
scatter the experts' outputs back weighted by the gate.

* :func:`moe_align` — the dispatch plan (same contract as vLLM's ``moe_align_block_size``,
  written here in three named passes: ``_count`` → ``_prefix_sum`` → ``_scatter``);
* :func:`permute` — gather token rows into expert-contiguous (padded) order;
* :func:`combine` — the weighted sum of each token's k expert outputs, back in token order;
* :func:`route` — gating and the plan together: on CUDA, for a small batch, one fused Triton
  launch (:func:`~tandem.kernels.triton_route.gate_align_triton`) instead of six.

Each has a torch reference beside it (``*_reference``). numpy in, numpy out; torch in, torch
out (CPU tensors are viewed without a copy; bfloat16/float16 hidden states take the torch
reference path on CPU, where numpy has no bfloat16).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numba
import numpy as np

from tandem.kernels.arrays import as_numpy, is_torch, like, on_gpu

# Rows (tokens or slots) from which permute/combine run parallel: a row of H=512 floats is
# ~0.1 µs of copying, the pool's wake-up ~1 µs. Chosen with `python -m benchmarks.kernels.moe`.
PARALLEL_MIN_ROWS = 32


class MoEPlan(NamedTuple):
    """Where every (token, k) slot goes. ``slot = token * top_k + j``.

    sorted_token_ids: (P,) int32, slots ordered by expert, each expert's segment padded to a
        multiple of ``block_size`` with the sentinel ``T * top_k``.
    block_expert_ids: (P // block_size,) int32, the expert of each block.
    num_tokens_post_padded: P.
    expert_counts: (E,) int32, real slots per expert.
    expert_offsets: (E + 1,) int32, where each expert's padded segment starts (and P at the end).
    slot_positions: (T * top_k,) int32, the inverse map: the position of each slot in
        ``sorted_token_ids`` (what :func:`combine` reads).
    """

    sorted_token_ids: np.ndarray
    block_expert_ids: np.ndarray
    num_tokens_post_padded: int
    expert_counts: np.ndarray
    expert_offsets: np.ndarray
    slot_positions: np.ndarray
    top_k: int
    block_size: int


@numba.njit(cache=True, nogil=True)
def _count(ids, n_experts, counts):  # pragma: no cover - jitted
    """Histogram of expert ids; returns False on an id outside [0, E)."""
    counts[:] = 0
    for s in range(ids.shape[0]):
        e = ids[s]
        if e < 0 or e >= n_experts:
            return False
        counts[e] += 1
    return True


@numba.njit(cache=True, nogil=True)
def _prefix_sum(counts, block_size, offsets):  # pragma: no cover - jitted
    """Padded segment starts: offsets[e + 1] = offsets[e] + ceil(counts[e] / bs) * bs."""
    offsets[0] = 0
    for e in range(counts.shape[0]):
        offsets[e + 1] = offsets[e] + (counts[e] + block_size - 1) // block_size * block_size


@numba.njit(cache=True, nogil=True)
def _scatter(ids, offsets, block_size, sorted_ids, block_experts, slot_pos):  # pragma: no cover
    """Place each slot at its expert's next free position (slots in order: stable)."""
    n_experts = offsets.shape[0] - 1
    sentinel = ids.shape[0]
    cursor = offsets[:-1].copy()
    sorted_ids[:] = sentinel
    for s in range(ids.shape[0]):
        e = ids[s]
        p = cursor[e]
        sorted_ids[p] = s
        slot_pos[s] = p
        cursor[e] = p + 1
    for e in range(n_experts):
        for b in range(offsets[e] // block_size, offsets[e + 1] // block_size):
            block_experts[b] = e


def moe_align(expert_ids: Any, n_experts: int, block_size: int) -> MoEPlan:
    """The dispatch plan for top-k expert ids (T, k).

    Example: T = 4 tokens, k = 2, E = 4 experts, block_size = 4::

        expert_ids = [[2, 3], [1, 2], [1, 3], [3, 0]]       slots 0..7 = token * 2 + j
        counts     = [1, 2, 2, 3]                         expert 0: slot 7; 1: slots 2, 4; ...
        sorted_token_ids = [7, 8, 8, 8,   2, 4, 8, 8,   0, 3, 8, 8,   1, 5, 6, 8]
        block_expert_ids = [0, 1, 2, 3]                    num_tokens_post_padded = 16

        >>> p = moe_align(np.array([[2, 3], [1, 2], [1, 3], [3, 0]]), 4, 4)
        >>> p.sorted_token_ids.tolist()
        [7, 8, 8, 8, 2, 4, 8, 8, 0, 3, 8, 8, 1, 5, 6, 8]
        >>> p.block_expert_ids.tolist(), p.num_tokens_post_padded
        ([0, 1, 2, 3], 16)

    Slots keep their order inside an expert's segment (deterministic). An expert with no slot
    gets no block. Ids outside [0, E) raise ``ValueError``.
    """
    if on_gpu(expert_ids):
        from tandem.kernels.triton_kernels import moe_align_triton

        return moe_align_triton(expert_ids, n_experts, block_size)
    ids2 = np.asarray(as_numpy(expert_ids))
    if ids2.ndim != 2:
        raise ValueError(f"expert_ids must be (T, k), got shape {ids2.shape}")
    if block_size < 1 or n_experts < 1:
        raise ValueError("block_size and n_experts must be positive")
    ids = np.ascontiguousarray(ids2.reshape(-1), dtype=np.int32)
    counts = np.empty(n_experts, np.int32)
    if not _count(ids, n_experts, counts):
        raise ValueError(f"expert ids must lie in [0, {n_experts})")
    offsets = np.empty(n_experts + 1, np.int32)
    _prefix_sum(counts, block_size, offsets)
    total = int(offsets[-1])
    sorted_ids = np.empty(total, np.int32)
    block_experts = np.empty(total // block_size, np.int32)
    slot_pos = np.empty(ids.shape[0], np.int32)
    _scatter(ids, offsets, block_size, sorted_ids, block_experts, slot_pos)
    return MoEPlan(
        sorted_ids, block_experts, total, counts, offsets, slot_pos, ids2.shape[1], block_size
    )


def moe_align_reference(expert_ids: Any, n_experts: int, block_size: int) -> MoEPlan:
    """torch: a stable argsort of the flat ids, then padding per expert."""
    import torch

    ids = torch.as_tensor(expert_ids).reshape(-1).long()
    if ids.numel() and (ids.min() < 0 or ids.max() >= n_experts):
        raise ValueError(f"expert ids must lie in [0, {n_experts})")
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=n_experts)
    padded = (counts + block_size - 1) // block_size * block_size
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(padded, 0)])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])[:-1]
    sorted_e = ids[order]
    pos = offsets[sorted_e] + torch.arange(len(order)) - starts[sorted_e]
    total = int(offsets[-1])
    sorted_ids = torch.full((total,), len(ids), dtype=torch.int32)
    sorted_ids[pos] = order.to(torch.int32)
    slot_pos = torch.empty(len(ids), dtype=torch.int32)
    slot_pos[order] = pos.to(torch.int32)
    block_experts = torch.repeat_interleave(torch.arange(n_experts), padded // block_size)
    k = torch.as_tensor(expert_ids).shape[1]
    return MoEPlan(
        sorted_ids.numpy(),
        block_experts.to(torch.int32).numpy(),
        total,
        counts.to(torch.int32).numpy(),
        offsets.to(torch.int32).numpy(),
        slot_pos.numpy(),
        k,
        block_size,
    )


@numba.njit(cache=True, nogil=True)
def _permute_serial(x, sorted_ids, top_k, out):  # pragma: no cover - jitted
    sentinel = x.shape[0] * top_k
    for p in range(sorted_ids.shape[0]):
        s = sorted_ids[p]
        if s == sentinel:
            out[p, :] = 0
        else:
            out[p, :] = x[s // top_k]


@numba.njit(cache=True, nogil=True, parallel=True)
def _permute_parallel(x, sorted_ids, top_k, out):  # pragma: no cover - jitted
    sentinel = x.shape[0] * top_k
    for p in numba.prange(sorted_ids.shape[0]):
        s = sorted_ids[p]
        if s == sentinel:
            out[p, :] = 0
        else:
            out[p, :] = x[s // top_k]


def permute(x: Any, plan: MoEPlan) -> Any:
    """Rows of ``x`` (T, H) in the plan's expert-contiguous order: (P, H), padding rows zero.

    >>> p = moe_align(np.array([[1], [0], [1]]), 2, 2)    # k = 1: slot = token
    >>> permute(np.array([[10.0], [20.0], [30.0]]), p)[:, 0].tolist()
    [20.0, 0.0, 10.0, 30.0]
    """
    if on_gpu(x):
        from tandem.kernels.triton_kernels import permute_triton

        return permute_triton(x, plan)
    if is_torch(x) and not _numpy_dtype(x):
        return permute_reference(x, plan)
    xs = np.ascontiguousarray(as_numpy(x))
    out = np.empty((plan.num_tokens_post_padded, xs.shape[1]), xs.dtype)
    # real rows decide, not padded ones: at T = 1, k = 2 and block 16 the plan has 32 rows, of
    # which 30 are zeros — not worth waking the thread pool for (a time slice on a busy VM)
    kernel = _permute_parallel if len(plan.slot_positions) >= PARALLEL_MIN_ROWS else _permute_serial
    kernel(xs, plan.sorted_token_ids, plan.top_k, out)
    return like(out, x)


def permute_reference(x: Any, plan: MoEPlan) -> Any:
    """torch ``index_select`` over the valid slots, zeros for padding."""
    import torch

    xt = torch.as_tensor(x)
    sorted_ids = torch.as_tensor(plan.sorted_token_ids).long()
    valid = sorted_ids < xt.shape[0] * plan.top_k
    out = torch.zeros(len(sorted_ids), xt.shape[1], dtype=xt.dtype)
    out[valid] = xt.index_select(0, sorted_ids[valid] // plan.top_k)
    return out if is_torch(x) else out.numpy()


@numba.njit(cache=True, nogil=True)
def _combine_row(y, slot_pos, weights, t, top_k, out):  # pragma: no cover - jitted
    h = y.shape[1]
    acc = np.zeros(h, np.float32)
    for j in range(top_k):
        w = np.float32(weights[t, j])
        row = y[slot_pos[t * top_k + j]]
        for c in range(h):
            acc[c] += w * row[c]
    for c in range(h):
        out[t, c] = acc[c]


@numba.njit(cache=True, nogil=True)
def _combine_serial(y, slot_pos, weights, top_k, out):  # pragma: no cover - jitted
    for t in range(out.shape[0]):
        _combine_row(y, slot_pos, weights, t, top_k, out)


@numba.njit(cache=True, nogil=True, parallel=True)
def _combine_parallel(y, slot_pos, weights, top_k, out):  # pragma: no cover - jitted
    for t in numba.prange(out.shape[0]):
        _combine_row(y, slot_pos, weights, t, top_k, out)


def combine(y: Any, plan: MoEPlan, weights: Any) -> Any:
    """``out[t] = sum_j weights[t, j] * y[position of slot (t, j)]`` — the experts' outputs
    (P, H), in plan order, back to token order (T, H), accumulated in float32 in j order
    (deterministic, no atomics).

        >>> p = moe_align(np.array([[1, 0], [0, 1]]), 2, 2)   # T = 2, k = 2
        >>> y = np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)  # rows of slots 1, 2, 0, 3
        >>> combine(y, p, np.array([[0.5, 0.5], [0.25, 0.75]], np.float32))[:, 0].tolist()
        [2.0, 3.5]
    """
    if on_gpu(y):
        from tandem.kernels.triton_kernels import combine_triton

        return combine_triton(y, plan, weights)
    if is_torch(y) and not _numpy_dtype(y):
        return combine_reference(y, plan, weights)
    ys = np.ascontiguousarray(as_numpy(y))
    w = np.ascontiguousarray(as_numpy(weights), dtype=np.float32)
    n_tokens = len(plan.slot_positions) // plan.top_k if plan.top_k else 0
    if w.shape != (n_tokens, plan.top_k):
        raise ValueError(f"weights must be ({n_tokens}, {plan.top_k}), got {w.shape}")
    out = np.empty((n_tokens, ys.shape[1]), ys.dtype)
    kernel = _combine_parallel if n_tokens >= PARALLEL_MIN_ROWS else _combine_serial
    kernel(ys, plan.slot_positions, w, plan.top_k, out)
    return like(out, y)


def combine_reference(y: Any, plan: MoEPlan, weights: Any) -> Any:
    """torch ``index_add_`` of the weighted rows into token order."""
    import torch

    yt = torch.as_tensor(y)
    w = torch.as_tensor(weights).float().reshape(-1)
    slot_pos = torch.as_tensor(plan.slot_positions).long()
    n_slots = len(slot_pos)
    tokens = torch.arange(n_slots) // plan.top_k
    out = torch.zeros(n_slots // plan.top_k, yt.shape[1], dtype=torch.float32)
    out.index_add_(0, tokens, yt.index_select(0, slot_pos).float() * w[:, None])
    out = out.to(yt.dtype)
    return out if is_torch(y) else out.numpy()


def _numpy_dtype(t: Any) -> bool:
    """Whether a torch tensor's dtype exists in numpy (bfloat16 does not)."""
    import torch

    return t.dtype in (torch.float32, torch.float64)


def route(
    logits: Any,
    k: int,
    block_size: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    bias: Any = None,
    n_groups: int | None = None,
    topk_groups: int | None = None,
) -> tuple[Any, Any, MoEPlan]:
    """Router logits (T, E) → ``(weights (T, k), expert ids (T, k), plan)``: what
    :func:`~tandem.kernels.gating.topk_gating` and :func:`moe_align` give one after the other.
    CUDA logits with up to :data:`~tandem.kernels.triton_route.FUSED_MAX_TOKENS` rows and
    ungrouped selection take one fused launch; everything else the two kernels.

        >>> w, ids, plan = route(np.array([[0.0, 2.0, 1.0]], np.float32), 2, 2)
        >>> ids.tolist(), plan.sorted_token_ids.tolist()    # slots 0 (expert 1), 1 (expert 2)
        ([[1, 2]], [0, 2, 1, 2])
    """
    gating = dict(scoring=scoring, renormalize=renormalize, bias=bias)
    if on_gpu(logits) and n_groups is None:
        from tandem.kernels import triton_route as tr

        if logits.shape[0] <= tr.FUSED_MAX_TOKENS and logits.shape[1] <= tr.FUSED_MAX_EXPERTS:
            return tr.gate_align_triton(logits, k, block_size, **gating)
    from tandem.kernels.gating import topk_gating

    w, ids = topk_gating(logits, k, n_groups=n_groups, topk_groups=topk_groups, **gating)
    return w, ids, moe_align(ids, logits.shape[1], block_size)


def route_reference(
    logits: Any, k: int, block_size: int, **gating: Any
) -> tuple[Any, Any, MoEPlan]:
    """torch: :func:`~tandem.kernels.gating.topk_gating_reference`, then
    :func:`moe_align_reference`."""
    from tandem.kernels.gating import topk_gating_reference

    w, ids = topk_gating_reference(logits, k, **gating)
    return w, ids, moe_align_reference(ids, logits.shape[1], block_size)
