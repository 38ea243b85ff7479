"""The LLM path, end to end: each Tandem figure beside its reference, measured in the same run.

``python -m benchmarks.llm.end_to_end [--quick] [--json PATH] [--only SECTION ...] [--threads T]
[--models-dir DIR] [--cache-dir DIR]``

Models: the reference pair from :func:`tandem.reference.lm_models.build_llm_models`
(``sort-edge``: Llama 0.8M, GGUF q8_0; ``sort-cloud``: Mixtral 6.6M, a transformers directory),
built and cached on first use, or the models directory ``--models-dir`` names. Every side runs
``--threads`` threads (default 2). Runs are interleaved and medians reported, so drift in the
machine's load hits both sides alike.

**edge** — decode tokens/s of ``EdgeRuntime.generate(stream=True)`` (a local-only generation
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

**moe** — :func:`benchmarks.llm.moe_decode.moe_decode_table` (transformers eager / grouped_mm /
``"tandem"`` experts, Tandem's fast session and ``TransformersBackend`` stream on a random
Mixtral H=512, 4 layers, 8 experts top-2) plus llama.cpp serving the same Mixtral as GGUF (q8_0
and f16 via ``export_gguf``): ``create_completion(stream=True)`` and Tandem's
``LlamaCppBackend``; tokens after the first over their time, median of ``repeat`` runs (these
rows run after the transformers rows, not interleaved with them). The ratio printed is
Tandem's ``TransformersBackend`` stream over llama.cpp: what a user would otherwise pick on CPU.

**concurrency** — 1, 4 and 8 client threads, each streaming one request after another (closed
loop) for a fixed time, against (a) one Tandem worker process serving ``sort-cloud``
(transformers, fast decode; one shared ``CloudClient``) and (b) ``python -m llama_cpp.server``
serving **the same weights** exported to GGUF **f32** (same precision), ``--n_threads T
--n_threads_batch T --n_ctx 512 --interrupt_requests false`` (requests queue instead of cutting
each other off; it serves one at a time) ``--logits_all false``, with one ``openai`` client per
thread sending ``extra_body={"repeat_penalty": 1.0}``. Why not the GGUF in the worker: a worker
opens a ``gguf`` model with ``parallel=1`` (no manifest or config key sets it), so a second
concurrent stream is refused ``Overloaded``. Prompts: held-out sorting items of the three
longest lengths (answers of that many tokens, then EOS; greedy, so both sides do the same
work). Aggregate tokens/s, inter-token gaps as the client sees them (tokens that arrive in one
message count 0 after the first), time to first token. No goal.

**cascade** — the sorting task's held-out items (``--difficulties``, ``--n`` per difficulty):
exact-match accuracy, escalation rate, end-to-end latency p50/p95 and time to first token p50,
through ``EdgeRuntime.generate(stream=True)`` with the edge GGUF on the device and a worker
process serving ``sort-cloud`` on loopback, for: edge only (no cloud target); cloud only (a tag
rule); each gate — ``token_mean``, ``token_min``, ``token_quantile`` (q 0.1) after a probe of 8
tokens, ``first_entropy`` up front — and mid-stream escalation (``token_min`` over a window of
8). Hand-off ``restart``: an escalated item's answer is the cloud's own answer from the prompt.
Each gate's threshold is calibrated on a **calibration split** (the held-out items after the
test items, same difficulties) with :func:`tandem.router.calibrate.pick_threshold` (the fewest
escalations recovering 80% of the cloud−edge gap there), never on the test items.

*CPT(80%)* (RouteLLM's "calls to the strong model for 80% of its gain"), per gate, on the test
items, offline: one edge-only pass gives every item's token log-probs and first-token entropy
and whether the edge was right; one cloud-only pass whether the cloud was right. Each item's gate
score is computed from the log-probs exactly as the live gate would (probe: the first 8 tokens;
mid-stream: the lowest window score along the answer; up front: 1 − normalised entropy).
Escalating the k least confident items for every k (a threshold sweep,
:func:`~tandem.router.calibrate.routing_curve`) gives accuracy vs escalation rate; CPT(80%) is
the lowest escalation rate whose accuracy recovers ≥ 80% of the gap
(:func:`~tandem.router.calibrate.escalation_for_recovery`). A router that escalates at random
needs 80%. With hand-off ``restart`` and greedy decoding the sweep is exact: the live runs at
the calibrated threshold land on one of its points (the JSON holds both, as a check).

**streaming** — inter-token gaps of the same model (``sort-cloud``), prompt and greedy decode
through a worker (``CloudClient.generate`` on loopback) vs ``backend.stream`` in this process,
requests alternating. Goal: worker ≤ 1.2× in-process, on the median gap and on the mean gap
(each request's mean gap, the median over requests: robust to one stall, unlike a mean over
all gaps, and blind to chunk merging, unlike the median gap). An
extra row (info) runs ``backend.stream`` in this process on a new thread per request, as the
worker runs each stream on a thread of its own: it separates what the wire costs from what
running on another thread costs. It runs after the other two (a thread's OpenMP team slows the
main thread's next parallel region down, which would blur the reference).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import print_table
from tandem.bench.report import json_safe
from tandem.reference import lm_task
from tandem.reference.lm_models import CLOUD, EDGE_GGUF
from tandem.reference.lm_task import SortItem
from tandem.runtime.machine import machine

SECTIONS = ("edge", "moe", "concurrency", "cascade", "streaming")
GOAL_EDGE_SMALL = 1.00  # × create_completion, where Python overhead dominates
GOAL_EDGE_LARGE = 0.95
GOAL_STREAM = 1.2  # worker inter-token gap / in-process
TARGET_RECOVERY = 0.8  # CPT(80%), and the calibration target
PROBE_TOKENS = 8
WINDOW = 8
N_CTX = 512
LARGE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8)


@dataclass(frozen=True)
class Sizes:
    """How much each section runs (default: about 5–8 minutes on 2 idle cores)."""

    edge_tokens: int = 128
    edge_rounds: int = 5
    edge_run_s: float = 0.4  # a timed run repeats the call until it lasts this long
    moe_tokens: int = 128
    moe_repeat: int = 3
    conc_levels: tuple[int, ...] = (1, 4, 8)
    conc_seconds: float = 3.0
    conc_repeat: int = 3
    conc_max_tokens: int = 40
    difficulties: tuple[int, ...] = (4, 8, 12, 16, 24)
    cascade_n: int = 40
    cascade_cal_n: int = 40
    stream_requests: int = 24


QUICK = Sizes(
    edge_tokens=64,
    edge_rounds=3,
    edge_run_s=0.1,
    moe_tokens=32,
    moe_repeat=1,
    conc_seconds=0.8,
    conc_repeat=1,
    difficulties=(4, 12, 24),
    cascade_n=4,
    cascade_cal_n=6,
    stream_requests=6,
)


def say(msg: str) -> None:
    print(f"[llm-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- shared set-up
@dataclass
class Bench:
    """What the sections share: the models, settings, a scratch dir, one worker process."""

    models_dir: Path
    edge_gguf: Path
    cloud_hf: Path
    cache: Path
    tmp: Path
    threads: int
    sizes: Sizes
    _worker: Any = None
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def worker(self) -> Any:
        """A worker process serving ``sort-cloud`` on loopback (started once)."""
        if self._worker is None:
            from tandem.cloud.config import WorkerConfig
            from tandem.cloud.process import WorkerProcess

            cfg = WorkerConfig.model_validate(
                {
                    "bind": "tcp://127.0.0.1:*",
                    "models_dir": str(self.models_dir),
                    "models": [CLOUD],
                    "threads": self.threads,
                }
            )
            log = self._stack.enter_context(open(self.tmp / "worker.log", "wb"))  # noqa: SIM115
            say("starting a worker serving sort-cloud")
            w = WorkerProcess(cfg, startup_timeout_s=300, stderr=log)
            try:
                w.start()
            except Exception:
                raise RuntimeError(f"worker failed: {_tail(self.tmp / 'worker.log')}") from None
            self._stack.callback(w.__exit__, None, None, None)
            self._worker = w
        return self._worker

    def close(self) -> None:
        self._stack.close()


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def no_eos_copy(src: Path, cache: Path) -> Path:
    """A copy of GGUF ``src`` that never stops at EOS: ``eos_token_id`` names ``<pad>`` and the
    token spelled ``<eos>`` is renamed ``<e0s>`` (llama.cpp ends generation at a token of that
    name whatever the EOS id says). Cached by ``src``'s digest."""
    from gguf import GGUFReader

    from tandem.runtime.tokenizer import EOS, PAD

    out = cache / f"{src.stem}-{_sha(src)[:12]}-noeos.gguf"
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


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(b) else math.nan


