"""MoE gating: score each row of router logits and pick its top-k experts, in one fused pass.

:func:`topk_gating` is the public function (Numba on CPU, Triton on CUDA tensors);
:func:`topk_gating_reference` is the plain torch version every implementation is tested against.

Selection semantics, shared by all implementations:

* without ``bias``, experts are ranked by their **logits** (softmax and sigmoid are monotonic,
  so this is the order of the scores, without ties that rounding would create);
* with ``bias`` (DeepSeek-V3's correction bias), by ``score + bias``; the bias only steers the
  choice, the weights are the unbiased scores;
* grouped (``n_groups``/``topk_groups``): experts are split into ``n_groups`` equal groups, a
  group is scored by its best expert (or, with ``bias``, the sum of its best two, as in
  DeepSeek-V3), the ``topk_groups`` best groups are kept and the top-k is taken inside them;
* ties go to the lowest expert (or group) id; experts come out best first;
* ``renormalize`` divides the k weights by their sum.

A row holding NaN or +inf (or, under softmax, only -inf) raises ``ValueError`` naming the rows:
a gate never routes on garbage.
"""

from __future__ import annotations

import importlib
from typing import Any, Literal

import numba
import numpy as np

from tandem.kernels.arrays import as_numpy, like, on_gpu

_conf = importlib.import_module("tandem.kernels.confidence")
_exp_f32 = _conf._exp_f32

SOFTMAX, SIGMOID = 0, 1
_SCORING = {"softmax": SOFTMAX, "sigmoid": SIGMOID}
_ROWS_PER_TASK = 32  # rows per parallel task: scratch buffers are allocated once per task
# From this many rows the parallel kernel wins: a sweep at E = 64, k = 8 on 2 cores gave
# serial/parallel 6.9/7.2 µs at T = 16, 13.9/11.7 at T = 32, 27.7/11.5 at T = 64.
PARALLEL_MIN_ROWS = 32
_F32_EXP_FLOOR = np.float32(-87.0)


@numba.njit(inline="always")
def _exp_neg(d):  # pragma: no cover - jitted
    """exp(d) for float32 d <= 0; exactly 0 below -87 (where float32 runs out anyway)."""
    return _exp_f32(max(d, _F32_EXP_FLOOR)) if d >= _F32_EXP_FLOOR else np.float32(0.0)


@numba.njit(inline="always")
def _sigmoid(x):  # pragma: no cover - jitted
    """Branch-free: exp of -|x| only (never overflows), then 1/(1+e) or e/(1+e)."""
    e = _exp_f32(max(-abs(x), _F32_EXP_FLOOR))
    r = np.float32(1.0) / (np.float32(1.0) + e)
    return r if x >= 0 else e * r


