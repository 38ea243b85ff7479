"""Speculative decoding across the network: ``python -m benchmarks.llm.spec_network``.

The edge (``EdgeRuntime``, its draft model a GGUF on llama.cpp) and a worker process (the cloud
model) on this machine, with 0, 5 and 20 ms of round-trip delay added by a loopback relay
(:mod:`tandem.bench.netem`; 0 ms is a direct connection). On the long sorting task (32–40
letters: answers of 32–40 tokens, :func:`~tandem.reference.spec_models.spec_items`), in
the same run and on the same worker:

* **cloud only** — the policy escalates every answer and the cloud streams it (``generate``):
  the reference;
* **speculative, γ = 2, 4, 8 and adaptive** — the same answers drafted on the edge and verified
  by the worker (``mode: speculative``).

Per row: output tokens per second (tokens / wall time from call to answer, all answers), the
ratio to cloud only, the draft acceptance rate, verify round trips per output token, the mean
γ and the answers that fell back to a plain stream. Greedy answers must be identical to cloud
only's (checked). Goals: ≥ 1.5× cloud only at 0 ms; adaptive never slower than cloud only at
20 ms. Then the acceptance of the edge model fine-tuned on the cloud's answers
(``spec-edge-distilled``), and speculative decoding on one host (a GGUF draft inside
llama-cpp-python, :mod:`benchmarks.llm.spec_local`).

Both sides get one thread each (edge llama.cpp, worker torch): they share this machine's
cores, which on a robot and a server they would not.
"""

from __future__ import annotations

import os

# before torch or Numba start OpenMP (imported lazily below): idle OpenMP threads of this
# process must not spin on the cores the worker needs (the worker's CLI does the same)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import print_table
from tandem.bench.report import json_safe
from tandem.runtime.machine import machine

GOAL_0MS = 1.5
RTTS = (0.0, 5.0, 20.0)
GAMMAS = (2, 4, 8)
MAX_TOKENS = 48  # answers are 32–40 tokens and EOS


def say(msg: str) -> None:
    print(f"[speculative] {msg}", flush=True)


def resolve_models(models_dir: Path | None) -> Path:
    """The speculative reference models' directory (built and cached on first use)."""
    if models_dir is not None:
        return models_dir
    from tandem.reference.spec_models import build_spec_models

    return Path(build_spec_models(say=say))


def policy(models: Path, endpoint: str, cloud: str, draft: str, gamma: int | str | None) -> dict:
    """An edge policy whose answers all go to the cloud (tag ``critical``): streamed when
    ``gamma`` is None, else drafted by ``draft`` and verified."""
    from tandem.runtime.manifest import load_manifest

    entry = load_manifest(models).get(draft)
    task: dict[str, Any] = {
        "kind": "generate",
        "local": {"path": str(models / entry.file), "format": "gguf", "threads": 1, "parallel": 1},
        "cloud": {"endpoint": endpoint, "model": cloud},
        "gate": {"metric": "token_min", "threshold": 0.5},
        "rules": [{"tag": "critical", "route": "cloud"}],
        "max_tokens": MAX_TOKENS,
        "deadline_ms": 60_000,
        "first_token_ms": 30_000,
    }
    if gamma is not None:
        task.update(mode="speculative", speculative={"gamma": gamma})
    return {"tasks": {"sort": task}}


