"""Cloud MoE decode at batch 1: Tandem's backend vs transformers, same model, same process.

``python -m benchmarks.llm.moe_decode [--tokens 128] [--repeat 3] [--kv-heads 8] [--json PATH]``

| benchmark | reference | goal (CPU, 2 threads) |
|---|---|---|
| Mixtral decode, batch 1, greedy, 128 tokens | faster of transformers' eager / grouped_mm | ≥ 2× tok/s |

The model: random (seeded) Mixtral, H=512, I=1024, 4 layers, 8 experts top-2, 8 attention heads
(8 or 2 kv heads), a 42-token character vocabulary; the prompt is 11 tokens.

transformers is driven the fastest fair way we know: a manual greedy loop calling the model's
forward with a ``DynamicCache`` and taking the argmax of the last logits row (``generate``
adds its logits processors and stopping criteria on top). Tandem's rows: the fast session
(:class:`~tandem.runtime.backends.fast_decode.FastSession`) in the same greedy loop, and the
whole :class:`~tandem.runtime.backends.transformers_lm.TransformersBackend` stream (decode loop
with per-token log-prob, entropy and text). Tokens/s counts the tokens after the first (the
prompt's prefill is not decode); each figure is the median of ``--repeat`` runs, rows
interleaved so that load from other processes hits all alike. The EOS row of the random
model's ``lm_head`` is zeroed so every run decodes the full length.

The weight-bandwidth bound is the bytes of weights one token must read (attention, router, the
top-k experts, one embedding row, ``lm_head``) over the machine's read bandwidth (a 2-thread sum
over 512 MiB, measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import string
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tandem.runtime.machine import machine

CHARS = string.ascii_lowercase + string.digits + " =:"  # 39 characters + 3 specials
PROMPT = "sort:dcba="  # 10 characters, 11 tokens with BOS
MODEL = dict(
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def bench_model(directory: Path, *, kv_heads: int = 8, seed: int = 0, **overrides: Any) -> Path:
    """Write the random benchmark Mixtral (:data:`MODEL`, with ``overrides`` of its config
    keys) and a Tandem char tokenizer to ``directory``."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from tandem.runtime.tokenizer import EOS, CharTokenizer

    tok = CharTokenizer(CHARS)
    cfg = MixtralConfig(
        vocab_size=tok.n_vocab,
        num_key_value_heads=kv_heads,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=0,
        **{**MODEL, **overrides},
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight[EOS] = 0.0  # EOS logit 0: never the argmax of 42 random logits
    model.save_pretrained(directory)
    tok.save(directory)
    return directory


def weight_bytes_per_token(config: Any) -> int:
    """Bytes of fp32 weights a one-token step reads: per layer q, k, v, o, two norms, the
    router and top-k experts (gate, up, down); one embedding row, the final norm, lm_head."""
    h, i = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = config.num_key_value_heads * hd
    attn = 2 * h * h + 2 * h * kv
    moe = config.num_local_experts * h + config.num_experts_per_tok * 3 * h * i
    per_layer = attn + moe + 2 * h
    total = config.num_hidden_layers * per_layer + h + h + config.vocab_size * h
    return 4 * total


def read_bandwidth_gbs(n_bytes: int = 512 << 20, repeat: int = 5) -> float:
    """Best-of ``repeat`` read bandwidth (GB/s) of a torch sum over ``n_bytes`` (all threads)."""
    x = torch.ones(n_bytes // 4)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return n_bytes / best / 1e9


def _transformers_loop(model: Any, prompt: list[int], n: int) -> tuple[list[int], float]:
    """Greedy decode of ``n`` tokens with transformers' forward and a DynamicCache; (tokens,
    seconds for the n - 1 steps after the first token)."""
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True)
        tok = int(out.logits[0, -1].argmax())
        tokens = [tok]
        t0 = time.perf_counter()
        for _ in range(n - 1):
            out = model(input_ids=torch.tensor([[tok]]), cache=out.cache, use_cache=True)
            tok = int(out.logits[0, -1].argmax())
            tokens.append(tok)
        return tokens, time.perf_counter() - t0


def _session_loop(backend: Any, prompt: list[int], n: int) -> tuple[list[int], float]:
    """The same greedy loop on the backend's :class:`LogitsSession`."""
    session = backend.session(len(prompt) + n)
    tok = int(np.argmax(session.prefill(prompt)))
    tokens = [tok]
    t0 = time.perf_counter()
    for _ in range(n - 1):
        tok = int(np.argmax(session.append(tok)))
        tokens.append(tok)
    return tokens, time.perf_counter() - t0


def _stream_loop(backend: Any, n: int) -> tuple[list[int], float]:
    """The backend's whole stream: decode loop, log-prob, entropy and text per token."""
    from tandem.runtime.generation import SamplingParams

    stream = backend.stream(PROMPT, SamplingParams(max_tokens=n))
    tokens = [next(stream).token]
    t0 = time.perf_counter()
    tokens += [step.token for step in stream]
    return tokens, time.perf_counter() - t0


def moe_decode_table(
    *,
    tokens: int = 128,
    repeat: int = 3,
    threads: int = 2,
    kv_heads: int = 8,
    seed: int = 0,
    model_dir: str | Path | None = None,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """One dict per row: ``name``, ``tokens_per_s`` (median), ``runs`` (each run's tokens/s),
    ``speedup`` (vs the faster of transformers' eager and grouped_mm), ``same_tokens`` (greedy
    tokens equal to eager's). The model is written to ``model_dir`` (default a temp dir);
    ``overrides`` change :data:`MODEL`'s keys (e.g. ``hidden_size=128`` for the cloud's
    reference size)."""
    from tandem.runtime.backends.transformers_lm import TransformersBackend

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = bench_model(Path(model_dir or tmp), kv_heads=kv_heads, seed=seed, **overrides)
        hf = TransformersBackend(path, threads=threads, decode="transformers")
        fast = TransformersBackend(path, threads=threads, experts="tandem", decode="fast")
        if fast.decode != "fast":
            raise RuntimeError("the benchmark model did not get the fast decode path")
        prompt = hf.tokenize(PROMPT)

        def on(impl: str) -> Callable[[], tuple[list[int], float]]:
            def run() -> tuple[list[int], float]:
                hf.model.set_experts_implementation(impl)
                return _transformers_loop(hf.model, prompt, tokens)

            return run

        rows: dict[str, Callable[[], tuple[list[int], float]]] = {
            "transformers eager": on("eager"),
            "transformers grouped_mm": on("grouped_mm"),
            'transformers "tandem" experts': on("tandem"),
            "Tandem fast session (greedy loop)": lambda: _session_loop(fast, prompt, tokens),
            "TransformersBackend stream (fast + tandem)": lambda: _stream_loop(fast, tokens),
        }
        runs: dict[str, list[float]] = {k: [] for k in rows}
        seen: dict[str, list[int]] = {}
        for fn in rows.values():  # warm-up: Numba compilation, allocator, caches
            fn()
        for _ in range(repeat):
            for name, fn in rows.items():
                got, seconds = fn()
                seen[name] = got
                runs[name].append((len(got) - 1) / seconds)
    med = {k: statistics.median(v) for k, v in runs.items()}
    best_ref = max(med["transformers eager"], med["transformers grouped_mm"])
    want = seen["transformers eager"]
    return [
        {
            "name": name,
            "tokens_per_s": med[name],
            "runs": runs[name],
            "speedup": med[name] / best_ref,
            "same_tokens": seen[name] == want,
        }
        for name in rows
    ]


def main(argv: list[str] | None = None) -> None:
    import transformers
    from rich.console import Console
    from rich.table import Table
    from transformers import MixtralConfig

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", type=int, default=128, help="tokens decoded per run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row (median)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    ap.add_argument("--kv-heads", type=int, default=8, help="8: MHA; 2: GQA")
    ap.add_argument("--hidden", type=int, default=MODEL["hidden_size"])
    ap.add_argument("--intermediate", type=int, default=MODEL["intermediate_size"])
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()

    model = {**MODEL, "hidden_size": args.hidden, "intermediate_size": args.intermediate}
    rows = moe_decode_table(
        tokens=args.tokens,
        repeat=args.repeat,
        threads=args.threads,
        kv_heads=args.kv_heads,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
    )
    config = MixtralConfig(vocab_size=len(CHARS) + 3, num_key_value_heads=args.kv_heads, **model)
    weights = weight_bytes_per_token(config)
    bw = read_bandwidth_gbs()
    bound = bw * 1e9 / weights
    m = machine()
    goal_met = any(r["speedup"] >= 2.0 for r in rows if r["name"].startswith("TransformersBackend"))
    table = Table(
        title=(
            f"Mixtral H={args.hidden} I={args.intermediate} 4 layers E=8 k=2, "
            f"{args.kv_heads} kv heads: greedy decode of "
            f"{args.tokens} tokens, batch 1, {args.threads} threads (median of {args.repeat})"
        ),
        caption=(
            f"{m['cpu']}, {m['cores']} cores; weights read per token {weights / 2**20:.1f} MiB, "
            f"read bandwidth {bw:.1f} GB/s → bound {bound:.0f} tok/s; goal ≥ 2× the faster of "
            f"eager/grouped_mm: {'met' if goal_met else 'NOT met'}"
        ),
    )
    for c in ("path", "tok/s", "runs", "vs best transformers", "same tokens"):
        table.add_column(c, justify="left" if c == "path" else "right")
    for r in rows:
        table.add_row(
            r["name"],
            f"{r['tokens_per_s']:.0f}",
            " ".join(f"{x:.0f}" for x in r["runs"]),
            f"{r['speedup']:.2f}×",
            "yes" if r["same_tokens"] else "no",
        )
    Console(width=160).print(table)
    if args.json:
        data = {
            "benchmark": "llm_moe",
            "machine": m,
            "config": {**model, "num_key_value_heads": args.kv_heads, "tokens": args.tokens},
            "weight_bytes_per_token": weights,
            "read_bandwidth_gbs": bw,
            "bandwidth_bound_tokens_per_s": bound,
            "goal_met": goal_met,
            "results": rows,
        }
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        Console().print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
