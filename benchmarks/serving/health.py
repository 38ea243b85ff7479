"""``health`` while the worker computes: the socket thread only reads, admits, routes and sends.

``python -m benchmarks.serving.health [--seconds S] [--json PATH]``

One worker process serves a language model (``lm-4k``: the reference cloud model's shape —
a Mixtral, hidden 128, 4 layers, 8 experts top-2, a char vocabulary — with random weights and
a 4,096-token context, so a 2,048-token prompt fits: the reference ``sort-cloud`` holds 128)
and an MoE classifier's experts (``moe``: 8 experts of 1,024 → 4,096 → 1,024, every one
hosted). A client measures ``health`` round trips, one at a time, first with the worker idle
(the reference) and then while other client threads keep it busy:

* ``verify``: a new speculative session after another, each with a 2,048-token prompt
  (its prefill runs on the model's engine in chunks of ``generation.prefill_chunk``);
* ``experts``: one request after another of 1,024 rows split over the 8 experts (on the
  model's offload thread);
* ``stream``: a one-token ``generate`` after another on the same language model (its step
  joins the engine's steps between the prefill's chunks): its latency is printed too.

Goal (issue 17): ``health`` p99 ≤ 5 ms under that load.
"""

from __future__ import annotations

import argparse
import string
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import emit, pct
from tandem.cloud.config import WorkerConfig
from tandem.cloud.process import WorkerProcess
from tandem.reference.models import manifest_entry
from tandem.runtime.client import CloudClient
from tandem.runtime.generation import SamplingParams
from tandem.runtime.manifest import Manifest, ModelEntry, sha256_file, write_manifest
from tandem.runtime.tokenizer import CharTokenizer
from tandem.runtime.wire import Envelope, Kind

GOAL_P99_MS = 5.0
LM, MOE = "lm-4k", "moe"
PROMPT_TOKENS = 2048


def build_models(out: Path) -> Path:
    """The two models (see the module docstring) and their manifest in ``out``."""
    import torch
    import transformers

    from tandem.runtime.moe import MoEClassifier

    tok = CharTokenizer(string.ascii_lowercase + ":= ")
    cfg = transformers.MixtralConfig(
        vocab_size=tok.n_vocab,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(out / LM)
    tok.save(out / LM)
    MoEClassifier(64, 1024, 4096, n_experts=8, k=2, n_classes=10).save(out / "moe.npz")
    lm = ModelEntry(
        name=LM, version="bench-1", file=LM, sha256=sha256_file(out / LM), format="transformers"
    )
    moe = manifest_entry(out, MOE, "moe.npz", version_prefix="bench", fmt="tandem-moe")
    write_manifest(out, Manifest(models=[lm, moe]))
    return out


def health_ms(client: CloudClient, seconds: float) -> np.ndarray:
    """Round trips of ``health``, one after another (a 1 ms pause between), for ``seconds``."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        client.health(timeout_s=10)
        out.append((time.perf_counter() - t0) * 1e3)
        time.sleep(0.001)
    return np.array(out)


def load(endpoint: str, stop: threading.Event, vocab: str) -> dict[str, list[float]]:
    """Start the load threads (see the module docstring); their latencies in ms."""
    rng = np.random.default_rng(0)
    got: dict[str, list[float]] = {"verify": [], "experts": [], "stream": []}

    def verify() -> None:
        with CloudClient(endpoint) as c:
            n = 0
            while not stop.is_set():
                n += 1
                payload = {
                    "model": LM,
                    "session": n.to_bytes(16, "big"),
                    "pos": 0,
                    "tokens": [int(t) for t in rng.integers(3, 29, PROMPT_TOKENS)],
                    "draft": [5, 6, 7],
                    "max_tokens": 4,
                    "vocab": vocab,
                }
                t0 = time.perf_counter()
                c.request(Envelope(kind=Kind.VERIFY, payload=payload), 60.0)
                got["verify"].append((time.perf_counter() - t0) * 1e3)
                c.request(Envelope(kind=Kind.VERIFY, payload={**payload, "end": True}), 60.0)

    def experts() -> None:
        rows = rng.standard_normal((1024, 1024)).astype(np.float32)
        payload = {"model": MOE, "experts": list(range(8)), "counts": [128] * 8, "rows": rows}
        with CloudClient(endpoint) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                c.request(Envelope(kind=Kind.EXPERTS, payload=payload), 60.0)
                got["experts"].append((time.perf_counter() - t0) * 1e3)

    def stream() -> None:
        with CloudClient(endpoint) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                with c.generate(LM, "abc", SamplingParams(max_tokens=1), timeout_s=60) as s:
                    list(s)
                got["stream"].append((time.perf_counter() - t0) * 1e3)

    threads = [threading.Thread(target=f, daemon=True) for f in (verify, experts, stream)]
    for t in threads:
        t.start()
    got["_threads"] = threads  # type: ignore[assignment]
    return got


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="per phase (idle, loaded)")
    ap.add_argument("--threads", type=int, default=2, help="the worker's compute threads")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from tandem.runtime.backends.transformers_lm import TransformersBackend
    from tandem.runtime.speculative import backend_vocab_digest

    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp))
        vocab = backend_vocab_digest(TransformersBackend(models / LM))
        cfg = WorkerConfig.model_validate(
            {
                "bind": "tcp://127.0.0.1:*",
                "models_dir": str(models),
                "models": [LM, MOE],
                "threads": args.threads,
            }
        )
        with WorkerProcess(cfg, startup_timeout_s=300) as w, CloudClient(w.endpoint) as c:
            idle = health_ms(c, args.seconds)
            stop = threading.Event()
            got = load(w.endpoint, stop, vocab)
            time.sleep(1.0)  # every load thread is under way
            busy = health_ms(c, args.seconds)
            stop.set()
            for t in got.pop("_threads"):  # type: ignore[attr-defined]
                t.join(60)
            engine = c.health()["engines"][LM]
    data: dict[str, Any] = {
        "health_idle_ms": pct(idle),
        "health_loaded_ms": pct(busy),
        "health_loaded_max_ms": float(busy.max()),
        **{f"{k}_ms": pct(np.array(v)) for k, v in got.items() if v},
        "engine": engine,
        "goal_p99_ms": GOAL_P99_MS,
        "met": bool(np.percentile(busy, 99) <= GOAL_P99_MS),
    }
    rows: list[list[Any]] = [
        ["health, idle worker", *_cells(idle)],
        ["health, under load", *_cells(busy)],
    ]
    rows += [[f"{k} (the load)", *_cells(np.array(v))] for k, v in got.items() if v]
    emit(
        "health",
        f"health round trips while a worker prefills {PROMPT_TOKENS}-token verify sessions, "
        "runs experts calls and one-token streams; worker threads "
        f"{args.threads}, {args.seconds:g} s per phase",
        ["requests", "n", "p50 ms", "p99 ms", "max ms"],
        rows,
        data,
        args.json,
    )
    p99 = np.percentile(busy, 99)
    print(
        f"goal: health p99 under load ≤ {GOAL_P99_MS} ms: {p99:.2f} ms — "
        f"{'met' if data['met'] else 'NOT met'}"
    )


def _cells(ms: np.ndarray) -> list[Any]:
    p50, p99 = np.percentile(ms, [50, 99])
    return [len(ms), f"{p50:.2f}", f"{p99:.2f}", f"{ms.max():.2f}"]


if __name__ == "__main__":
    main()
