"""MoE kernels and block vs what a user would otherwise run, same process, same run.

``python -m benchmarks.kernels.moe``

| benchmark | reference | goal (CPU, 2 cores) |
|---|---|---|
| MoE block H=512, I=1024, E=8, k=2, fp32 | transformers' Mixtral sparse MoE block, `eager` and `grouped_mm`, same weights | ≤ 1.0× the faster at T=1, ≤ 0.8× at T ≥ 16 |
| topk_gating T=4096, E=64, k=8 | torch softmax + topk + renormalise (grouped sigmoid: torch group top-k) | ≥ 2× |
| moe_align T=4096, E=64, k=8, block 16 | torch argsort-based reference | ≥ 3× |
| permute + combine | torch index_select / index_add_ | ≥ 1.5× |

Each kernel's effective bandwidth (bytes it must touch ÷ time) is printed next to the machine's
copy bandwidth, measured in the same run with a large numpy copy.

The MoE block's experts are autotuned per token bucket (:mod:`tandem.kernels.autotune`): the
"impl" column names the formulation this machine chose, and a second table times each
formulation on its own (Tandem's dispatch/combine kernels, torch's per-expert loop, torch's
grouped_mm) beside transformers' eager and grouped_mm, in interleaved rounds so that the load
of other processes hits all alike. Run it with ``TANDEM_KERNELS=tandem`` or ``=library`` to
force a side everywhere (see the autotune module).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from benchmarks.common import best_of_ms, emit, interleaved_median_s, print_table
from tandem.kernels import (
    autotune,
    combine,
    combine_reference,
    moe_align,
    moe_align_reference,
    permute,
    permute_reference,
    topk_gating,
)
from tandem.runtime import moe as tandem_moe
from tandem.runtime.moe import MoEBlock


def copy_bandwidth_gbs(n_bytes: int = 256 << 20) -> float:
    """The machine's memory bandwidth, read + write of a large numpy copy."""
    src = np.ones(n_bytes // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * n_bytes / best / 1e9


def torch_softmax_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    w, ids = torch.topk(torch.softmax(logits, -1), k, -1)
    return w / w.sum(-1, keepdim=True), ids


def torch_grouped_sigmoid(
    logits: torch.Tensor, bias: torch.Tensor, k: int, n_groups: int, topk_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing as written in plain torch (the usual reference implementation)."""
    scores = torch.sigmoid(logits)
    key = scores + bias
    t, e = key.shape
    gscore = key.view(t, n_groups, -1).topk(2, -1).values.sum(-1)
    gidx = gscore.topk(topk_groups, -1).indices
    mask = torch.zeros_like(gscore).scatter_(1, gidx, 1).repeat_interleave(e // n_groups, 1)
    ids = key.masked_fill(mask == 0, float("-inf")).topk(k, -1).indices
    w = scores.gather(1, ids)
    return w / w.sum(-1, keepdim=True), ids


def interleaved_ms(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median ms per call of each function, timed in alternating rounds (each round runs a
    function enough times to last ~20 ms)."""
    return {k: v * 1e3 for k, v in interleaved_median_s(fns, repeat, 0.02).items()}


def experts_with(block: MoEBlock, impl: str, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The Tandem block's forward on ``x`` with one experts formulation, untuned."""
    fn = tandem_moe.IMPLEMENTATIONS[impl]

    def forward() -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        w, ids = block.route(flat)
        return fn(flat, ids, w, block.gate_up_proj, block.down_proj).reshape(x.shape)

    return forward


def mixtral_blocks(h: int, i: int, e: int, k: int):
    """transformers' Mixtral sparse MoE block, and a Tandem MoEBlock with the same weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=h, intermediate_size=i, num_local_experts=e, num_experts_per_tok=k
    )
    cfg._experts_implementation = "eager"
    ref = MixtralSparseMoeBlock(cfg).eval()
    torch.manual_seed(0)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=h**-0.5)
    ours = MoEBlock(h, i, e, k).eval()
    with torch.no_grad():
        ours.gate.weight.copy_(ref.gate.weight)
        ours.gate_up_proj.copy_(ref.experts.gate_up_proj)
        ours.down_proj.copy_(ref.experts.down_proj)
    return ref, ours, cfg


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", default=None, help="default bench-moe.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    bw = copy_bandwidth_gbs()
    rows, data = [], {"copy_bandwidth_gbs": bw}

    def row(name, ref_ms, ours_ms, goal, bytes_touched, ok, impl="tandem"):
        ratio = ref_ms / ours_ms
        gbs = bytes_touched / (ours_ms / 1e3) / 1e9 if bytes_touched else None
        rows.append(
            [
                name,
                impl,
                ref_ms,
                ours_ms,
                f"{ratio:.2f}×",
                goal,
                "yes" if ok(ratio) else "NO",
                f"{gbs:.1f}" if gbs else "-",
            ]
        )
        data[name] = {
            "implementation": impl,
            "reference_ms": ref_ms,
            "tandem_ms": ours_ms,
            "speedup": ratio,
            "time_ratio": 1 / ratio,
            "goal": goal,
            "tandem_gbs": gbs,
        }

    # MoE block
    h, i, e, k = 512, 1024, 8, 2
    ref, ours, cfg = mixtral_blocks(h, i, e, k)
    weight_bytes = 3 * h * i * 4  # one expert: gate, up, down in fp32
    block_rows = []
    for t in (1, 16, 256, 2048):
        x = torch.randn(1, t, h)
        with torch.no_grad():
            want = ref(x)
            torch.testing.assert_close(ours(x), want, rtol=1e-4, atol=1e-4)  # autotunes T's class
            chosen = next(
                impl
                for shape, impl in autotune.choices()["moe_experts"].items()
                if shape.startswith(tandem_moe.token_class_label(t) + ",")
            )

            def reference(impl: str, x: torch.Tensor = x) -> Callable[[], object]:
                def run() -> object:
                    cfg._experts_implementation = impl
                    return ref(x)

                return run

            fns = {"eager": reference("eager"), "grouped_mm": reference("grouped_mm")}
            fns |= {
                f"block {name}": experts_with(ours, name, x) for name in tandem_moe.IMPLEMENTATIONS
            }
            fns["block autotuned"] = lambda x=x: ours(x)
            times = interleaved_ms(fns, args.repeat)
            cfg._experts_implementation = "eager"
        best_ref = min(times["eager"], times["grouped_mm"])
        mine = times["block autotuned"]
        name = f"MoE block T={t}"
        limit = 1.0 if t == 1 else 1.25  # time ≤ 1.0× (T = 1), ≤ 0.8× (T ≥ 16) of the best
        row(
            name,
            best_ref,
            mine,
            f"≤{1 / limit:.1f}× time",
            min(e, t * k) * weight_bytes,
            lambda r, lim=limit: r >= lim,
            impl=chosen,
        )
        data[name].update({f"{impl}_ms": ms for impl, ms in times.items()})
        block_rows.append(
            [t, *(f"{v:.3g}" for v in times.values()), chosen, f"{mine / best_ref:.2f}×"]
        )
    print_table(
        "MoE block (H=512, I=1024, E=8, k=2, fp32), ms per call: transformers' two "
        "formulations, the Tandem block with each experts formulation, and autotuned",
        ["T", *fns, "chosen", "autotuned ÷ best transformers"],
        block_rows,
        f"interleaved rounds, median of {args.repeat}; load average "
        f"{os.getloadavg()[0]:.1f} (other processes make figures noisy)",
    )
    data["autotune"] = {"choices": autotune.choices(), "timings_us": autotune.timings()}

    # gating
    t, e, k = 4096, 64, 8
    logits = torch.randn(t, e)
    row(
        "topk_gating softmax",
        best_of_ms(lambda: torch_softmax_topk(logits, k), args.repeat),
        best_of_ms(lambda: topk_gating(logits, k), args.repeat),
        "≥2×",
        t * e * 4,
        lambda r: r >= 2,
    )
    bias = torch.randn(e) * 0.1
    row(
        "topk_gating grouped sigmoid",
        best_of_ms(lambda: torch_grouped_sigmoid(logits, bias, k, 8, 4), args.repeat),
        best_of_ms(
            lambda: topk_gating(logits, k, scoring="sigmoid", bias=bias, n_groups=8, topk_groups=4),
            args.repeat,
        ),
        "≥2×",
        t * e * 4,
        lambda r: r >= 2,
    )

    # dispatch
    ids = topk_gating(logits, k)[1]
    row(
        "moe_align",
        best_of_ms(lambda: moe_align_reference(ids, e, 16), args.repeat),
        best_of_ms(lambda: moe_align(ids, e, 16), args.repeat),
        "≥3×",
        t * k * 4 * 3,
        lambda r: r >= 3,
    )
    hidden = torch.randn(t, 512)
    plan = moe_align(ids, e, 16)
    w = torch.rand(t, k)
    y = torch.randn(plan.num_tokens_post_padded, 512)

    def ref_pc():
        permute_reference(hidden, plan)
        combine_reference(y, plan, w)

    def ours_pc():
        permute(hidden, plan)
        combine(y, plan, w)

    row(
        "permute + combine",
        best_of_ms(ref_pc, args.repeat),
        best_of_ms(ours_pc, args.repeat),
        "≥1.5×",
        (t * 512 + 2 * plan.num_tokens_post_padded * 512 + t * 512) * 4,
        lambda r: r >= 1.5,
    )

    emit(
        "moe",
        f"MoE vs torch/transformers (copy bandwidth {bw:.1f} GB/s; block reference = faster "
        "of eager/grouped_mm; gating T=4096 E=64 k=8; grouped: 8 groups keep 4; H=512)",
        ["benchmark", "impl", "ref ms", "ms", "speedup", "goal", "met", "GB/s"],
        rows,
        data,
        args.json,
    )


if __name__ == "__main__":
    main()
