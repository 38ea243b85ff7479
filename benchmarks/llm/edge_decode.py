"""**edge** — decode tokens/s of ``EdgeRuntime.generate(stream=True)`` (a local-only generation
task, greedy, ``max_tokens`` fixed: 128, or what the model's trained context leaves after the
prompt, 105 for ``sort-edge``; token log-prob and entropy computed for every token, as always) vs llama-cpp-python's ``Llama.create_completion`` on the same GGUF, same ``n_threads``,
``n_ctx`` 512, without log-probs (streamed and not; the faster is the reference), and with
``logprobs=1`` (``logits_all=True``). **EOS is ignored** on every side: the runs use a copy of the
GGUF whose ``eos_token_id`` names ``<pad>`` (which the models never emit) and whose ``<eos>`` is
renamed (llama.cpp treats a token spelled ``<eos>`` as end-of-generation by name), so every call
decodes exactly ``max_tokens`` tokens. Models: ``sort-edge`` q8_0 (0.8M params: Python overhead
dominates) and a random Llama of 25.7M params (H=512, 8 layers, I=1408; q8_0), built with
transformers and :func:`tandem.runtime.gguf.export_gguf` and cached. tok/s = tokens / wall time
of the whole call (the prompt is the same each call, so both sides reuse its KV cache). Goals:
≥ 100% of ``create_completion`` on the small model, ≥ 95% on the larger one.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.llm.harness import N_CTX, Bench, ratio, say, sha
from tandem.reference import lm_task

GOAL_EDGE_SMALL = 1.00  # × create_completion, where Python overhead dominates
GOAL_EDGE_LARGE = 0.95
LARGE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8)
COLUMNS = ["model", "path", "tok/s", "runs", "vs create_completion", "goal"]


def no_eos_copy(src: Path, cache: Path) -> Path:
    """A copy of GGUF ``src`` that never stops at EOS: ``eos_token_id`` names ``<pad>`` and the
    token spelled ``<eos>`` is renamed ``<e0s>`` (llama.cpp ends generation at a token of that
    name whatever the EOS id says). Cached by ``src``'s digest."""
    from gguf import GGUFReader

    from tandem.runtime.tokenizer import EOS, PAD

    out = cache / f"{src.stem}-{sha(src)[:12]}-noeos.gguf"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    part = out.with_suffix(".part")
    shutil.copyfile(src, part)
    reader = GGUFReader(part, "r+")
    eos = reader.get_field("tokenizer.ggml.eos_token_id")
    assert eos is not None and int(eos.parts[eos.data[0]][0]) == EOS
    eos.parts[eos.data[0]][0] = PAD
    tokens = reader.get_field("tokenizer.ggml.tokens")
    assert tokens is not None and bytes(tokens.parts[tokens.data[EOS]]) == b"<eos>"
    tokens.parts[tokens.data[EOS]][:] = np.frombuffer(b"<e0s>", np.uint8)
    del reader, eos, tokens  # flush and unmap before the rename
    os.replace(part, out)
    return out