def answer_all(runtimes: dict[str, Any], prompts: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Every prompt once through every runtime, escalated, interleaved answer by answer (drift
    in the machine's load hits every row alike); per runtime the totals a row is made of."""
    acc = {
        name: {"tokens": 0, "rounds": 0, "drafted": 0, "accepted": 0, "fallbacks": 0,
               "gammas": [], "wall": 0.0, "texts": []}
        for name in runtimes
    }  # fmt: skip
    for p in prompts:
        for name, rt in runtimes.items():
            a = acc[name]
            t0 = time.perf_counter()
            r = rt.generate(p, task="sort", tags={"critical"})
            a["wall"] += time.perf_counter() - t0
            if r.degraded:
                raise RuntimeError(f"{name}: an answer was degraded ({r.reason}): void run")
            a["tokens"] += len(r.tokens)
            a["texts"].append(r.text)
            s = r.speculation
            if s is None:  # streamed: one request
                a["rounds"] += 1
                continue
            a["rounds"] += s["rounds"] + int(s["fallback"])
            a["drafted"] += s["drafted"]
            a["accepted"] += s["accepted"]
            a["fallbacks"] += int(s["fallback"])
            a["gammas"] += s["gammas"]
    return {
        name: {
            "tok_s": a["tokens"] / a["wall"],
            "tokens": a["tokens"],
            "round_trips_per_token": a["rounds"] / max(a["tokens"], 1),
            "acceptance": a["accepted"] / a["drafted"] if a["drafted"] else None,
            "gamma_mean": statistics.fmean(a["gammas"]) if a["gammas"] else None,
            "fallbacks": a["fallbacks"],
            "texts": a["texts"],
        }
        for name, a in acc.items()
    }


@contextmanager
def link(endpoint: str, rtt_ms: float) -> Iterator[str]:
    """``endpoint`` itself at 0 ms, else a relay adding ``rtt_ms / 2`` each way."""
    if rtt_ms == 0:
        yield endpoint
        return
    from tandem.bench.netem import custom, start_relay

    with start_relay(endpoint, custom(delay_ms=rtt_ms / 2)) as relay:
        yield relay.endpoint


CLOUD_ONLY = "cloud only (stream)"


def configs(edge: str, distilled: str | None) -> list[tuple[str, str, int | str | None]]:
    """(row, draft model, γ) of each row; γ None: the cloud streams the answer."""
    rows: list[tuple[str, str, int | str | None]] = [(CLOUD_ONLY, edge, None)]
    rows += [(f"speculative γ={g}", edge, g) for g in GAMMAS]
    rows.append(("speculative adaptive", edge, "auto"))
    if distilled:
        rows.append(("adaptive, distilled edge", distilled, "auto"))
    return rows


def network(
    models: Path,
    cloud: str,
    rows_wanted: list[tuple[str, str, int | str | None]],
    prompts: list[str],
    warm: list[str],
    rtts: Sequence[float],
    repeat: int,
) -> list[dict[str, Any]]:
    """The rows of the network table for one cloud model (see the module docstring)."""
    from tandem.cloud.config import WorkerConfig
    from tandem.cloud.process import WorkerProcess
    from tandem.edge import EdgeRuntime
    from tandem.router.policy import policy_from_dict

    cfg = WorkerConfig.model_validate(
        {"bind": "tcp://127.0.0.1:*", "models_dir": str(models), "models": [cloud], "threads": 1}
    )
    rows: list[dict[str, Any]] = []
    with WorkerProcess(cfg) as worker:
        for rtt in rtts:
            with link(worker.endpoint, rtt) as endpoint:
                runtimes = {
                    name: EdgeRuntime(
                        policy_from_dict(policy(models, endpoint, cloud, draft, gamma))
                    )
                    for name, draft, gamma in rows_wanted
                }
                try:
                    answer_all(runtimes, warm)  # warm-up; the adaptive ones learn here
                    runs: dict[str, list[dict]] = {name: [] for name in runtimes}
                    for _ in range(repeat):
                        for name, got in answer_all(runtimes, prompts).items():
                            runs[name].append(got)
                finally:
                    for rt in runtimes.values():
                        rt.close()
            ref = runs[CLOUD_ONLY]
            base = statistics.median(r["tok_s"] for r in ref)
            for name, got in runs.items():
                tok_s = statistics.median(r["tok_s"] for r in got)
                same = all(g["texts"] == ref[0]["texts"] for g in got)
                rows.append(
                    {
                        "cloud": cloud,
                        "rtt_ms": rtt,
                        "row": name,
                        "tok_s": tok_s,
                        "ratio": tok_s / base,
                        "identical": same,
                        **{k: v for k, v in got[-1].items() if k not in ("tok_s", "texts")},
                        "tok_s_runs": [r["tok_s"] for r in got],
                    }
                )
                say(f"{cloud} {rtt:g} ms {name}: {tok_s:.0f} tok/s ({tok_s / base:.2f}×)")
                if not same:
                    raise AssertionError(f"{name}: greedy answers differ from cloud only's")
    return rows


def _fmt(v: Any, spec: str) -> str:
    return "—" if v is None or v != v else format(v, spec)  # None and NaN


def print_network(rows: list[dict[str, Any]], edge: str, n: int, repeat: int) -> None:
    for cloud in dict.fromkeys(r["cloud"] for r in rows):
        print_table(
            f"speculative decoding across the network: cloud {cloud}, edge {edge}",
            [
                "RTT added",
                "row",
                "tok/s",
                "× cloud only",
                "accepted",
                "round trips/token",
                "mean γ",
                "fell back",
            ],
            [
                [
                    f"{r['rtt_ms']:g} ms",
                    r["row"],
                    f"{r['tok_s']:.0f}",
                    f"{r['ratio']:.2f}×",
                    _fmt(r["acceptance"], ".0%"),
                    f"{r['round_trips_per_token']:.2f}",
                    _fmt(r["gamma_mean"], ".1f"),
                    r["fallbacks"],
                ]
                for r in rows
                if r["cloud"] == cloud
            ],
            f"{n} answers of 32–40 tokens per run, each by every row in turn, greedy, median of "
            f"{repeat} runs; "
            f"1 thread each side; goals: ≥ {GOAL_0MS}× at 0 ms, adaptive ≥ 1.0× at 20 ms",
        )


def goals(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for cloud in dict.fromkeys(r["cloud"] for r in rows):
        mine = [r for r in rows if r["cloud"] == cloud]
        best0 = max(
            (r for r in mine if r["rtt_ms"] == 0 and r["row"] != CLOUD_ONLY),
            key=lambda r: r["ratio"],
            default=None,
        )
        if best0 is not None:
            ok = best0["ratio"] >= GOAL_0MS
            out.append(
                f"{cloud}: best at 0 ms {best0['row']} {best0['ratio']:.2f}× "
                f"(goal ≥ {GOAL_0MS}×: {'met' if ok else 'NOT met'})"
            )
        for r in mine:
            if r["rtt_ms"] == 20 and r["row"] == "speculative adaptive":
                ok = r["ratio"] >= 1.0
                out.append(
                    f"{cloud}: adaptive at 20 ms {r['ratio']:.2f}× "
                    f"(goal ≥ 1.0×: {'met' if ok else 'NOT met'})"
                )
    return out


def same_host(
    models: Path, target: str, drafts: list[str], prompts: list[str], repeat: int
) -> list[dict[str, Any]]:
    from benchmarks.llm import spec_local
    from tandem.runtime.manifest import load_manifest

    m = load_manifest(models)
    rows: list[dict[str, Any]] = []
    for draft in drafts:
        got = spec_local.same_host(
            models / m.get(target).file,
            models / m.get(draft).file,
            prompts,
            max_tokens=MAX_TOKENS,
            repeat=repeat,
        )
        for r in got:
            r["draft_model"] = draft if r.get("draft") == "gguf" else None
        rows += got if not rows else [r for r in got if r.get("draft") == "gguf"]
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.llm.spec_network", description=__doc__)
    ap.add_argument("--models-dir", type=Path, help="default: the cached reference build")
    ap.add_argument("--n", type=int, default=20, help="answers per run (default 20)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rtts", default=",".join(f"{r:g}" for r in RTTS), help="ms, e.g. 0,5,20")
    ap.add_argument(
        "--clouds",
        default=None,
        help="cloud models, comma-separated (default: spec-cloud,spec-cloud-f16 — the "
        "transformers MoE and the llama.cpp GGUF; --quick: spec-cloud)",
    )
    ap.add_argument("--edge", default="spec-edge-q8_0", help="the draft model (GGUF)")
    ap.add_argument(
        "--distilled", default="spec-edge-distilled-q8_0", help="a second draft model ('' for none)"
    )
    ap.add_argument("--same-host-target", default="spec-cloud-f16", help="a GGUF model")
    ap.add_argument("--no-same-host", action="store_true")
    ap.add_argument("--quick", action="store_true", help="6 answers, 1 run, 0 and 20 ms, one cloud")
    ap.add_argument("--json", type=Path, default=Path("bench-speculative.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.repeat, args.rtts = 6, 1, "0,20"
    if args.clouds is None:
        args.clouds = "spec-cloud" if args.quick else "spec-cloud,spec-cloud-f16"
    from tandem.reference.spec_models import spec_items

    models = resolve_models(args.models_dir)
    items = spec_items(args.n + 4, seed=17)
    prompts, warm = [it.prompt for it in items[4:]], [it.prompt for it in items[:4]]
    rtts = [float(x) for x in args.rtts.split(",") if x]
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for cloud in args.clouds.split(","):
        wanted = configs(args.edge, args.distilled or None)
        rows += network(models, cloud, wanted, prompts, warm, rtts, args.repeat)
    print_network(rows, args.edge, len(prompts), args.repeat)
    verdicts = goals(rows)
    for v in verdicts:
        print(v)
    local: list[dict[str, Any]] = []
    if not args.no_same_host:
        drafts = [d for d in (args.edge, args.distilled) if d]
        local = same_host(models, args.same_host_target, drafts, prompts, args.repeat)
        print_table(
            f"speculative decoding on one host (llama-cpp-python): target {args.same_host_target}",
            ["row", "draft model", "tok/s", "× target alone", "accepted", "identical"],
            [
                [
                    r["row"],
                    r["draft_model"] or "—",
                    _fmt(r["tokens_per_s"], ".0f"),
                    _fmt(r["ratio"], ".2f") + "×",
                    _fmt(r["acceptance"], ".0%"),
                    "yes" if r["identical"] else "NO",
                ]
                for r in local
            ],
            f"{len(prompts)} prompts, greedy, 2 threads, median of {args.repeat}",
        )
    result = {
        "machine": machine(),
        "seconds": time.perf_counter() - t0,
        "network": rows,
        "goals": verdicts,
        "same_host": local,
    }
    args.json.write_text(json.dumps(json_safe(result), indent=1))
    say(f"results in {args.json} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