def _ms(samples: Sequence[float], q: float) -> float:
    a = np.asarray(samples, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(np.percentile(a, q)) if len(a) else math.nan


# ---------------------------------------------------------------------------- 1. edge
def bench_edge(b: Bench) -> tuple[dict[str, Any], list[list[Any]]]:
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
        ratio = _ratio(med[k], ref)
        row: dict[str, Any] = {
            "tokens_per_s": med[k],
            "runs": runs[k],
            "tokens_per_call": counts[k],
            "vs_create_completion": ratio,
        }
        if k.startswith("EdgeRuntime"):
            row["goal"] = "met" if ratio >= goal else "NOT met"
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


# ---------------------------------------------------------------------------- 2. moe
def bench_moe(b: Bench) -> tuple[dict[str, Any], list[list[Any]]]:
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


# ---------------------------------------------------------------------------- 3. concurrency
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def llama_server(
    model: Path,
    threads: int,
    log: Path,
    *,
    n_ctx: int = N_CTX,
    logits_all: bool = False,
    interrupt: bool = False,
    extra: Sequence[str] = (),
) -> Iterator[str]:
    """``python -m llama_cpp.server`` on a free loopback port, its output in ``log`` (a pipe
    nobody reads would fill up and block it); yields its ``/v1`` URL once it answers (any HTTP
    status: with ``--api_key`` an anonymous request gets 401). ``logits_all``: log-probs over
    HTTP; ``interrupt``: a new request interrupts the current stream (the server's default);
    ``extra``: more of the server's arguments."""
    port = _free_port()
    cmd = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port),
        "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx),
        "--interrupt_requests", str(interrupt).lower(), "--logits_all", str(logits_all).lower(),
        "--verbose", "false", *extra,
    ]  # fmt: skip
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {_tail(log)}")
            try:
                _get_json(url + "/models")
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama_cpp.server not up after 120 s: {_tail(log)}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class _Sample:
    tokens: int = 0
    requests: int = 0
    gaps: list[float] = field(default_factory=list)  # s
    ttft: list[float] = field(default_factory=list)  # s
    errors: list[str] = field(default_factory=list)


