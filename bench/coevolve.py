"""The co-evolution experiment: ``python -m tandem.bench.coevolve``.

An edge model trained on a small labelled subset escalates most requests. A stream of traffic
goes through the routed system — a real :class:`~tandem.edge.EdgeRuntime`, a real worker
process on loopback, the real escalation log — and every ``K`` escalations ``tandem evolve``
distils the log into a new edge version, validates it, publishes it to the task's model store
with a recalibrated gate, and the running runtime hot-swaps to it while the traffic goes on
from several threads. After each round the current edge version is measured on a **held-out
stream that distillation never saw**:

* the escalation rate and routed accuracy at the gate the round published (live threshold);
* the escalation rate **at equal routed accuracy**: the fewest escalations whose routed
  accuracy is within 0.5 points of round 0's, read off the held-out routing curve;
* CPT(80%): the escalation rate needed to recover 80% of the edge→cloud accuracy gap
  (RouteLLM's measure; :func:`tandem.router.calibrate.escalation_for_recovery`).

Digits: the held-out stream is the corrupted-digits **test** split (base images that neither
the seed subset nor the traffic contain); the traffic is fresh corruptions of the train split's
images (unlabelled; the cloud's answers are the only labels distillation sees); the validation
set ``tandem evolve`` checks each candidate on is the **calib** split. Sorting: see
:func:`run_sort`.

Writes ``coevolve.json`` and one PNG per task (escalation rate, routed accuracy and CPT(80%)
over rounds) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from tandem.bench.coevolve_loop import (
    Round,
    Traffic,
    _rounds,
    _section,
    held_out_figures,
    run_evolve,
    say,
    send_digits,
    send_sort,
)
from tandem.runtime.machine import machine


# ------------------------------------------------------------------------------------ digits
@dataclass(frozen=True)
class DigitsSetup:
    """How the digits experiment runs (defaults: about 10 minutes on 2 idle cores)."""

    hidden: int = 128  # the experiment's edge: a 64→hidden→10 MLP, int8
    seed_share: float = 0.05  # labelled share of the train split the first edge sees
    escalations_per_round: int = 2000  # K
    rounds: int = 8
    audit_rate: float = 0.1
    threads: int = 4  # traffic threads (a fleet of robots)
    rate_per_s: float = 400.0  # traffic, all threads together
    epochs: int = 10  # distillation epochs per round over the whole log
    # the gate's objective at every round: routed accuracy within this many points of the
    # cloud's (round 0's routed accuracy then stays put, and escalations fall)
    target: str = "accuracy-within=3"
    seed: int = 0


QUICK_DIGITS = DigitsSetup(escalations_per_round=300, rounds=2, epochs=3)


def _train_mlp(x: np.ndarray, y: np.ndarray, hidden: int, seed: int, epochs: int = 60) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    xt, yt = torch.tensor(x), torch.tensor(y)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for b in range(0, len(xt), 128):
            j = perm[b : b + 128]
            loss = nn.functional.cross_entropy(model(xt[j]), yt[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def run_digits(out: Path, setup: DigitsSetup = DigitsSetup()) -> dict[str, Any]:
    """The digits experiment (see the module docstring); returns its JSON section."""
    import yaml

    from tandem.cloud.config import WorkerConfig
    from tandem.cloud.process import WorkerProcess
    from tandem.edge import EdgeRuntime
    from tandem.kernels import confidence
    from tandem.reference.digits import SEVERITIES, corrupt, load_workload
    from tandem.reference.models import (
        CLOUD,
        build_reference_models,
        export_onnx,
        quantize_int8,
    )
    from tandem.router.calibrate import choose_threshold, parse_objective
    from tandem.runtime.backends.onnx import OnnxBackend
    from tandem.runtime.client import CloudClient
    from tandem.runtime.model_store import ModelStore

    models = build_reference_models(None, progress=say)
    data = load_workload(setup.seed)
    rng = np.random.default_rng(setup.seed)
    n_seed = int(setup.seed_share * len(data.train))
    seed_rows = rng.permutation(len(data.train))[:n_seed]
    sx, sy = data.train.x[seed_rows], data.train.y[seed_rows]

    # the traffic: fresh corruptions of the train split's images (base images the held-out
    # test split does not contain), at every severity
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    train_ids, _ = train_test_split(
        np.arange(len(digits.target)),
        train_size=0.6,
        stratify=digits.target,
        random_state=setup.seed,
    )  # fmt: skip (the split load_workload makes)
    traffic_rng = np.random.default_rng(setup.seed + 100)
    traffic_lock = threading.Lock()

    def make(n: int) -> np.ndarray:
        with traffic_lock:
            ids = traffic_rng.choice(train_ids, n)
            sev = traffic_rng.integers(0, len(SEVERITIES), n)
            return corrupt(images[ids], sev, traffic_rng).reshape(n, -1)

    with tempfile.TemporaryDirectory(prefix="tandem-coevolve-") as tmp_s:
        tmp = Path(tmp_s)
        say(f"training the first edge model (64-{setup.hidden}-10 MLP) on {n_seed} labelled rows")
        model = _train_mlp(sx, sy, setup.hidden, setup.seed)
        fp32, int8 = tmp / "edge-fp32.onnx", tmp / "edge-int8.onnx"
        export_onnx(model, fp32)
        quantize_int8(fp32, int8)
        np.savez(tmp / "seed.npz", x=sx, y=sy)
        cfg = WorkerConfig(bind="tcp://127.0.0.1:*", models_dir=models, models=[CLOUD])
        with WorkerProcess(cfg) as worker:
            assert worker.endpoint is not None
            with CloudClient(worker.endpoint) as client:
                say("the cloud's answers for the calib (validation) and test (held-out) splits")
                from tandem.reference.models import cloud_logits

                calib_cloud = cloud_logits(client, CLOUD, data.calib.x)
                test_cloud = cloud_logits(client, CLOUD, data.test.x)
            np.savez(tmp / "calib.npz", x=data.calib.x, y=data.calib.y, cloud=calib_cloud)
            test_cloud_right = test_cloud.argmax(1) == data.test.y
            calib_cloud_right = calib_cloud.argmax(1) == data.calib.y

            # round 0's gate: the setup's objective on the calib split
            edge0 = OnnxBackend(int8)
            lc = edge0.predict(data.calib.x)
            st = confidence(lc)
            choice = choose_threshold(
                st.max_prob, st.top1 == data.calib.y, calib_cloud_right,
                parse_objective(setup.target),
            )  # fmt: skip
            store = tmp / "store"
            ModelStore(store).publish(int8, gate={"threshold": choice.threshold},
                                      extra_files={"fp32.onnx": fp32})  # fmt: skip
            policy = {
                "version": 1,
                "escalation_log": {"path": str(tmp / "escalations.sqlite"),
                                   "synchronous": "normal"},
                "tasks": {
                    "digits": {
                        "local": {"path": str(int8), "store": str(store)},
                        "cloud": {"endpoint": worker.endpoint, "model": CLOUD},
                        "gate": {"metric": "max_prob", "threshold": choice.threshold},
                        "audit_rate": setup.audit_rate,
                        "deadline_ms": 2000,
                    }
                },
            }  # fmt: skip
            policy_path = tmp / "policy.yaml"
            policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))

            def measure(r: int, traffic: Traffic, target: float | None) -> Round:
                cur = ModelStore(store).current()
                assert cur is not None
                logits = OnnxBackend(cur.path).predict(data.test.x)
                gate = cur.gate or {}
                t = float(gate.get("temperature", 1.0))
                s = confidence(logits / t if t != 1.0 else logits)
                f = held_out_figures(
                    s.max_prob, s.top1 == data.test.y, test_cloud_right,
                    float(gate.get("threshold", choice.threshold)), target,
                )  # fmt: skip
                return Round.measured(r, cur.version, traffic, f)

            rounds = _rounds(
                EdgeRuntime.from_policy(policy_path), make, send_digits, setup, measure,
                lambda r: run_evolve(
                    policy_path, "digits", tmp / f"evolve-{r}.json",
                    "--train-data", tmp / "seed.npz", "--holdout", tmp / "calib.npz",
                    "--epochs", setup.epochs, "--seed", setup.seed + r,
                    "--target", setup.target,
                ),
            )  # fmt: skip
    return _section("digits", setup, rounds, out)


# -------------------------------------------------------------------------------- sorting
@dataclass(frozen=True)
class SortSetup:
    """How the sorting experiment runs (defaults: about 15 minutes on 2 idle cores)."""

    escalations_per_round: int = 1000  # K
    rounds: int = 4
    audit_rate: float = 0.1
    threads: int = 2  # traffic threads
    rate_per_s: float = 100.0
    steps: int = 500  # fine-tuning steps per round (from the last version's weights)
    lr: float = 2e-3
    # per difficulty: true-answer items tandem evolve replays (0: none, distillation only).
    # The reference edge is undertrained, so replaying fresh labelled items is itself worth
    # most of what the experiment shows (an ablation: README); the default measures the log.
    replay_items: int = 0
    heldout_per_difficulty: int = 40
    target: str = "recovery=0.8"
    seed: int = 0


QUICK_SORT = SortSetup(escalations_per_round=20, rounds=1, steps=20, heldout_per_difficulty=6)
PROBE_TOKENS = 8


def _sort_answers(backend: Any, items: list[Any]) -> tuple[np.ndarray, list[list[float]]]:
    """Greedy answers to ``items``: whether each is right, and its tokens' log-probs."""
    from tandem.reference import lm_task
    from tandem.runtime.generation import SamplingParams

    right, logprobs = [], []
    for it in items:
        steps = list(backend.stream(it.prompt, SamplingParams(max_tokens=it.difficulty + 1)))
        right.append(lm_task.score("".join(s.text for s in steps), it))
        logprobs.append([s.logprob for s in steps])
    return np.array(right), logprobs


