"""**gguf memory** — resident memory of the ``gguf`` backend with ``parallel`` 1 and 8: one
model and one llama.cpp context holding every sequence. Goal: RSS at most :data:`GOAL` × (one
copy of the weights + the KV cache of every sequence), once the process's fixed cost is set
aside: what ``parallel: 1`` holds beyond its weights and KV cache (llama.cpp's code pages and
compute buffer, Python's tables; ~85 MiB here, whatever ``parallel`` is). The raw ratio is
printed too. The reference beside it is the pool the backend used before: ``parallel``
separate ``llama_cpp.Llama`` objects (each maps the weights and holds its own KV cache and
compute buffer).

Each case runs in a fresh process: RSS after the imports, then after loading, warming up and
filling **every** sequence to its full context (random tokens, in batches: every KV cell
written, every buffer touched). Reported: the growth of RSS (and of its peak, VmHWM) over the
imports. Model: the random 25.7M-param Llama (q8_0, 26 MiB, trained context 1024) that
``benchmarks/llm/edge_decode.py`` builds and caches, or ``--model``.

    python -m benchmarks.llm.gguf_memory [--model M.gguf] [--parallel 8] [--n-ctx 0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

GOAL = 1.3  # × (weights + KV cache of every sequence)
MIB = 1 << 20


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process, bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _child(model: Path, parallel: int, n_ctx: int, pool: bool) -> dict[str, Any]:
    """Load ``model`` with ``parallel`` sequences (``pool``: as ``parallel`` ``Llama``
    objects), fill every sequence, and measure."""
    import llama_cpp
    import numpy as np

    from tandem.runtime.backends.llamacpp import LlamaCppBackend

    base, _ = _rss()
    if pool:
        first = llama_cpp.Llama(str(model), n_ctx=n_ctx, n_threads=1, verbose=False)
        n = min(n_ctx or first.n_ctx(), llama_cpp.llama_model_n_ctx_train(first.model))
        llms = [first] + [
            llama_cpp.Llama(str(model), n_ctx=n, n_threads=1, verbose=False)
            for _ in range(parallel - 1)
        ]
        handle, n_vocab = first.model, first.n_vocab()
    else:
        backend = LlamaCppBackend(model, threads=1, n_ctx=n_ctx, parallel=parallel)
        n, n_vocab, handle = backend.n_ctx, backend.n_vocab, backend._model.model
    heads = llama_cpp.llama_model_n_head(handle)
    kv_width = llama_cpp.llama_model_n_embd(handle) * llama_cpp.llama_model_n_head_kv(handle)
    cell = llama_cpp.llama_model_n_layer(handle) * 2 * (kv_width // heads) * 2  # f16 K and V
    fill = np.random.default_rng(0).integers(3, n_vocab, size=(parallel, n - 1)).tolist()
    if pool:
        for llm, tokens in zip(llms, fill, strict=True):
            llm.eval(tokens)
    else:
        backend.warm_up()
        leases = [backend.lease() for _ in range(parallel)]
        for s in leases:
            s.truncate(0)
        for start in range(0, n - 1, 256):
            work = [(s, t[start : start + 256], 0) for s, t in zip(leases, fill, strict=True)]
            backend.run_batch(work)
        assert all(len(s.cached_tokens) == n - 1 for s in leases)
    rss, peak = _rss()
    return {
        "parallel": parallel,
        "pool": pool,
        "n_ctx": n,
        "weights": model.stat().st_size,
        "kv": parallel * n * cell,
        "rss": rss - base,
        "peak": peak - base,
    }


def _measure(model: Path, parallel: int, n_ctx: int, pool: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.llm.gguf_memory", "--child", str(model)]
    cmd += ["--parallel", str(parallel), "--n-ctx", str(n_ctx)] + (["--pool"] if pool else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="a GGUF (default: the 25.7M Llama)")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--n-ctx", type=int, default=0, help="tokens a sequence (0: trained)")
    ap.add_argument("--json", default=None, help="write results here (bench-gguf-memory.json)")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pool", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(args.child, args.parallel, args.n_ctx, args.pool)))
        return 0

    from benchmarks.common import emit

    model = args.model
    if model is None:
        from benchmarks.llm.edge_decode import large_llama_gguf
        from tandem.reference.models import default_models_dir

        model = large_llama_gguf(default_models_dir().with_name("bench-llm-v1"))
    cases = [(1, False), (args.parallel, False), (args.parallel, True)]
    results = [_measure(model, p, args.n_ctx, pool) for p, pool in cases]
    fixed = results[0]["rss"] - results[0]["weights"] - results[0]["kv"]
    rows = []
    for r in results:
        need = r["weights"] + r["kv"]
        rows.append(
            [
                f"{r['parallel']} Llama objects (before)" if r["pool"] else "one context",
                r["parallel"],
                r["n_ctx"],
                round(r["weights"] / MIB, 1),
                round(r["kv"] / MIB, 1),
                round(r["rss"] / MIB, 1),
                round(r["peak"] / MIB, 1),
                round(r["rss"] / need, 2),
                round((r["rss"] - fixed) / need, 2),
                "" if r["pool"] else ("ok" if r["rss"] - fixed <= GOAL * need else "OVER"),
            ]
        )
    columns = ["backend", "parallel", "n_ctx", "weights MiB", "KV MiB", "RSS MiB", "peak MiB"]
    columns += ["RSS / (weights + KV)", "(RSS − fixed) / (weights + KV)", f"≤ {GOAL}"]
    emit(
        "gguf-memory",
        f"gguf backend memory, {model.name}: growth of RSS over the imports, every sequence "
        f"full; fixed cost (parallel 1 beyond weights and KV) {fixed / MIB:.0f} MiB",
        columns,
        rows,
        {"model": str(model), "goal": GOAL, "fixed": fixed, "cases": results},
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