def large_llama_gguf(cache: Path) -> Path:
    """A random 25.7M-param Llama (:data:`LARGE`, the task's 31-token vocabulary) as q8_0
    GGUF, built once into ``cache``. The pad/bos/eos rows of ``lm_head`` are zero, so a special
    token (logit 0) is never the greedy pick among random logits."""
    out = cache / "llama-25m-q8_0.gguf"
    if out.exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tandem.runtime.gguf import export_gguf
    from tandem.runtime.tokenizer import EOS

    say("building the random 25.7M Llama GGUF (once)")
    tok = lm_task.tokenizer()
    cfg = LlamaConfig(
        vocab_size=tok.n_vocab,
        num_key_value_heads=LARGE["num_attention_heads"],
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=0,
        **LARGE,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight[:3] = 0.0
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        model.save_pretrained(tmp)
        tok.save(Path(tmp))
        export_gguf(tmp, Path(tmp) / "m.gguf", qtype="q8_0")
        os.replace(Path(tmp) / "m.gguf", out)
    return out


def _runs(fns: dict[str, Callable[[], int]], rounds: int, min_s: float) -> dict[str, list[float]]:
    """Tokens/s of each ``fn`` (which returns the tokens it produced) per round: every round
    times every function, in an order rotated each round; a timed run repeats the call until it
    lasts ``min_s``."""
    inner = {}
    for k, fn in fns.items():
        fn()  # warm-up
        t = time.perf_counter()
        fn()
        inner[k] = max(1, math.ceil(min_s / max(time.perf_counter() - t, 1e-6)))
    out: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            fn, tokens = fns[k], 0
            t = time.perf_counter()
            for _ in range(inner[k]):
                tokens += fn()
            out[k].append(tokens / (time.perf_counter() - t))
    return out


def run(b: Bench) -> tuple[dict[str, Any], list[list[Any]]]:
    """Both edge models: every path's tokens/s and its ratio to the faster
    ``create_completion``. Returns the JSON and the table's rows."""
    small = no_eos_copy(b.edge_gguf, b.cache)
    large = no_eos_copy(large_llama_gguf(b.cache), b.cache)
    out: dict[str, Any] = {"models": {}}
    rows = []
    for label, path, goal in (
        ("sort-edge q8_0 (0.8M)", small, GOAL_EDGE_SMALL),
        ("random Llama q8_0 (25.7M)", large, GOAL_EDGE_LARGE),
    ):
        say(f"edge: {label}")
        r = _edge_one(b, path, goal)
        out["models"][label] = r
        for name, v in r["rows"].items():
            rows.append(
                [
                    f"{label}, {r['max_tokens']} tokens"
                    if name == "create_completion(stream=True)"
                    else "",
                    name,
                    f"{v['tokens_per_s']:.0f}",
                    " ".join(f"{x:.0f}" for x in v["runs"]),
                    f"{v['vs_create_completion']:.2f}×",
                    v.get("goal", ""),
                ]
            )
    return out, rows


def _edge_one(b: Bench, path: Path, goal: float) -> dict[str, Any]:
    import llama_cpp

    from tandem.edge import EdgeRuntime
    from tandem.router.policy import policy_from_dict
    from tandem.runtime.backends.llamacpp import LlamaCppBackend
    from tandem.runtime.generation import SamplingParams

    t = b.threads
    prompt = lm_task.held_out(16, 1)[0].prompt
    kw: dict[str, Any] = dict(
        model_path=str(path), n_ctx=N_CTX, n_threads=t, n_threads_batch=t, verbose=False
    )
    raw = llama_cpp.Llama(**kw)
    raw_lp = llama_cpp.Llama(**kw, logits_all=True)
    backend = LlamaCppBackend(path, threads=t, n_ctx=N_CTX)
    # the SDK keeps prompt + answer inside the model's trained context (128 for sort-edge)
    n = min(b.sizes.edge_tokens, backend.n_ctx - len(backend.tokenize(prompt)))

    def task(mode: str) -> dict[str, Any]:
        return {
            "kind": "generate",
            "local": {"path": str(path), "threads": t, "n_ctx": N_CTX},
            "gate": {"metric": "token_min", "threshold": 0.0},
            "mode": mode,
            "max_tokens": n,
        }

    rt = EdgeRuntime(policy_from_dict({"tasks": {m: task(m) for m in ("probe", "midstream")}}))
    params = SamplingParams(max_tokens=n)

    def cc_stream(llm: Any = raw, **extra: Any) -> int:
        chunks = llm.create_completion(prompt, max_tokens=n, temperature=0.0, stream=True, **extra)
        return sum(c["choices"][0]["finish_reason"] is None for c in chunks)

    def cc() -> int:
        out = raw.create_completion(prompt, max_tokens=n, temperature=0.0)
        return out["usage"]["completion_tokens"]

    def sdk(mode: str) -> Callable[[], int]:
        def run() -> int:
            k = 0
            with rt.generate(prompt, mode, max_tokens=n, stream=True) as s:
                for chunk in s:
                    k += len(chunk.tokens)
            return k

        return run

    def direct() -> int:
        return sum(1 for _ in backend.stream(prompt, params))

    fns: dict[str, Callable[[], int]] = {
        "create_completion(stream=True)": cc_stream,
        "create_completion()": cc,
        "create_completion(stream=True, logprobs=1)": lambda: cc_stream(raw_lp, logprobs=1),
        "LlamaCppBackend.stream (no SDK)": direct,
        "EdgeRuntime.generate(stream=True), probe": sdk("probe"),
        "EdgeRuntime.generate(stream=True), midstream": sdk("midstream"),
    }
    # same output on every side (greedy, EOS ignored): the text of one call each
    ref_text = raw.create_completion(prompt, max_tokens=n, temperature=0.0)["choices"][0]["text"]
    sdk_text = rt.generate(prompt, "probe", max_tokens=n).text
    counts = {k: fn() for k, fn in fns.items()}
    try:
        runs = _runs(fns, b.sizes.edge_rounds, b.sizes.edge_run_s)
    finally:
        rt.close()
        backend.close()
        raw.close()
        raw_lp.close()
    med = {k: statistics.median(v) for k, v in runs.items()}
    ref = max(med["create_completion(stream=True)"], med["create_completion()"])
    rows: dict[str, dict[str, Any]] = {}
    for k in fns:
        vs = ratio(med[k], ref)
        row: dict[str, Any] = {
            "tokens_per_s": med[k],
            "runs": runs[k],
            "tokens_per_call": counts[k],
            "vs_create_completion": vs,
        }
        if k.startswith("EdgeRuntime"):
            row["goal"] = "met" if vs >= goal else "NOT met"
        rows[k] = row
    return {
        "model": path.name,
        "max_tokens": n,
        "threads": t,
        "n_ctx": N_CTX,
        "prompt": prompt,
        "reference": "the faster of create_completion(stream=True) and create_completion()",
        "reference_tokens_per_s": ref,
        "goal_ratio": goal,
        "same_text": ref_text == sdk_text,
        "every_call_decoded_max_tokens": all(c == n for c in counts.values()),
        "rows": rows,
    }


def title(b: Bench, data: dict[str, Any]) -> tuple[str, str]:
    """The table's title and its note."""
    z, t = b.sizes, b.threads
    return (
        f"edge decode through the SDK vs llama-cpp-python, greedy, up to {z.edge_tokens} "
        f"tokens (EOS ignored), {t} threads, n_ctx {N_CTX}, median of {z.edge_rounds}",
        f"goal: EdgeRuntime ≥ {GOAL_EDGE_SMALL:.0%} of the faster create_completion on the "
        f"small model, ≥ {GOAL_EDGE_LARGE:.0%} on the 25.7M one",
    )