def run_sort(out: Path, setup: SortSetup = SortSetup()) -> dict[str, Any]:
    """The sorting experiment: the reference edge LM (GGUF, llama.cpp) and cloud MoE
    (transformers, Tandem's experts, in a worker process). Traffic is fresh sorting items of
    every difficulty; the held-out stream is items of another seed that the traffic does not
    contain; the gate is ``token_min`` over an 8-token probe, with hand-off ``restart`` (the
    cloud answers from the prompt, so the log holds whole cloud answers to distil)."""
    import yaml

    from tandem.cloud.config import WorkerConfig
    from tandem.cloud.process import WorkerProcess
    from tandem.edge import EdgeRuntime
    from tandem.reference import lm_task
    from tandem.reference.lm_models import CLOUD, build_llm_models
    from tandem.router.calibrate import choose_threshold, parse_objective
    from tandem.router.policy import TokenGateSpec
    from tandem.router.routing import TokenGate
    from tandem.runtime.backends import open_backend
    from tandem.runtime.model_store import ModelStore

    paths = build_llm_models(progress=say)
    edge_gguf, cloud_hf = paths["edge-q8_0"], paths["cloud-hf"]
    held = [
        it
        for d in lm_task.DIFFICULTIES
        for it in lm_task.make_items(d, setup.heldout_per_difficulty, setup.seed + 7_000)
    ]
    calib = [
        it
        for d in lm_task.DIFFICULTIES
        for it in lm_task.make_items(d, setup.heldout_per_difficulty, setup.seed + 8_000)
    ]
    seen = {it.letters for it in held + calib}
    traffic_rng = np.random.default_rng(setup.seed + 100)
    traffic_lock = threading.Lock()

    def make(n: int) -> list[Any]:
        with traffic_lock:
            ds = traffic_rng.choice(lm_task.DIFFICULTIES, n)
            seeds = traffic_rng.integers(0, 2**31, n)
        items = [lm_task.make_items(int(d), 1, int(s))[0] for d, s in zip(ds, seeds, strict=True)]
        return [it for it in items if it.letters not in seen] or make(n)

    gate = TokenGate(TokenGateSpec(metric="token_min", threshold=0.5))

    def scores(logprobs: list[list[float]]) -> np.ndarray:
        return np.array([gate.probe_score(lp[:PROBE_TOKENS]) for lp in logprobs])

    say("the cloud model's answers to the held-out and calibration items (once)")
    cloud = open_backend("transformers", cloud_hf, threads=2)
    try:
        held_cloud, _ = _sort_answers(cloud, held)
        calib_cloud, _ = _sort_answers(cloud, calib)
    finally:
        cloud.close()

    with tempfile.TemporaryDirectory(prefix="tandem-coevolve-sort-") as tmp_s:
        tmp = Path(tmp_s)
        # the edge's original training data (true answers), replayed by tandem evolve
        replay = [
            it
            for d in lm_task.DIFFICULTIES
            for it in lm_task.make_items(d, setup.replay_items, setup.seed + 9_000)
        ]
        (tmp / "train.jsonl").write_text("".join(
            json.dumps({"prompt": it.prompt, "answer": it.answer}) + "\n"
            for it in replay if it.letters not in seen
        ))  # fmt: skip
        edge = open_backend("gguf", edge_gguf, threads=2, n_ctx=512)
        try:
            c_right, c_lp = _sort_answers(edge, calib)
        finally:
            edge.close()
        choice = choose_threshold(scores(c_lp), c_right, calib_cloud, parse_objective(setup.target))
        store = tmp / "store"
        cfg = WorkerConfig.model_validate(
            {"bind": "tcp://127.0.0.1:*", "models_dir": str(paths["dir"]), "models": [CLOUD]}
        )
        with WorkerProcess(cfg, startup_timeout_s=300) as worker:
            assert worker.endpoint is not None
            policy = {
                "version": 1,
                "escalation_log": {"path": str(tmp / "escalations.sqlite"),
                                   "synchronous": "normal"},
                "tasks": {
                    "sort": {
                        "kind": "generate",
                        "local": {"path": str(edge_gguf), "store": str(store), "n_ctx": 512,
                                  "parallel": setup.threads},
                        "cloud": {"endpoint": worker.endpoint, "model": CLOUD},
                        "gate": {"metric": "token_min", "threshold": choice.threshold},
                        "mode": "probe",
                        "probe_tokens": PROBE_TOKENS,
                        "handoff": "restart",
                        "max_tokens": max(lm_task.DIFFICULTIES) + 1,
                        "audit_rate": setup.audit_rate,
                        "deadline_ms": 120_000,
                        "first_token_ms": 60_000,
                    }
                },
            }  # fmt: skip
            policy_path = tmp / "policy.yaml"
            policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))

            def measure(r: int, traffic: Traffic, target: float | None) -> Round:
                cur = ModelStore(store).current()
                path = cur.path if cur is not None else edge_gguf
                threshold = (
                    float((cur.gate or {}).get("threshold", choice.threshold))
                    if cur
                    else choice.threshold
                )
                b = open_backend("gguf", path, threads=2, n_ctx=512)
                try:
                    right, lp = _sort_answers(b, held)
                finally:
                    b.close()
                f = held_out_figures(scores(lp), right, held_cloud, threshold, target)
                return Round.measured(r, cur.version if cur else "local.path", traffic, f)

            rounds = _rounds(
                EdgeRuntime.from_policy(policy_path), make, send_sort, setup, measure,
                lambda r: run_evolve(
                    policy_path, "sort", tmp / f"evolve-{r}.json", "--steps", setup.steps,
                    "--seed", setup.seed + r, "--target", setup.target, "--lr", setup.lr,
                    *(("--train-data", tmp / "train.jsonl") if setup.replay_items else ()),
                ),
            )  # fmt: skip
    return _section("sort", setup, rounds, out)