@numba.njit(inline="always")
def _gate_row(  # pragma: no cover - jitted
    row,
    k,
    scoring,
    renormalize,
    bias,
    use_bias,
    n_groups,
    topk_groups,
    key,
    vals,
    sel,
    gscore,
    gkeep,
    ckey,
    cid,
    all_ids,
    submax,
    vals_s,
    ids_s,
    w_out,
    id_out,
):
    """Gate one row into w_out/id_out; returns False for a row that cannot be gated."""
    n_exp = row.shape[0]
    m = -np.inf
    for e in range(n_exp):
        x = row[e]
        if not x < np.inf:  # NaN or +inf
            return False
        if x > m:
            m = x
    if scoring == SOFTMAX and m == -np.inf:
        return False
    mf = np.float32(m)
    inv_z = 0.0
    if use_bias:
        if scoring == SOFTMAX:
            z = 0.0
            for e in range(n_exp):
                p = _exp_neg(row[e] - mf)
                key[e] = p
                z += p
            inv_z = 1.0 / z
            for e in range(n_exp):
                key[e] = np.float32(key[e] * inv_z) + bias[e]
        else:
            for e in range(n_exp):
                key[e] = _sigmoid(row[e]) + bias[e]
    else:
        for e in range(n_exp):
            key[e] = row[e]
    group_size = n_exp // n_groups
    if n_groups > 1:
        for g in range(n_groups):
            b1 = -np.inf
            b2 = -np.inf
            for e in range(g * group_size, (g + 1) * group_size):
                v = key[e]
                b2 = max(b2, min(b1, v))  # branch-free running top two
                b1 = max(b1, v)
            gscore[g] = b1 + b2 if use_bias else b1
            gkeep[g] = False
        for _ in range(topk_groups):
            best = -1
            for g in range(n_groups):
                if not gkeep[g] and (best < 0 or gscore[g] > gscore[best]):
                    best = g
            gkeep[best] = True
    # Candidates: the eligible experts, in id order.
    ks = key
    cids = all_ids
    n_cand = n_exp
    if n_groups > 1:
        n_cand = 0
        for e in range(n_exp):
            if gkeep[e // group_size]:
                ckey[n_cand] = key[e]
                cid[n_cand] = e
                n_cand += 1
        ks = ckey
        cids = cid
    # A floor under the k-th largest key, branch-free: the smallest of the maxima of k disjoint
    # strided subsets (k distinct keys are >= it). Most candidates fall below it and are skipped
    # without touching the sorted top-k; an insertion sort runs on the few that remain.
    for j in range(k):
        submax[j] = -np.inf
    for base in range(0, n_cand - k + 1, k):
        for j in range(k):
            submax[j] = max(submax[j], ks[base + j])
    for c in range(n_cand - n_cand % k, n_cand):
        submax[c % k] = max(submax[c % k], ks[c])
    floor = submax[0]
    for j in range(1, k):
        floor = min(floor, submax[j])
    # Branch-free compaction of the keys at or above the floor (in id order), then each
    # survivor's rank = how many survivors beat it (a larger key, or an equal key and a lower
    # id): O(m^2) compares without a branch, m small; the k lowest ranks are the top-k.
    m_s = 0
    for c in range(n_cand):
        v = ks[c]
        vals_s[m_s] = v
        ids_s[m_s] = cids[c]
        m_s += v >= floor
    for a in range(m_s):
        va = vals_s[a]
        rank = 0
        for b in range(m_s):
            vb = vals_s[b]
            rank += (vb > va) | ((vb == va) & (b < a))
        if rank < k:
            sel[rank] = ids_s[a]
    total = 0.0
    for j in range(k):
        x = row[sel[j]]
        # softmax: exp(x - m), divided by Z below unless renormalized
        w = _exp_neg(x - mf) if scoring == SOFTMAX else _sigmoid(x)
        w_out[j] = w
        total += w
        id_out[j] = sel[j]
    if renormalize:
        if not total > 0.0:
            return False
        scale = 1.0 / total
    elif scoring == SOFTMAX:
        if inv_z == 0.0:  # Z not needed for selection: compute it now
            z = 0.0
            for e in range(n_exp):
                z += _exp_neg(row[e] - mf)
            inv_z = 1.0 / z
        scale = inv_z
    else:
        scale = 1.0
    for j in range(k):
        w_out[j] = np.float32(w_out[j] * scale)
    return True


@numba.njit(inline="always")
def _gate_range(  # pragma: no cover - jitted
    logits,
    k,
    scoring,
    renormalize,
    bias,
    use_bias,
    n_groups,
    topk_groups,
    weights,
    ids,
    ok,
    start,
    stop,
):
    """Gate rows [start, stop) with one set of scratch buffers."""
    key = np.empty(logits.shape[1], np.float32)
    vals = np.empty(k, np.float32)
    sel = np.empty(k, np.int32)
    gscore = np.empty(max(n_groups, 1), np.float32)
    gkeep = np.empty(max(n_groups, 1), np.bool_)
    ckey = np.empty(logits.shape[1], np.float32)
    cid = np.empty(logits.shape[1], np.int32)
    all_ids = np.arange(logits.shape[1]).astype(np.int32)
    submax = np.empty(k, np.float32)
    vals_s = np.empty(logits.shape[1], np.float32)
    ids_s = np.empty(logits.shape[1], np.int32)
    for r in range(start, stop):
        ok[r] = _gate_row(
            logits[r], k, scoring, renormalize, bias, use_bias, n_groups, topk_groups, key,
            vals, sel, gscore, gkeep, ckey, cid, all_ids, submax, vals_s, ids_s, weights[r],
            ids[r],
        )  # fmt: skip


# error_model="numpy": a float division is a plain division, not a branch that raises
# ZeroDivisionError — that check alone keeps LLVM from vectorizing the sigmoid loop (10x).
@numba.njit(cache=True, nogil=True, error_model="numpy")
def _gate_serial(  # pragma: no cover - jitted
    logits, k, scoring, renormalize, bias, use_bias, n_groups, topk_groups, weights, ids, ok
):
    _gate_range(
        logits, k, scoring, renormalize, bias, use_bias, n_groups, topk_groups, weights, ids, ok,
        0, logits.shape[0],
    )  # fmt: skip


@numba.njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _gate_parallel(  # pragma: no cover - jitted
    logits, k, scoring, renormalize, bias, use_bias, n_groups, topk_groups, weights, ids, ok
):
    n_rows = logits.shape[0]
    for task in numba.prange((n_rows + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        _gate_range(
            logits, k, scoring, renormalize, bias, use_bias, n_groups, topk_groups, weights,
            ids, ok, task * _ROWS_PER_TASK, min(n_rows, (task + 1) * _ROWS_PER_TASK),
        )  # fmt: skip


def check_gating_args(
    n_experts: int,
    k: int,
    scoring: str,
    bias_len: int | None,
    n_groups: int | None,
    topk_groups: int | None,
) -> None:
    if scoring not in _SCORING:
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    if not 1 <= k <= n_experts:
        raise ValueError(f"k must be between 1 and the number of experts ({n_experts}), got {k}")
    if bias_len is not None and bias_len != n_experts:
        raise ValueError(f"bias has {bias_len} entries for {n_experts} experts")
    if (n_groups is None) != (topk_groups is None):
        raise ValueError("n_groups and topk_groups go together")
    if n_groups is not None and topk_groups is not None:
        if n_groups < 1 or n_experts % n_groups:
            raise ValueError(f"n_groups={n_groups} must divide the {n_experts} experts")
        if not 1 <= topk_groups <= n_groups:
            raise ValueError(f"topk_groups must be between 1 and n_groups, got {topk_groups}")
        if topk_groups * (n_experts // n_groups) < k:
            raise ValueError(
                f"{topk_groups} groups of {n_experts // n_groups} hold fewer than k={k}"
            )
        if bias_len is not None and n_experts // n_groups < 2:
            raise ValueError("grouped selection with bias scores groups by their top two experts")


def topk_gating(
    logits: Any,
    k: int,
    *,
    scoring: Literal["softmax", "sigmoid"] = "softmax",
    renormalize: bool = True,
    bias: Any = None,
    n_groups: int | None = None,
    topk_groups: int | None = None,
) -> tuple[Any, Any]:
    """Fused scoring + top-k of router logits (T, E) → ``(weights (T, k) float32,
    expert_ids (T, k) int32)``, best expert first. numpy in, numpy out; torch in, torch out.

    Example (softmax, k = 2, renormalize)::

        >>> w, ids = topk_gating(np.array([[1.0, 3.0, 3.0, 0.0]], np.float32), 2)
        >>> ids.tolist(), w.round(3).tolist()        # tie between 1 and 2: lowest id first
        ([[1, 2]], [[0.5, 0.5]])
        >>> w, ids = topk_gating(np.array([[1.0, 3.0, 2.0, 0.0]], np.float32), 2, renormalize=False)
        >>> ids.tolist(), w.round(3).tolist()        # softmax = [.087, .644, .237, .032]
        ([[1, 2]], [[0.644, 0.237]])
    """
    if on_gpu(logits):
        from tandem.kernels.triton_kernels import topk_gating_triton

        return topk_gating_triton(
            logits,
            k,
            scoring=scoring,
            renormalize=renormalize,
            bias=bias,
            n_groups=n_groups,
            topk_groups=topk_groups,
        )
    x = np.ascontiguousarray(as_numpy(logits), dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"logits must be (T, E), got shape {x.shape}")
    n_rows, n_exp = x.shape
    b = None if bias is None else np.ascontiguousarray(as_numpy(bias), dtype=np.float32)
    check_gating_args(n_exp, k, scoring, None if b is None else len(b), n_groups, topk_groups)
    weights = np.empty((n_rows, k), np.float32)
    ids = np.empty((n_rows, k), np.int32)
    ok = np.empty(n_rows, np.bool_)
    if n_rows:
        kernel = _gate_parallel if n_rows >= PARALLEL_MIN_ROWS else _gate_serial
        kernel(
            x,
            k,
            _SCORING[scoring],
            renormalize,
            b if b is not None else np.zeros(1, np.float32),
            b is not None,
            n_groups or 1,
            topk_groups or 1,
            weights,
            ids,
            ok,
        )
        if not ok.all():
            bad = np.flatnonzero(~ok)
            raise ValueError(
                f"gate logits rows {bad[:10].tolist()} hold NaN/+inf (or only -inf under "
                "softmax, or zero total weight): cannot route them"
            )
    return like(weights, logits), like(ids, logits)


def topk_gating_reference(
    logits: Any,
    k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    bias: Any = None,
    n_groups: int | None = None,
    topk_groups: int | None = None,
) -> tuple[Any, Any]:
    """Plain torch: softmax/sigmoid, stable sorts for the selection, gather, renormalise."""
    import torch

    x = torch.as_tensor(logits).float()
    n_rows, n_exp = x.shape
    check_gating_args(n_exp, k, scoring, None if bias is None else len(bias), n_groups, topk_groups)
    bad = torch.isnan(x).any(1) | torch.isposinf(x).any(1)
    if scoring == "softmax":
        bad |= torch.isneginf(x).all(1)
    if bad.any():
        raise ValueError(f"gate logits rows {torch.nonzero(bad)[:10, 0].tolist()} cannot be routed")
    scores = torch.softmax(x, dim=-1) if scoring == "softmax" else torch.sigmoid(x)
    key = x.clone() if bias is None else scores + torch.as_tensor(bias, device=x.device).float()
    if n_groups is not None and topk_groups is not None:
        grouped = key.view(n_rows, n_groups, n_exp // n_groups)
        if bias is None:
            gscore = grouped.max(-1).values
        else:
            gscore = (
                torch.sort(grouped, dim=-1, descending=True, stable=True).values[..., :2].sum(-1)
            )
        keep = torch.sort(gscore, dim=-1, descending=True, stable=True).indices[:, :topk_groups]
        mask = torch.zeros(n_rows, n_groups, dtype=torch.bool, device=x.device).scatter_(
            1, keep, True
        )
        eligible = mask.repeat_interleave(n_exp // n_groups, 1)
    else:
        eligible = torch.ones_like(key, dtype=torch.bool)
    # best key first, ties by lowest id; experts outside the kept groups never come first
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    order = order.gather(
        1, torch.sort((~eligible.gather(1, order)).to(torch.int8), dim=-1, stable=True).indices
    )
    ids = order[:, :k]
    w = scores.gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w, ids.to(torch.int32)
