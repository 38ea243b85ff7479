"""**moe** — :func:`benchmarks.llm.moe_decode.moe_decode_table` (transformers eager / grouped_mm /
``"tandem"`` experts, Tandem's fast session and ``TransformersBackend`` stream on a random
Mixtral H=512, 4 layers, 8 experts top-2) plus llama.cpp serving the same Mixtral as GGUF (q8_0
and f16 via ``export_gguf``): ``create_completion(stream=True)`` and Tandem's
``LlamaCppBackend``; tokens after the first over their time, median of ``repeat`` runs (these
rows run after the transformers rows, not interleaved with them). The ratio printed is
Tandem's ``TransformersBackend`` stream over llama.cpp: what a user would otherwise pick on CPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from benchmarks.llm.harness import N_CTX, Bench, say

COLUMNS = ["path", "tok/s", "runs", "vs best transformers", "vs llama.cpp q8_0", "same tokens"]


def run(b: Bench) -> tuple[dict[str, Any], list[list[Any]]]:
    """The MoE decode table, then llama.cpp on the same Mixtral as GGUF (q8_0, f16). Returns the
    JSON and the table's rows."""
    import llama_cpp

    from benchmarks.llm.moe_decode import PROMPT, moe_decode_table
    from tandem.runtime.backends.llamacpp import LlamaCppBackend
    from tandem.runtime.backends.transformers_lm import TransformersBackend
    from tandem.runtime.generation import SamplingParams
    from tandem.runtime.gguf import export_gguf

    n, rep, t = b.sizes.moe_tokens, b.sizes.moe_repeat, b.threads
    d = b.tmp / "moe"
    say(f"moe: llm_moe.moe_decode_table (tokens {n}, repeat {rep})")
    table = moe_decode_table(tokens=n, repeat=rep, threads=t, model_dir=d)
    ref_text = "".join(
        s.text for s in TransformersBackend(d, threads=t).stream(PROMPT, SamplingParams(n))
    )
    say("moe: llama.cpp on the same Mixtral as GGUF")
    llms, backends = {}, {}
    for q in ("q8_0", "f16"):
        path = export_gguf(d, d / f"moe-{q}.gguf", qtype=q)
        llms[q] = llama_cpp.Llama(
            model_path=str(path), n_ctx=N_CTX, n_threads=t, n_threads_batch=t, verbose=False
        )
        backends[q] = LlamaCppBackend(path, threads=t, n_ctx=N_CTX)

    def cc(q: str) -> Callable[[], tuple[str, int, float]]:
        def run() -> tuple[str, int, float]:
            chunks = llms[q].create_completion(PROMPT, max_tokens=n, temperature=0.0, stream=True)
            text = [next(chunks)["choices"][0]["text"]]
            t0 = time.perf_counter()
            k = 1
            for c in chunks:
                if c["choices"][0]["finish_reason"] is None:
                    k += 1
                    text.append(c["choices"][0]["text"])
            return "".join(text), k, time.perf_counter() - t0

        return run

    def tandem_gguf(q: str) -> Callable[[], tuple[str, int, float]]:
        def run() -> tuple[str, int, float]:
            stream = backends[q].stream(PROMPT, SamplingParams(max_tokens=n))
            text = [next(stream).text]
            t0 = time.perf_counter()
            text += [s.text for s in stream]
            return "".join(text), len(text), time.perf_counter() - t0

        return run

    fns = {
        "llama.cpp create_completion, q8_0": cc("q8_0"),
        "llama.cpp create_completion, f16": cc("f16"),
        "Tandem LlamaCppBackend stream, q8_0": tandem_gguf("q8_0"),
    }
    runs: dict[str, list[float]] = {k: [] for k in fns}
    texts, counts = {}, {}
    for fn in fns.values():
        fn()
    for _ in range(rep):
        for k, fn in fns.items():
            texts[k], counts[k], sec = fn()
            runs[k].append((counts[k] - 1) / sec)
    for llm in llms.values():
        llm.close()
    for be in backends.values():
        be.close()
    best = max(
        r["tokens_per_s"]
        for r in table
        if r["name"].startswith("transformers ") and "tandem" not in r["name"]
    )
    cpp = {k: statistics.median(v) for k, v in runs.items()}
    q8 = cpp["llama.cpp create_completion, q8_0"]
    ours = next(r for r in table if r["name"].startswith("TransformersBackend"))
    rows_out = [{**r, "vs_llama_cpp_q8_0": r["tokens_per_s"] / q8, "tokens": n} for r in table] + [
        {
            "name": k,
            "tokens_per_s": cpp[k],
            "runs": runs[k],
            "speedup": cpp[k] / best,
            "vs_llama_cpp_q8_0": cpp[k] / q8,
            "same_tokens": texts[k] == ref_text,
            "tokens": counts[k],
        }
        for k in fns
    ]
    rows = [
        [
            r["name"],
            f"{r['tokens_per_s']:.0f}",
            " ".join(f"{x:.0f}" for x in r["runs"]),
            f"{r['speedup']:.2f}×",
            f"{r['vs_llama_cpp_q8_0']:.2f}×",
            "yes" if r["same_tokens"] else "no",
        ]
        for r in rows_out
    ]
    data = {
        "tokens": n,
        "repeat": rep,
        "threads": t,
        "rows": rows_out,
        "tandem_over_llama_cpp_q8_0": ours["tokens_per_s"] / q8,
        "tandem_over_llama_cpp_f16": ours["tokens_per_s"] / cpp["llama.cpp create_completion, f16"],
        "tandem_over_best_transformers": ours["speedup"],
    }
    return data, rows


def title(b: Bench, data: dict[str, Any]) -> tuple[str, str]:
    """The table's title and its note."""
    z, t = b.sizes, b.threads
    met = "met" if data["tandem_over_best_transformers"] >= 2 else "NOT met"
    return (
        f"Mixtral H=512 4 layers E=8 k=2 decode, {z.moe_tokens} tokens, batch 1, {t} threads "
        f"(median of {z.moe_repeat}); llama.cpp rows on the same weights as GGUF",
        f"Tandem TransformersBackend stream / llama.cpp q8_0: "
        f"{data['tandem_over_llama_cpp_q8_0']:.2f}×, / f16: "
        f"{data['tandem_over_llama_cpp_f16']:.2f}× (no goal); llm_moe's goal, ≥ 2× the "
        f"faster of eager/grouped_mm: {met}",
    )
