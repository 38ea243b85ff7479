"""Tandem's Triton kernels on a real GPU against the best plain-torch formulation, same device,
same inputs, in one run: confidence statistics, top-k softmax gating, the MoE dispatch
(align + permute + combine), and gating + plan in one fused launch at small T (``route``)
against the same two steps launched apart. Also checks each against its torch reference first (a benchmark
of a wrong kernel is worthless).

    python -m benchmarks.kernels.gpu [--json PATH]

Times are medians from ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs).
Needs a CUDA device; on a CPU-only machine it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tandem.kernels import combine, confidence, moe_align, permute, route, topk_gating
from tandem.runtime.machine import machine


def _t(a) -> torch.Tensor:
    return torch.as_tensor(a).cpu()


def _confidence_torch(x: torch.Tensor):
    p = torch.softmax(x.float(), dim=-1)
    top2 = torch.topk(p, 2, dim=-1)
    logp = torch.log_softmax(x.float(), dim=-1)
    entropy = -(p * logp).sum(-1)
    return top2.indices[:, 0], top2.values[:, 0], top2.values[:, 0] - top2.values[:, 1], entropy


def _gating_torch(logits: torch.Tensor, k: int):
    p = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(p, k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids.int()


def _dispatch_torch(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor):
    """The usual torch MoE dispatch: argsort the flat ids, gather, (experts would run here),
    scatter-add back with the weights."""
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    xp = x.index_select(0, order // ids.shape[1])
    out = torch.zeros_like(x)
    out.index_add_(0, order // ids.shape[1], xp * w.reshape(-1)[order, None])
    return out


def _dispatch_tandem(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, n_experts: int):
    plan = moe_align(ids, n_experts, 16)
    return combine(permute(x, plan), plan, w)


def run(dev: str = "cuda") -> list[dict]:
    from triton.testing import do_bench

    g = torch.Generator(device=dev).manual_seed(0)
    rows: list[dict] = []

    def add(op: str, shape: str, ours, ref) -> None:
        t_ours, t_ref = do_bench(ours), do_bench(ref)
        rows.append(
            {
                "op": op,
                "shape": shape,
                "tandem_us": t_ours * 1e3,
                "torch_us": t_ref * 1e3,
                "speedup": t_ref / t_ours,
            }
        )

    for n, c in ((64, 32000), (4096, 10), (4096, 1000)):
        x = torch.randn(n, c, device=dev, generator=g)
        s, r = confidence(x), _confidence_torch(x)
        assert torch.equal(_t(s.top1).long(), _t(r[0]).long()), "confidence top1 differs"
        assert torch.allclose(_t(s.max_prob).float(), _t(r[1]), atol=1e-5)
        assert torch.allclose(_t(s.entropy).float(), _t(r[3]), atol=1e-3)
        add(
            "confidence",
            f"N={n} C={c}",
            lambda x=x: confidence(x),
            lambda x=x: _confidence_torch(x),
        )
    for t, e, k in ((1, 8, 2), (4096, 64, 8), (16384, 128, 8)):
        logits = torch.randn(t, e, device=dev, generator=g)
        w, ids = topk_gating(logits, k)
        rw, rids = _gating_torch(logits, k)
        assert torch.allclose(_t(w), _t(rw), atol=1e-5), "gating weights differ"
        assert torch.equal(_t(ids).long(), _t(rids).long()), "gating ids differ"
        add(
            "topk_gating",
            f"T={t} E={e} k={k}",
            lambda a=logits, k=k: topk_gating(a, k),
            lambda a=logits, k=k: _gating_torch(a, k),
        )
    for t, h, e, k in ((16, 4096, 8, 2), (4096, 4096, 64, 8)):
        x = torch.randn(t, h, device=dev, generator=g)
        w, ids = topk_gating(torch.randn(t, e, device=dev, generator=g), k)
        ours, ref = _dispatch_tandem(x, ids, w, e), _dispatch_torch(x, ids, w)
        assert torch.allclose(_t(ours), _t(ref), atol=1e-3, rtol=1e-3), "dispatch differs"
        add(
            "align+permute+combine",
            f"T={t} H={h} E={e} k={k}",
            lambda x=x, ids=ids, w=w, e=e: _dispatch_tandem(x, ids, w, e),
            lambda x=x, ids=ids, w=w: _dispatch_torch(x, ids, w),
        )
    for t, e, k in ((1, 8, 2), (16, 64, 8), (64, 128, 8)):
        logits = torch.randn(t, e, device=dev, generator=g)
        w, ids, plan = route(logits, k, 16)
        want = moe_align(topk_gating(logits, k)[1], e, 16)
        assert (plan.sorted_token_ids == want.sorted_token_ids).all(), "fused plan differs"
        add(
            "route (fused) vs gating+align",
            f"T={t} E={e} k={k}",
            lambda a=logits, k=k: route(a, k, 16),
            lambda a=logits, k=k, e=e: moe_align(topk_gating(a, k)[1], e, 16),
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark runs Triton kernels on a GPU", file=sys.stderr)
        return 2
    rows = run()
    m = machine()
    print(f"host: {m['cpu']}, {m['cores']} cores")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'op':24} {'shape':24} {'tandem µs':>10} {'torch µs':>10} {'ratio':>7}")
    for r in rows:
        print(
            f"{r['op']:24} {r['shape']:24} {r['tandem_us']:10.1f} {r['torch_us']:10.1f} "
            f"{r['speedup']:6.2f}×"
        )
    if args.json:
        doc = {"device": torch.cuda.get_device_name(), "machine": m, "rows": rows}
        args.json.write_text(json.dumps(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