# -------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tandem.bench.coevolve",
        description="Co-evolution: stream traffic through a routed system, run tandem evolve "
        "every K escalations, and plot escalation rate, routed accuracy and CPT(80%%) over "
        "rounds on a held-out stream.",
    )
    p.add_argument("--task", choices=("digits", "sort", "all"), default="all")
    p.add_argument("--out", type=Path, default=Path("coevolve-results"))
    p.add_argument("--quick", action="store_true", help="A few small rounds (a smoke run).")
    p.add_argument("--rounds", type=int, help="tandem evolve runs (default: per task).")
    p.add_argument("--escalations", type=int, help="K: escalations per round.")
    p.add_argument("--hidden", type=int, help="digits: the edge MLP's hidden width.")
    p.add_argument(
        "--replay-items", type=int, help="sort: true-answer items per difficulty to replay."
    )
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"schema": "tandem-coevolve/1", "machine": machine()}
    say(f"CPU: {machine()['cpu']}")
    if a.task in ("digits", "all"):
        setup = QUICK_DIGITS if a.quick else DigitsSetup()
        overrides = {"rounds": a.rounds, "escalations_per_round": a.escalations,
                     "hidden": a.hidden}  # fmt: skip
        setup = replace(setup, **{k: v for k, v in overrides.items() if v is not None})
        result["digits"] = run_digits(a.out, setup)
    if a.task in ("sort", "all"):
        setup_s = QUICK_SORT if a.quick else SortSetup()
        overrides = {"rounds": a.rounds, "escalations_per_round": a.escalations,
                     "replay_items": a.replay_items}  # fmt: skip
        setup_s = replace(setup_s, **{k: v for k, v in overrides.items() if v is not None})
        result["sort"] = run_sort(a.out, setup_s)
    (a.out / "coevolve.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    for task in ("digits", "sort"):
        if task in result:
            s = result[task]["summary"]
            eq = s["escalation_at_equal_accuracy"]
            say(
                f"{task}: escalation at equal routed accuracy {eq['first']:.1%} -> "
                f"{eq['last']:.1%} ({eq['reduction']:.0%} less); CPT(80%) "
                f"{s['cpt80']['first']:.1%} -> {s['cpt80']['last']:.1%}; goals: {s['goals']}"
            )
    say(f"wrote {a.out / 'coevolve.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