Request = Callable[[str, _Sample], None]


def _drive(clients: int, seconds: float, prompts: list[str], request: Request) -> dict[str, Any]:
    """``clients`` threads, each sending one request after another until ``seconds`` pass."""
    samples = [_Sample() for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    end_at = [0.0]

    def loop(i: int) -> None:
        s = samples[i]
        start.wait()
        k = i
        while time.perf_counter() < end_at[0]:
            try:
                request(prompts[k % len(prompts)], s)
            except Exception as e:  # counted, shown in the JSON
                s.errors.append(f"{type(e).__name__}: {e}")
                time.sleep(0.05)
            k += clients

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(clients)]
    for th in threads:
        th.start()
    t0 = time.perf_counter()
    end_at[0] = t0 + seconds
    start.wait()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    gaps = [g for s in samples for g in s.gaps]
    ttft = [x for s in samples for x in s.ttft]
    errors = [e for s in samples for e in s.errors]
    return {
        "clients": clients,
        "tokens_per_s": sum(s.tokens for s in samples) / wall,
        "requests": sum(s.requests for s in samples),
        "tokens": sum(s.tokens for s in samples),
        "itl_p50_ms": _ms(gaps, 50) * 1e3,
        "itl_p99_ms": _ms(gaps, 99) * 1e3,
        "ttft_p50_ms": _ms(ttft, 50) * 1e3,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def _tandem_request(client: Any, max_tokens: int) -> Request:
    from tandem.runtime.generation import SamplingParams

    params = SamplingParams(max_tokens=max_tokens)

    def request(prompt: str, s: _Sample) -> None:
        t0 = last = time.perf_counter()
        first = True
        with client.generate(CLOUD, prompt, params, timeout_s=120) as call:
            for chunk in call:
                now = time.perf_counter()
                if first:
                    s.ttft.append(now - t0)
                    s.gaps.extend([0.0] * (len(chunk.tokens) - 1))
                    first = False
                else:
                    s.gaps.append(now - last)
                    s.gaps.extend([0.0] * (len(chunk.tokens) - 1))
                last = now
                s.tokens += len(chunk.tokens)
        s.requests += 1

    return request


def _openai_request(url: str, model: str, max_tokens: int) -> Request:
    import openai

    local = threading.local()

    def request(prompt: str, s: _Sample) -> None:
        if not hasattr(local, "client"):
            local.client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
        t0 = last = time.perf_counter()
        first = True
        stream = local.client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            extra_body={"repeat_penalty": 1.0},
        )
        with stream:
            for chunk in stream:
                if not chunk.choices or chunk.choices[0].finish_reason is not None:
                    continue
                now = time.perf_counter()
                if first:
                    s.ttft.append(now - t0)
                    first = False
                else:
                    s.gaps.append(now - last)
                last = now
                s.tokens += 1
        s.requests += 1

    return request


def bench_concurrency(b: Bench) -> tuple[dict[str, Any], list[list[Any]]]:
    from tandem.runtime.client import CloudClient
    from tandem.runtime.gguf import export_gguf

    z = b.sizes
    longest = lm_task.MAX_LEN  # long answers: the work is mostly decode
    lengths = (longest - 8, longest - 4, longest)
    prompts = [lm_task.held_out(d, 8)[i].prompt for i in range(8) for d in lengths]
    f32 = b.cache / f"cloud-{_sha(next(b.cloud_hf.glob('*.safetensors')))[:12]}-f32.gguf"
    if not f32.exists():
        export_gguf(b.cloud_hf, f32, qtype="f32")
    w = b.worker()
    say("concurrency: starting llama_cpp.server on the same weights (f32 GGUF)")
    data: dict[str, Any] = {
        "tandem": "worker process serving sort-cloud (transformers, fast decode, f32)",
        "reference": f"llama_cpp.server, {f32.name} (the same weights, f32), one request at a time",
        "threads": b.threads,
        "max_tokens": z.conc_max_tokens,
        "seconds": z.conc_seconds,
        "repeat": z.conc_repeat,
        "levels": {},
    }
    rows = []
    with (
        CloudClient(w.endpoint) as client,
        llama_server(f32, b.threads, b.tmp / "llama_server.log") as url,
    ):
        model_id = _get_json(url + "/models")["data"][0]["id"]
        sides = {
            "tandem": _tandem_request(client, z.conc_max_tokens),
            "llama.cpp": _openai_request(url, model_id, z.conc_max_tokens),
        }
        for req in sides.values():  # warm-up: connections, first-call allocations
            for p in prompts[:2]:
                req(p, _Sample())
        for level in z.conc_levels:
            say(f"concurrency: {level} streams")
            got: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
            for _ in range(z.conc_repeat):
                for k, req in sides.items():
                    got[k].append(_drive(level, z.conc_seconds, prompts, req))
            med = {
                k: sorted(v, key=lambda r: r["tokens_per_s"])[len(v) // 2] for k, v in got.items()
            }
            data["levels"][str(level)] = {**med, "runs": got}
            tan, ref = med["tandem"], med["llama.cpp"]
            rows.append(
                [
                    level,
                    f"{tan['tokens_per_s']:.0f}",
                    f"{tan['itl_p50_ms']:.2f}",
                    f"{tan['itl_p99_ms']:.2f}",
                    f"{tan['ttft_p50_ms']:.1f}",
                    f"{ref['tokens_per_s']:.0f}",
                    f"{ref['itl_p50_ms']:.2f}",
                    f"{ref['itl_p99_ms']:.2f}",
                    f"{ref['ttft_p50_ms']:.1f}",
                    f"{_ratio(tan['tokens_per_s'], ref['tokens_per_s']):.2f}×",
                    tan["errors"] + ref["errors"],
                ]
            )
            data["levels"][str(level)]["tokens_per_s_ratio"] = _ratio(
                tan["tokens_per_s"], ref["tokens_per_s"]
            )
    return data, rows


# ---------------------------------------------------------------------------- 4. cascade
@dataclass(frozen=True)
class Gate:
    metric: str
    mode: str

    def policy_gate(self, threshold: float) -> dict[str, Any]:
        return {"metric": self.metric, "threshold": threshold, "quantile": 0.1}


GATES = {
    "token_mean, probe": Gate("token_mean", "probe"),
    "token_min, probe": Gate("token_min", "probe"),
    "token_quantile q0.1, probe": Gate("token_quantile", "probe"),
    "first_entropy, upfront": Gate("first_entropy", "upfront"),
    "token_min, midstream": Gate("token_min", "midstream"),
}


@dataclass
class Answer:
    correct: bool
    escalated: bool
    degraded: bool
    latency_ms: float
    ttft_ms: float
    logprobs: list[float]
    confidence: float | None  # the gate's score (edge-only: normalised first-token entropy)


def _ask(rt: Any, task: str, item: SortItem, tags: frozenset[str] = frozenset()) -> Answer:
    t0 = time.perf_counter()
    with rt.generate(
        item.prompt, task, max_tokens=item.difficulty + 1, tags=tags, stream=True
    ) as s:
        for _ in s:
            pass
    wall = (time.perf_counter() - t0) * 1e3
    r = s.result
    assert r is not None
    return Answer(
        correct=lm_task.score(r.text, item),
        escalated=r.escalated_at is not None,
        degraded=r.degraded,
        latency_ms=wall,
        ttft_ms=r.timings.get("ttft", math.nan),
        logprobs=list(r.logprobs),
        confidence=r.confidence,
    )


def gate_score(gate: Gate, logprobs: Sequence[float], first_entropy: float | None) -> float:
    """The score the live gate would compare with its threshold for an answer whose edge
    tokens have ``logprobs`` (first-token normalised entropy ``first_entropy``), oriented so
    that the item escalates when the score is *below* the threshold (first_entropy: 1 − H)."""
    from tandem.router.policy import TokenGateSpec
    from tandem.router.routing import TokenGate

    g = TokenGate(TokenGateSpec(metric=gate.metric, threshold=0.5, quantile=0.1))
    if gate.metric == "first_entropy":
        return math.nan if first_entropy is None else 1.0 - first_entropy
    if gate.mode == "probe":
        held = list(logprobs[:PROBE_TOKENS])
        return g.score(held) if held else 1.0
    if not logprobs:  # midstream: nothing generated, nothing to doubt
        return math.inf
    return min(g.score(logprobs[max(0, k - WINDOW) : k]) for k in range(1, len(logprobs) + 1))


def _calibrated(gate: Gate, curve: Any) -> float:
    """The policy threshold for ``gate`` from a calibration curve (score oriented as above)."""
    from tandem.router.calibrate import pick_threshold

    t = pick_threshold(curve, TARGET_RECOVERY)
    return float(np.clip(1.0 - t, 0.0, 1.0)) if gate.metric == "first_entropy" else t


def bench_cascade(b: Bench) -> tuple[dict[str, Any], list[list[Any]]]:
    from tandem.edge import EdgeRuntime
    from tandem.router.calibrate import escalation_for_recovery, routing_curve
    from tandem.router.policy import policy_from_dict

    z, t = b.sizes, b.threads
    w = b.worker()
    test, cal = [], []
    for d in z.difficulties:
        items = lm_task.held_out(d, z.cascade_n + z.cascade_cal_n)
        test += items[: z.cascade_n]
        cal += items[z.cascade_n :]
    local = {"path": str(b.edge_gguf), "threads": t, "n_ctx": N_CTX}
    cloud = {"endpoint": w.endpoint, "model": CLOUD}
    base = {
        "edge": {  # no cloud target; its gate (never escalating) records the first entropy
            "kind": "generate",
            "local": local,
            "gate": {"metric": "first_entropy", "threshold": 1.0},
            "mode": "upfront",
        },
        "cloud": {
            "kind": "generate",
            "local": local,
            "cloud": cloud,
            "gate": {"metric": "token_min", "threshold": 0.0},
            "rules": [{"tag": "cloud", "route": "cloud"}],
        },
    }
    to_cloud = frozenset({"cloud"})

    def edge_cloud(rt: Any, items: list[SortItem]) -> tuple[list[Answer], list[Answer]]:
        e, c = [], []
        for it in items:
            e.append(_ask(rt, "edge", it))
            c.append(_ask(rt, "cloud", it, to_cloud))
        return e, c

    def curves(e: list[Answer], c: list[Answer]) -> dict[str, Any]:
        ec = np.array([a.correct for a in e], float)
        cc = np.array([a.correct for a in c], float)
        return {
            name: routing_curve(
                np.array([gate_score(g, a.logprobs, a.confidence) for a in e]), ec, cc
            )
            for name, g in GATES.items()
        }

    with EdgeRuntime(policy_from_dict({"tasks": base})) as rt:
        say(f"cascade: calibrating on {len(cal)} items")
        edge_cloud(rt, cal[:2])  # warm-up
        cal_curves = curves(*edge_cloud(rt, cal))
        thresholds = {name: _calibrated(GATES[name], c) for name, c in cal_curves.items()}
        tasks = {
            name: {
                "kind": "generate",
                "local": local,
                "cloud": cloud,
                "gate": g.policy_gate(thresholds[name]),
                "mode": g.mode,
                "probe_tokens": PROBE_TOKENS,
                "window": WINDOW,
                "handoff": "restart",
            }
            for name, g in GATES.items()
        }
        with EdgeRuntime(policy_from_dict({"tasks": tasks})) as rg:
            say(f"cascade: {len(test)} test items × {len(GATES) + 2} modes")
            for name in GATES:
                _ask(rg, name, cal[0])  # warm-up
            runs: dict[str, list[Answer]] = {k: [] for k in ("edge only", "cloud only", *GATES)}
            for i, it in enumerate(test):
                order = list(runs)
                for name in order[i % len(order) :] + order[: i % len(order)]:
                    if name == "edge only":
                        runs[name].append(_ask(rt, "edge", it))
                    elif name == "cloud only":
                        runs[name].append(_ask(rt, "cloud", it, to_cloud))
                    else:
                        runs[name].append(_ask(rg, name, it))
    test_curves = curves(runs["edge only"], runs["cloud only"])
    edge_acc = float(np.mean([a.correct for a in runs["edge only"]]))
    cloud_acc = float(np.mean([a.correct for a in runs["cloud only"]]))
    data: dict[str, Any] = {
        "difficulties": list(z.difficulties),
        "n_test_per_difficulty": z.cascade_n,
        "n_calibration_per_difficulty": z.cascade_cal_n,
        "probe_tokens": PROBE_TOKENS,
        "window": WINDOW,
        "handoff": "restart",
        "target_recovery": TARGET_RECOVERY,
        "edge_accuracy": edge_acc,
        "cloud_accuracy": cloud_acc,
        "modes": {},
    }
    rows = []
    for name, answers in runs.items():
        m = _mode_stats(answers, test, z.difficulties)
        thr = cpt = ""
        if name in GATES:
            gate, curve = GATES[name], test_curves[name]
            m["threshold"] = thresholds[name]
            # CPT is undefined without a gap to recover
            m["cpt80"] = (
                escalation_for_recovery(curve, TARGET_RECOVERY) if cloud_acc > edge_acc else None
            )
            m.update(_offline_point(gate, thresholds[name], runs["edge only"], runs["cloud only"]))
            thr = f"{thresholds[name]:.3g}"
            cpt = "no gap" if m["cpt80"] is None else f"{m['cpt80']:.0%}"
        data["modes"][name] = m
        rows.append(
            [
                name,
                thr,
                f"{m['accuracy']:.1%}",
                f"{m['escalation_rate']:.0%}",
                f"{m['latency_p50_ms']:.1f}",
                f"{m['latency_p95_ms']:.1f}",
                f"{m['ttft_p50_ms']:.1f}",
                cpt,
            ]
        )
    return data, rows


def _mode_stats(
    answers: list[Answer], items: list[SortItem], difficulties: Sequence[int]
) -> dict[str, Any]:
    by_d = {d: [a.correct for a, it in zip(answers, items, strict=True) if it.difficulty == d]
            for d in difficulties}  # fmt: skip
    return {
        "accuracy": float(np.mean([a.correct for a in answers])),
        "escalation_rate": float(np.mean([a.escalated for a in answers])),
        "degraded": int(sum(a.degraded for a in answers)),
        "latency_p50_ms": _ms([a.latency_ms for a in answers], 50),
        "latency_p95_ms": _ms([a.latency_ms for a in answers], 95),
        "ttft_p50_ms": _ms([a.ttft_ms for a in answers], 50),
        "accuracy_by_difficulty": {str(d): float(np.mean(v)) for d, v in by_d.items()},
    }


def _offline_point(
    gate: Gate, threshold: float, edge: list[Answer], cloud: list[Answer]
) -> dict[str, float]:
    """The sweep's point at ``threshold``: what the live run should give (a check)."""
    s = np.array([gate_score(gate, a.logprobs, a.confidence) for a in edge])
    s = np.where(np.isnan(s), -np.inf, s)
    esc = s < (1.0 - threshold if gate.metric == "first_entropy" else threshold)
    right = [(c if x else e).correct for x, e, c in zip(esc, edge, cloud, strict=True)]
    return {"offline_escalation_rate": float(esc.mean()), "offline_accuracy": float(np.mean(right))}


# ---------------------------------------------------------------------------- 5. streaming
def bench_streaming(b: Bench) -> tuple[dict[str, Any], list[list[Any]]]:
    """Inter-token gaps: in this process (main thread, and a fresh thread per request as the
    worker runs each stream), and through the worker."""
    from tandem.runtime.backends.transformers_lm import TransformersBackend
    from tandem.runtime.client import CloudClient
    from tandem.runtime.generation import SamplingParams

    w = b.worker()
    item = lm_task.held_out(lm_task.MAX_LEN, 1)[0]
    params = SamplingParams(max_tokens=item.difficulty + 1)
    backend = TransformersBackend(b.cloud_hf, name=CLOUD, threads=b.threads)
    backend.warm_up()  # in this (main) thread, as the worker warms its models up

    def local() -> list[float]:
        return [time.perf_counter() for _ in backend.stream(item.prompt, params)]

    def local_thread() -> list[float]:
        out: list[list[float]] = []
        th = threading.Thread(target=lambda: out.append(local()))
        th.start()
        th.join()
        return out[0]

    with CloudClient(w.endpoint) as client:

        def remote() -> list[float]:
            times: list[float] = []
            with client.generate(CLOUD, item.prompt, params, timeout_s=60) as call:
                for chunk in call:
                    times += [time.perf_counter()] * len(chunk.tokens)
            return times

        fns = {
            "in-process backend.stream": local,
            "  same, in a new thread per request (info)": local_thread,
            "worker (CloudClient.generate)": remote,
        }
        gaps: dict[str, list[float]] = {k: [] for k in fns}
        per_token: dict[str, list[float]] = {k: [] for k in fns}  # each request's mean gap
        ttft: dict[str, list[float]] = {k: [] for k in fns}
        tokens: dict[str, set[int]] = {k: set() for k in fns}
        for k in ("in-process backend.stream", "worker (CloudClient.generate)"):
            fns[k]()  # warm-up (the thread row runs last: see below)
        # in-process and worker alternate; the thread row runs after them: a thread's OpenMP
        # team slows the main thread's next parallel region (its first token) down
        plan = [k for k in fns if "thread" not in k] * b.sizes.stream_requests
        plan += [k for k in fns if "thread" in k] * b.sizes.stream_requests
        for k in plan:
            t0 = time.perf_counter()
            times = fns[k]()
            tokens[k].add(len(times))
            ttft[k].append(times[0] - t0 if times else math.nan)
            gaps[k] += list(np.diff(times))
            if len(times) > 1:
                per_token[k].append((times[-1] - times[0]) / (len(times) - 1))
    stats = {
        k: {
            "itl_p50_ms": _ms(v, 50) * 1e3,
            "itl_p99_ms": _ms(v, 99) * 1e3,
            "itl_mean_ms": _ms(per_token[k], 50) * 1e3,  # median over requests
            "ttft_p50_ms": _ms(ttft[k], 50) * 1e3,
            "tokens_per_request": sorted(tokens[k]),
            "gaps": len(v),
        }
        for k, v in gaps.items()
    }
    ref = stats["in-process backend.stream"]
    rows = []
    for k, s in stats.items():
        p50 = _ratio(s["itl_p50_ms"], ref["itl_p50_ms"])
        mean = _ratio(s["itl_mean_ms"], ref["itl_mean_ms"])
        s["ratio_p50"], s["ratio_mean"] = p50, mean
        goal = ""
        if k.startswith("worker"):
            goal = "met" if p50 <= GOAL_STREAM and mean <= GOAL_STREAM else "NOT met"
        rows.append(
            [
                k,
                f"{s['itl_p50_ms']:.3f}",
                f"{s['itl_p99_ms']:.3f}",
                f"{s['itl_mean_ms']:.3f}",
                f"{s['ttft_p50_ms']:.2f}",
                f"{p50:.2f}× / {mean:.2f}×",
                goal,
            ]
        )
    worker = stats["worker (CloudClient.generate)"]
    data = {
        "model": CLOUD,
        "prompt": item.prompt,
        "requests_per_side": b.sizes.stream_requests,
        "threads": b.threads,
        "paths": stats,
        "ratio_p50": worker["ratio_p50"],
        "ratio_mean": worker["ratio_mean"],
        "goal_ratio": GOAL_STREAM,
        "goal_met": worker["ratio_p50"] <= GOAL_STREAM and worker["ratio_mean"] <= GOAL_STREAM,
    }
    return data, rows


# ---------------------------------------------------------------------------- the CLI
TABLES: dict[str, tuple[Callable[[Bench], tuple[dict[str, Any], list[list[Any]]]], list[str]]] = {
    "edge": (bench_edge, ["model", "path", "tok/s", "runs", "vs create_completion", "goal"]),
    "moe": (
        bench_moe,
        ["path", "tok/s", "runs", "vs best transformers", "vs llama.cpp q8_0", "same tokens"],
    ),
    "concurrency": (
        bench_concurrency,
        [
            "streams",
            "Tandem tok/s",
            "ITL p50 ms",
            "ITL p99 ms",
            "TTFT p50 ms",
            "llama.cpp tok/s",
            "ITL p50 ms",
            "ITL p99 ms",
            "TTFT p50 ms",
            "Tandem/llama.cpp",
            "errors",
        ],
    ),
    "cascade": (
        bench_cascade,
        [
            "mode",
            "threshold",
            "accuracy",
            "escalated",
            "p50 ms",
            "p95 ms",
            "TTFT p50 ms",
            "CPT(80%)",
        ],
    ),
    "streaming": (
        bench_streaming,
        [
            "path",
            "ITL p50 ms",
            "ITL p99 ms",
            "ITL mean ms",
            "TTFT p50 ms",
            "ratio p50 / mean",
            "goal",
        ],
    ),
}


def _title(section: str, b: Bench, data: dict[str, Any]) -> tuple[str, str]:
    z, t = b.sizes, b.threads
    if section == "edge":
        return (
            f"edge decode through the SDK vs llama-cpp-python, greedy, up to {z.edge_tokens} "
            f"tokens (EOS ignored), {t} threads, n_ctx {N_CTX}, median of {z.edge_rounds}",
            f"goal: EdgeRuntime ≥ {GOAL_EDGE_SMALL:.0%} of the faster create_completion on the "
            f"small model, ≥ {GOAL_EDGE_LARGE:.0%} on the 25.7M one",
        )
    if section == "moe":
        met = "met" if data["tandem_over_best_transformers"] >= 2 else "NOT met"
        return (
            f"Mixtral H=512 4 layers E=8 k=2 decode, {z.moe_tokens} tokens, batch 1, {t} threads "
            f"(median of {z.moe_repeat}); llama.cpp rows on the same weights as GGUF",
            f"Tandem TransformersBackend stream / llama.cpp q8_0: "
            f"{data['tandem_over_llama_cpp_q8_0']:.2f}×, / f16: "
            f"{data['tandem_over_llama_cpp_f16']:.2f}× (no goal); llm_moe's goal, ≥ 2× the "
            f"faster of eager/grouped_mm: {met}",
        )
    if section == "concurrency":
        return (
            f"concurrent streams: Tandem worker (sort-cloud, transformers f32) vs llama_cpp.server "
            f"(same weights, f32 GGUF), {t} threads each, ≤ {z.conc_max_tokens} tokens per "
            f"request, {z.conc_seconds:g} s per point, median of {z.conc_repeat}",
            "no goal; ITL: gaps between tokens as the client receives them",
        )
    if section == "cascade":
        return (
            f"cascade on held-out sorting items, lengths {list(z.difficulties)}, "
            f"{z.cascade_n} per length (thresholds from {z.cascade_cal_n} per length of a "
            f"calibration split), {t} threads",
            f"edge {data['edge_accuracy']:.1%}, cloud {data['cloud_accuracy']:.1%}; CPT(80%): "
            "escalations needed for 80% of the gap, offline sweep on the test items (random: "
            "80%); probe 8 tokens, midstream window 8, hand-off restart",
        )
    return (
        f"inter-token latency, sort-cloud, one {len(data['prompt'])}-character prompt, "
        f"{z.stream_requests} requests per side, {t} threads",
        f"goal: worker ≤ {GOAL_STREAM}× in-process (p50 and mean)",
    )


def resolve_models(models_dir: Path | None) -> tuple[Path, Path, Path]:
    """(models dir, edge q8_0 GGUF, cloud transformers dir): ``models_dir`` as it is, or the
    default reference build (built now if it is not cached)."""
    from tandem.runtime.manifest import load_manifest

    if models_dir is None:
        from tandem.reference.lm_models import build_llm_models

        models_dir = build_llm_models(progress=say)["dir"]
    m = load_manifest(models_dir)
    return models_dir, models_dir / m.get(EDGE_GGUF).file, models_dir / m.get(CLOUD).file


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes (about 2 minutes)")
    ap.add_argument("--json", default=None, help="write results here (default bench-llm.json)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=None, help="run these only")
    ap.add_argument("--threads", type=int, default=2, help="threads on every side")
    ap.add_argument("--models-dir", type=Path, default=None, help="default: the reference build")
    ap.add_argument("--cache-dir", type=Path, default=None, help="GGUF copies and the 25.7M model")
    ap.add_argument("--difficulties", default=None, help="cascade: comma-separated lengths")
    ap.add_argument("--n", type=int, default=None, help="cascade: test items per length")
    args = ap.parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    sizes = QUICK if args.quick else Sizes()
    if args.difficulties:
        sizes = replace(sizes, difficulties=tuple(int(d) for d in args.difficulties.split(",")))
    if args.n:
        sizes = replace(sizes, cascade_n=args.n, cascade_cal_n=args.n)
    sections = [s for s in SECTIONS if args.only is None or s in args.only]
    if args.cache_dir is None:
        from tandem.reference.models import default_models_dir

        args.cache_dir = default_models_dir().with_name("bench-llm-v1")

    started = time.perf_counter()
    load_before = os.getloadavg()
    models_dir, edge, cloud = resolve_models(args.models_dir)
    results: dict[str, Any] = {}
    failed = False
    with tempfile.TemporaryDirectory(prefix="tandem-bench-llm-") as tmp:
        b = Bench(models_dir, edge, cloud, args.cache_dir, Path(tmp), args.threads, sizes)
        try:
            for section in sections:
                fn, columns = TABLES[section]
                t0 = time.perf_counter()
                try:
                    data, rows = fn(b)
                except Exception as e:
                    failed = True
                    say(f"{section} failed: {type(e).__name__}: {e}")
                    results[section] = {"error": f"{type(e).__name__}: {e}"}
                    continue
                data["seconds"] = time.perf_counter() - t0
                results[section] = data
                title, note = _title(section, b, data)
                print_table(title, columns, rows, note)
        finally:
            b.close()
    load_after = os.getloadavg()
    from rich.console import Console

    Console().print(
        f"load average (1 min) {load_before[0]:.2f} at the start, {load_after[0]:.2f} at the "
        f"end; {time.perf_counter() - started:.0f} s in all"
    )
    out = Path(args.json or "bench-llm.json")
    doc = {
        "benchmark": "llm",
        "machine": machine(),
        "load_average_1min": {"start": load_before[0], "end": load_after[0]},
        "settings": {
            "quick": args.quick,
            "threads": args.threads,
            "models_dir": str(models_dir),
            "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(sizes).items()},
        },
        "results": results,
    }
    out.write_text(json.dumps(json_safe(doc), indent=2) + "\n")
    Console().print(f"results written to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
