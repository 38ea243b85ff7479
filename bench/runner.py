"""``tandem bench run``: one scenario, end to end.

1. **Set up** what the scenario names: the items (bundled digits or sorting prompts, or your
   ``.npy`` / ``.jsonl``), the policy (the reference one for a bundled task — its gate
   threshold calibrated on the calibration split as ``tandem demo`` does — or yours), and the
   cloud (worker processes started on loopback, or running workers by address).
2. **Measure** every level — each network profile × each load point — on a fresh
   :class:`~tandem.edge.EdgeRuntime`: a netem relay (:mod:`tandem.bench.netem`) is started
   between the runtime and the workers for the level (its outages count from the level's
   start), and :func:`tandem.bench.load.run_level` drives the runtime's own ``infer`` /
   ``generate`` until the stability rule holds.
3. **Derive** the sweeps: gate threshold → accuracy / escalation rate / p95 (classifiers: each
   item's edge and cloud outcome replayed at every threshold, latency the mixture of the first
   level's measured edge and cloud latency distributions), RTT → latency per tier, and load →
   throughput and p99 with its knee.

The results are one JSON-able dict (schema ``tandem-bench/1``, see ``docs`` in the README).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import platform
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from tandem.bench.load import TIERS, GenSample, LevelRun, Outcome, Tick, level_json, run_level
from tandem.bench.report import json_safe, machine
from tandem.bench.scenario import LinkSpec, Scenario
from tandem.runtime.errors import ConfigError, TandemError

SCHEMA = "tandem-bench/1"
Say = Callable[[str], None]
PACKAGES = (
    "tandem-infer", "numpy", "onnxruntime", "pyzmq", "msgpack", "numba", "torch",
    "llama_cpp_python", "transformers", "hdrhistogram", "matplotlib",
)  # fmt: skip


# ---------------------------------------------------------------------- items
@dataclass
class Items:
    """What a level sends: classifier rows (``x``, ``y``) or prompts (with ``answers``)."""

    kind: str  # classify | generate
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    prompts: list[str] | None = None
    answers: list[str | None] | None = None
    max_tokens: list[int | None] | None = None

    def __len__(self) -> int:
        return len(self.x) if self.x is not None else len(self.prompts or [])


_MAX_LINE = 1 << 20  # one jsonl item, bytes


def _jsonl(path: Path, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` items, read line by line (never the whole file)."""
    rows: list[dict[str, Any]] = []
    try:
        with path.open("rb") as f:
            for n, raw in enumerate(iter(lambda: f.readline(_MAX_LINE + 1), b""), 1):
                if len(raw) > _MAX_LINE:
                    raise ConfigError(f"{path}:{n}: a line over {_MAX_LINE} bytes")
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise ConfigError(f"{path}:{n}: not a UTF-8 JSON object: {e}") from None
                if not isinstance(row, dict):
                    raise ConfigError(
                        f"{path}:{n}: expected a JSON object, got {type(row).__name__}"
                    )
                rows.append(row)
                if len(rows) >= limit:
                    break
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    if not rows:
        raise ConfigError(f"{path}: no items")
    return rows


def _npy(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot load the {what} as .npy: {e}") from None


def user_items(sc: Scenario, kind: str) -> Items:
    """``npy`` or ``jsonl`` items for a task of ``kind``, checked against it."""
    t, limit = sc.task, sc.task.limit
    if t.source == "npy":
        if kind != "classify":
            raise ConfigError(f"task.source 'npy' drives a classify task; the policy's is {kind}")
        assert t.inputs is not None
        x = _npy(t.inputs, "inputs")[:limit]
        y = None
        if t.labels is not None:
            y = _npy(t.labels, "labels")[:limit]
            if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
                raise ConfigError(
                    f"{t.labels}: expected {len(x)} integer class indices, got {y.dtype} "
                    f"shape {y.shape}"
                )
        if x.ndim < 2 or len(x) == 0:
            raise ConfigError(f"{t.inputs}: expected (N, ...) input rows, got shape {x.shape}")
        if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
            raise ConfigError(f"{t.inputs}: expected real numbers, got dtype {x.dtype}")
        return Items("classify", x=x.astype(np.float32, copy=False), y=y)
    assert t.path is not None
    rows = _jsonl(t.path, limit)
    if kind == "generate":
        prompts, answers = [], []
        for n, r in enumerate(rows, 1):
            if not isinstance(r.get("prompt"), str):
                raise ConfigError(f"{t.path}: item {n}: expected a string 'prompt'")
            a = r.get("answer")
            if a is not None and not isinstance(a, str):
                raise ConfigError(f"{t.path}: item {n}: 'answer' must be a string")
            prompts.append(r["prompt"])
            answers.append(a)
        return Items(
            "generate", prompts=prompts, answers=answers, max_tokens=[t.max_tokens] * len(prompts)
        )
    try:
        x = np.asarray([r["input"] for r in rows], np.float32)
    except (KeyError, ValueError, TypeError):
        raise ConfigError(
            f"{t.path}: each item needs an 'input' (a list of numbers, all of one shape)"
        ) from None
    labels = [r.get("label") for r in rows]
    if all(v is None for v in labels):
        return Items("classify", x=x)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise ConfigError(f"{t.path}: 'label' must be an integer class index on every item")
    return Items("classify", x=x, y=np.asarray(labels))


# ---------------------------------------------------------------------- set-up
@dataclass
class Setup:
    items: Items
    policy: dict[str, Any]  # one task, JSON-able, paths absolute
    task: str
    endpoints: list[str]  # the workers the policy's cloud points at (direct)
    curve: tuple[Path, Path] | None
    cloud_model: str | None


def check_cloud(
    endpoints: list[str], curve: tuple[Path, Path] | None, timeout_s: float = 5.0
) -> None:
    """Fail now, clearly, when a worker does not answer (rather than measure a dead cloud as
    100% edge-degraded)."""
    from tandem.runtime.client import CloudClient

    for ep in endpoints:
        try:
            with CloudClient(ep, curve=curve) as c:
                c.health(timeout_s)
        except TandemError as e:
            raise TandemError(
                f"the worker at {ep} did not answer a health check in {timeout_s:g} s "
                f"({e.message}): is it running"
                + (", and are the CurveZMQ keys right?" if curve else "?")
            ) from None


def _start_worker(cfg: Any, stack: contextlib.ExitStack, log: Path, say: Say) -> str:
    from tandem.cloud.process import WorkerProcess

    f = stack.enter_context(log.open("ab"))
    w = WorkerProcess(cfg, startup_timeout_s=300, stderr=f)
    say(f"starting a worker serving {', '.join(cfg.models or []) or 'nothing'}")
    try:
        stack.enter_context(w)
    except TandemError as e:
        tail = log.read_text(errors="replace")[-2000:]
        raise TandemError(f"{e.message}; worker log ({log}):\n{tail}") from None
    assert w.endpoint is not None
    return w.endpoint


def _reference_cloud(
    sc: Scenario, stack: contextlib.ExitStack, out: Path, models: Path, model: str, say: Say
) -> list[str]:
    """A bundled task's cloud: a worker started here serving ``model`` (one thread), or the
    scenario's endpoints."""
    from tandem.cloud.config import WorkerConfig

    if sc.starts_workers:
        cfg = WorkerConfig(bind="tcp://127.0.0.1:*", models_dir=models, models=[model], threads=1)
        return [_start_worker(cfg, stack, out / "worker.log", say)]
    if not sc.cloud.targets:
        raise ConfigError(
            f"the {sc.task.source} task needs a cloud: set cloud.start or cloud.endpoint"
        )
    check_cloud(sc.cloud.targets, None)
    return list(sc.cloud.targets)


def _digits_setup(sc: Scenario, stack: contextlib.ExitStack, out: Path, say: Say) -> Setup:
    from tandem.bench.reference.digits import load_workload
    from tandem.bench.reference.models import CLOUD, EDGE, LABELS, build_reference_models
    from tandem.runtime.manifest import load_manifest

    models = build_reference_models(progress=say)
    manifest = load_manifest(models)
    data = load_workload(manifest.seed or 0)
    # the test split is ordered by corruption severity: a seeded shuffle, so any prefix (the
    # items a short level reaches, the sweep's items) is a fair sample
    order = np.random.default_rng(0).permutation(len(data.test))[: sc.task.limit]
    items = Items("classify", x=data.test.x[order], y=data.test.y[order])
    endpoints = _reference_cloud(sc, stack, out, models, CLOUD, say)
    threshold = sc.policy.threshold
    edge_path = models / manifest.get(EDGE).file
    if threshold is None:
        threshold = _calibrate(edge_path, data.calib.x, data.calib.y, endpoints, CLOUD, say)
    task = {
        "local": {"path": str(edge_path), "labels": LABELS, "threads": 1},
        "cloud": {"endpoints": endpoints, "model": CLOUD},
        "gate": {"metric": "max_prob", "threshold": round(threshold, 6)},
        "deadline_ms": sc.policy.deadline_ms or 200,
    }
    return Setup(items, {"version": 1, "tasks": {"digits": task}}, "digits", endpoints, None, CLOUD)


def _calibrate(
    edge: Path, x: np.ndarray, y: np.ndarray, endpoints: list[str], model: str, say: Say
) -> float:
    """``tandem demo``'s rule: the fewest escalations recovering 90% of the edge→cloud gap
    on the calibration split."""
    from tandem.kernels.confidence import confidence
    from tandem.router.calibrate import pick_threshold, routing_curve
    from tandem.runtime.backends.onnx import OnnxBackend

    say("calibrating the gate threshold on the calibration split")
    c = confidence(OnnxBackend(edge).predict(x))
    cloud_ok = _cloud_top1(endpoints, None, model, x) == y
    return pick_threshold(routing_curve(c.max_prob, c.top1 == y, cloud_ok), 0.9)


def _cloud_top1(
    endpoints: list[str], curve: tuple[Path, Path] | None, model: str, x: np.ndarray
) -> np.ndarray:
    from tandem.runtime.client import CloudClient

    with CloudClient(endpoints, curve=curve) as client:
        parts = [
            client.infer(model, x[i : i + 256], timeout_s=10.0)["outputs"]
            for i in range(0, len(x), 256)
        ]
    return np.concatenate(parts).argmax(axis=1)


def _sort_setup(sc: Scenario, stack: contextlib.ExitStack, out: Path, say: Say) -> Setup:
    from tandem.bench.llm import CLOUD, EDGE_GGUF
    from tandem.bench.reference import lm_task
    from tandem.bench.reference.lm_models import build_llm_models
    from tandem.runtime.manifest import load_manifest

    models = build_llm_models(progress=say)["dir"]
    manifest = load_manifest(models)
    per = max(1, -(-sc.task.limit // len(lm_task.DIFFICULTIES)))
    sort_items = [it for d in lm_task.DIFFICULTIES for it in lm_task.held_out(d, per)]
    rng = np.random.default_rng(0)  # difficulties interleaved, as a robot would meet them
    sort_items = [sort_items[i] for i in rng.permutation(len(sort_items))][: sc.task.limit]
    items = Items(
        "generate",
        prompts=[it.prompt for it in sort_items],
        answers=[it.answer for it in sort_items],
        max_tokens=[sc.task.max_tokens or it.difficulty + 1 for it in sort_items],
    )
    endpoints = _reference_cloud(sc, stack, out, models, CLOUD, say)
    task = {
        "kind": "generate",
        "local": {"path": str(models / manifest.get(EDGE_GGUF).file), "threads": 1},
        "cloud": {"endpoints": endpoints, "model": CLOUD},
        # a wrong start rarely ends right: escalated answers start over from the prompt
        "gate": {
            "metric": "token_min",
            "threshold": 0.9 if sc.policy.threshold is None else sc.policy.threshold,
        },
        "mode": "probe",
        "probe_tokens": 8,
        "handoff": "restart",
        "deadline_ms": sc.policy.deadline_ms or 30_000,
    }
    return Setup(items, {"version": 1, "tasks": {"sort": task}}, "sort", endpoints, None, CLOUD)


def _user_setup(sc: Scenario, stack: contextlib.ExitStack, out: Path, say: Say) -> Setup:
    from tandem.cloud.config import load_worker_config
    from tandem.router.policy import GenerateTaskPolicy, load_policy

    assert sc.policy.path is not None
    pol = load_policy(sc.policy.path)
    name = sc.policy.task
    if name is None:
        if len(pol.tasks) != 1:
            raise ConfigError(
                f"{sc.policy.path} has tasks {', '.join(pol.tasks)}: name one in policy.task"
            )
        name = next(iter(pol.tasks))
    if name not in pol.tasks:
        raise ConfigError(
            f"policy.task: {sc.policy.path} has no task {name!r} (it has {', '.join(pol.tasks)})"
        )
    tp = pol.tasks[name]
    kind = "generate" if isinstance(tp, GenerateTaskPolicy) else "classify"
    items = user_items(sc, kind)
    data = pol.model_dump(mode="json", exclude_none=True)
    task = data["tasks"][name]
    if "speculative" in task and task.get("mode") != "speculative":
        task.pop("speculative")
    endpoints = sc.cloud.targets or (tp.cloud.all_endpoints if tp.cloud else [])
    curve = tp.cloud.curve_keys if tp.cloud else None
    if sc.cloud.client_key is not None and sc.cloud.server_key is not None:
        curve = (sc.cloud.client_key, sc.cloud.server_key)
    if sc.starts_workers:
        assert sc.cloud.worker is not None
        cfg = load_worker_config(sc.cloud.worker)
        endpoints = [_start_worker(cfg, stack, out / "worker.log", say)]
        if cfg.curve is not None and curve is None:
            raise ConfigError(f"{sc.cloud.worker}: the worker uses CurveZMQ; give cloud keys")
    if tp.cloud is None and endpoints:
        raise ConfigError(f"{sc.policy.path}: task {name!r} has no cloud target to send to")
    if curve is not None and any(p is not None for p in sc.network.profiles):
        raise ConfigError(
            f"{sc.policy.path}: task {name!r} uses CurveZMQ, which the network emulator cannot "
            "relay: drop the scenario's 'network', or measure against the workers directly"
        )
    if endpoints:
        check_cloud(endpoints, curve)
    if tp.cloud is not None:
        task["cloud"]["endpoints"] = endpoints
        task["cloud"].pop("endpoint", None)
        if curve is not None:
            task["cloud"]["client_key"], task["cloud"]["server_key"] = (str(p) for p in curve)
    if sc.policy.threshold is not None:
        task["gate"]["threshold"] = sc.policy.threshold
    if sc.policy.deadline_ms is not None:
        task["deadline_ms"] = sc.policy.deadline_ms
    model = tp.cloud.model if tp.cloud else None
    policy = {"version": 1, "tasks": {name: task}}
    if "escalation_log" in data:  # logged as the robot would, but not into the robot's log
        policy["escalation_log"] = {
            **data["escalation_log"],
            "path": str(out / "escalations.sqlite"),
        }
    return Setup(items, policy, name, endpoints, curve, model)


def setup(sc: Scenario, stack: contextlib.ExitStack, out: Path, say: Say) -> Setup:
    if sc.task.source == "digits":
        return _digits_setup(sc, stack, out, say)
    if sc.task.source == "sort":
        return _sort_setup(sc, stack, out, say)
    return _user_setup(sc, stack, out, say)


# ---------------------------------------------------------------------- calls
def classify_call(rt: Any, task: str, items: Items) -> Callable[[int], Outcome]:
    from tandem.runtime.types import Tier

    x, y = items.x, items.y
    assert x is not None

    def call(i: int) -> Outcome:
        r = rt.infer(x[i], task)
        split = None
        if r.tier is Tier.CLOUD:
            t = r.timings
            split = {"local": t["local"], "gate": t["route"]}
            q, c = t.get("cloud_queue"), t.get("cloud_compute")
            if q is not None and c is not None:
                split.update(network=max(0.0, t["cloud"] - q - c), cloud_queue=q, cloud_compute=c)
        return Outcome(
            tier=r.tier.value,
            correct=None if y is None else bool(r.index == y[i]),
            escalated=r.tier is not Tier.EDGE,
            split=split,
        )

    return call


def generate_call(rt: Any, task: str, items: Items) -> Callable[[int], Outcome]:
    from tandem.runtime.types import Tier

    prompts, answers, max_tokens = items.prompts, items.answers, items.max_tokens
    assert prompts is not None and answers is not None and max_tokens is not None

    def call(i: int) -> Outcome:
        with rt.generate(prompts[i], task, max_tokens=max_tokens[i], stream=True) as s:
            for _ in s:
                pass
        r = s.result
        assert r is not None
        tiers = set(r.tiers)
        tier = (
            Tier.EDGE_DEGRADED if Tier.EDGE_DEGRADED in tiers
            else Tier.CLOUD if Tier.CLOUD in tiers else Tier.EDGE
        )  # fmt: skip
        spec = r.speculation or {}
        gen = GenSample(
            ttft_ms=r.timings.get("ttft"),
            itl_ms=list(r.inter_token_ms),
            tokens=len(r.tokens),
            duration_ms=r.timings.get("total", 0.0),
            drafted=int(spec.get("drafted", 0)),
            accepted=int(spec.get("accepted", 0)),
            by_tier=dict(Counter(t.value for t in r.token_tiers)),
        )
        a = answers[i]
        return Outcome(
            tier=tier.value,
            correct=None if a is None else r.text.strip() == a.strip(),
            escalated=tier is not Tier.EDGE,
            gen=gen,
        )

    return call


# ---------------------------------------------------------------------- levels
def link_of(p: str | LinkSpec | None) -> Any:
    """The netem :class:`LinkProfile` for a scenario profile (None: no relay)."""
    from tandem.bench.netem import LinkProfile, profile

    if p is None:
        return None
    if isinstance(p, str):
        return profile(p)
    bw = None if p.bandwidth_mbit is None else p.bandwidth_mbit * 1e6 / 8
    return LinkProfile(p.name, p.delay_ms, p.jitter_ms, bw, p.down)


def network_json(link: Any, outages: list[tuple[float, float]]) -> dict[str, Any]:
    if link is None:
        return {"profile": "none", "delay_ms": 0.0, "jitter_ms": 0.0, "bandwidth": None,
                "rtt_ms": 0.0, "outages": []}  # fmt: skip
    bw = None if link.bandwidth is None else f"{link.bandwidth * 8 / 1e6:g} Mbit/s"
    return {
        "profile": link.name,
        "delay_ms": link.delay_ms,
        "jitter_ms": link.jitter_ms,
        "bandwidth": bw,
        "down": link.down,
        "rtt_ms": 2 * link.delay_ms,
        "outages": [list(o) for o in outages],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def relays(
    endpoints: list[str],
    link: Any,
    outages: list[tuple[float, float]],
    seed: int,
    log: Path,
) -> Iterator[tuple[list[str], Callable[[], None]]]:
    """Listen endpoints for a relay per worker, and a function that starts them (call it
    when the level starts: outages count from then). No link: the workers' own endpoints."""
    if link is None:
        yield endpoints, lambda: None
        return
    from tandem.bench.netem import start_relay

    listens = [f"tcp://127.0.0.1:{_free_port()}" for _ in endpoints]
    handles: list[Any] = []
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(log.open("ab"))

        def start() -> None:
            for target, listen in zip(endpoints, listens, strict=True):
                h = start_relay(target, link, listen, outages=outages, seed=seed, stderr=f)
                handles.append(stack.enter_context(h))

        yield listens, start


def run_levels(
    sc: Scenario, st: Setup, out: Path, say: Say, tick: Callable[[str], Tick | None]
) -> tuple[list[dict[str, Any]], list[LevelRun]]:
    from tandem.edge import EdgeRuntime
    from tandem.router.policy import policy_from_dict

    ld = sc.load
    outages = list(sc.network.outages)
    levels, runs = [], []
    make = classify_call if st.items.kind == "classify" else generate_call
    for prof in sc.network.profiles:
        link = link_of(prof)
        for point in ld.points:
            what = f"c={point:g}" if ld.mode == "closed" else f"{point:g}/s"
            label = f"{link.name if link else 'direct'} {what}"
            say(f"level {label}")
            with relays(st.endpoints, link, outages, sc.network.seed, out / "netem.log") as (
                eps,
                start,
            ):
                data = json.loads(json.dumps(st.policy))
                if eps and data["tasks"][st.task].get("cloud"):
                    data["tasks"][st.task]["cloud"]["endpoints"] = eps
                with EdgeRuntime(policy_from_dict(data, source=f"<{sc.name} policy>")) as rt:
                    start()
                    call = make(rt, st.task, st.items)
                    try:  # one request first, outside the load: a broken set-up says why
                        call(0)
                    except Exception as e:
                        why = (
                            e.message if isinstance(e, TandemError) else f"{type(e).__name__}: {e}"
                        )
                        raise TandemError(
                            f"level {label}: the first request failed: {why}"
                        ) from None
                    run = run_level(
                        call,
                        len(st.items),
                        mode=ld.mode,
                        point=point,
                        warmup_s=ld.warmup_s,
                        window_s=ld.window_s,
                        min_windows=ld.min_windows,
                        max_windows=ld.max_windows,
                        stable_windows=ld.stable_windows,
                        stability_pct=ld.stability_pct,
                        max_requests=ld.max_requests,
                        max_in_flight=ld.max_in_flight,
                        min_window_answers=ld.min_window_answers,
                        seed=ld.seed,
                        on_tick=tick(label),
                    )
            load: dict[str, Any] = {"mode": ld.mode}
            if ld.mode == "closed":
                load["concurrency"] = int(point)
            else:
                load["rate"] = point
                load["achieved_rate"] = (
                    run.stats.sent / run.stats.span_s if run.stats.span_s else 0.0
                )
            lvl = level_json(run, label=label, network=network_json(link, outages), load=load)
            lvl["stability_pct"] = ld.stability_pct
            levels.append(lvl)
            if not runs:  # the threshold sweep's latencies; the others' windows can go
                runs.append(run)
    return levels, runs


# ---------------------------------------------------------------------- sweeps
def _cdf(h: Any) -> tuple[np.ndarray, np.ndarray]:
    """(values ms, cumulative fraction) of an HDR histogram's recorded values."""
    n = h.get_total_count()
    if not n:
        return np.array([]), np.array([])
    # the iterator hands back one object, updated in place: read it as it goes
    steps = [(s.value_iterated_to, s.total_count_to_this_value) for s in h.get_recorded_iterator()]
    a = np.array(steps, float).reshape(-1, 2)
    return a[:, 0] / 1e3, a[:, 1] / n


def mixture_quantile(parts: list[tuple[float, Any]], q: float) -> float | None:
    """The ``q`` quantile of a mixture of HDR histograms with weights (weights sum to 1;
    a part with weight 0 may be empty). None when a weighted part has no data."""
    cdfs = [(w, *_cdf(h)) for w, h in parts if w > 0]
    if not cdfs or any(len(v) == 0 for _, v, _ in cdfs):
        return None
    grid = np.unique(np.concatenate([v for _, v, _ in cdfs]))
    total = np.zeros_like(grid)
    for w, v, c in cdfs:
        idx = np.searchsorted(v, grid, side="right") - 1
        total += w * np.where(idx >= 0, c[np.clip(idx, 0, None)], 0.0)
    k = int(np.searchsorted(total, q - 1e-12, side="left"))
    return float(grid[min(k, len(grid) - 1)])


def pareto(points: list[dict[str, Any]]) -> list[int]:
    """Indices of points no other point beats on all of: accuracy (higher), escalation rate
    and p95 (lower), being at least as good on each and better on one."""

    def key(p: dict[str, Any]) -> tuple[float, float, float]:
        p95 = p["p95_ms"] if p["p95_ms"] is not None else np.inf
        return (-p["accuracy"], p["escalation_rate"], p95)

    ks = [key(p) for p in points]
    front = []
    for i, a in enumerate(ks):
        dominated = any(all(bj <= aj for aj, bj in zip(a, b, strict=True)) and b != a for b in ks)
        if not dominated and a not in [ks[j] for j in front]:
            front.append(i)
    return front


def threshold_sweep(sc: Scenario, st: Setup, first: LevelRun, say: Say) -> dict[str, Any] | None:
    """Classifiers with labels: accuracy, escalation rate and p95 at every threshold."""
    from tandem.kernels.confidence import confidence
    from tandem.router.policy import policy_from_dict
    from tandem.runtime.backends.onnx import OnnxBackend

    spec = sc.sweep
    if spec.threshold is None:
        return None
    if st.items.kind != "classify" or st.items.y is None or st.cloud_model is None:
        say("threshold sweep skipped: it needs a classify task with labels and a cloud")
        return None
    tp = policy_from_dict(st.policy).tasks[st.task]
    n = min(spec.items, len(st.items))
    x, y = st.items.x[:n], st.items.y[:n]  # type: ignore[index]
    say(f"threshold sweep: {n} items through the edge model and the cloud")
    backend = OnnxBackend(tp.local.path, threads=tp.local.threads)
    logits = np.concatenate([backend.predict(x[i : i + 256]) for i in range(0, n, 256)])
    if tp.local.output == "probabilities":
        with np.errstate(divide="ignore"):
            logits = np.log(logits)
    c = confidence(logits)
    metric = tp.gate.metric.value
    if metric == "max_prob":
        score = c.max_prob
    elif metric == "margin":
        score = c.margin
    else:
        score = c.entropy / np.log(logits.shape[1])
    edge_ok = c.top1 == y
    try:
        cloud_ok = _cloud_top1(st.endpoints, st.curve, st.cloud_model, x) == y
    except TandemError as e:
        say(f"threshold sweep skipped: the cloud did not answer ({e.message})")
        return None
    if isinstance(spec.threshold, list):
        grid = sorted(set(spec.threshold))
    else:
        r = spec.threshold
        grid = list(np.linspace(r.start, r.stop, r.steps))
    grid = sorted(set(grid) | {tp.gate.threshold})
    h_edge, h_cloud = first.stats.lat.get("edge"), first.stats.lat.get("cloud")
    points = []
    for t in grid:
        # ConfidenceGate.accepts, vectorised: NaN is never accepted
        accepted = score <= t if metric == "entropy" else score >= t
        esc = ~accepted
        e = float(esc.mean())
        parts = [(1 - e, h_edge), (e, h_cloud)]
        p95 = (
            None
            if any(w > 0 and h is None for w, h in parts)
            else mixture_quantile([(w, h) for w, h in parts if h is not None or w == 0], 0.95)
        )
        points.append(
            {
                "threshold": float(t),
                "accuracy": float(np.where(esc, cloud_ok, edge_ok).mean()),
                "escalation_rate": e,
                "p95_ms": p95,
            }
        )
    chosen = None
    tgt = spec.target
    if tgt is not None:
        if tgt.accuracy is not None:
            ok = [i for i, p in enumerate(points) if p["accuracy"] >= tgt.accuracy]
            best = min(ok, key=lambda i: (points[i]["escalation_rate"], points[i]["threshold"]),
                       default=None)  # fmt: skip
        else:
            ok = [i for i, p in enumerate(points) if p["escalation_rate"] <= tgt.escalation_rate]
            best = max(ok, key=lambda i: (points[i]["accuracy"], -points[i]["threshold"]),
                       default=None)  # fmt: skip
        chosen = best

    def q95(h: Any) -> float | None:
        return None if h is None else mixture_quantile([(1.0, h)], 0.95)

    return {
        "metric": metric,
        "method": "trace",
        "items": n,
        "current": float(tp.gate.threshold),
        "points": points,
        "pareto": pareto(points),
        "target": None if tgt is None else tgt.model_dump(exclude_none=True),
        "chosen": chosen,
        "edge_only": {"accuracy": float(edge_ok.mean()), "p95_ms": q95(h_edge)},
        "cloud_only": {"accuracy": float(cloud_ok.mean()), "p95_ms": q95(h_cloud)},
    }


def rtt_sweep(levels: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Latency per tier against the link's round trip: the first load point of each profile."""
    seen: dict[str, int] = {}
    for i, lv in enumerate(levels):
        seen.setdefault(lv["network"]["profile"], i)
    if len(seen) < 2:
        return None
    out = []
    for prof, i in seen.items():
        lv = levels[i]
        p = {k: None for k in (*TIERS, "all")}
        p50, p95 = dict(p), dict(p)
        for k, t in [*lv["tiers"].items(), ("all", lv["all"])]:
            p50[k], p95[k] = t["latency_ms"]["p50"], t["latency_ms"]["p95"]
        out.append({"profile": prof, "rtt_ms": lv["network"]["rtt_ms"], "level": i,
                    "p50_ms": p50, "p95_ms": p95})  # fmt: skip
    return sorted(out, key=lambda r: r["rtt_ms"])


def knee(points: list[dict[str, Any]]) -> int | None:
    """The last point before the system saturates: after it, throughput grows by under 5% or
    p99 grows faster than throughput does (relative)."""
    for i in range(1, len(points)):
        a, b = points[i - 1], points[i]
        if not a["throughput"] or a["p99_ms"] is None or b["p99_ms"] is None:
            continue
        gain = b["throughput"] / a["throughput"] - 1
        worse = b["p99_ms"] / a["p99_ms"] - 1
        if gain < 0.05 or worse > gain:
            return i - 1
    return None


def load_sweep(sc: Scenario, levels: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Throughput and p99 per load point, on the first network profile."""
    n = len(sc.load.points)
    if n < 2:
        return None
    key = "concurrency" if sc.load.mode == "closed" else "rate"
    pts = [
        {"x": float(lv["load"][key]), "level": i, "throughput": lv["throughput"],
         "p99_ms": lv["all"]["latency_ms"]["p99"]}
        for i, lv in enumerate(levels[:n])
    ]  # fmt: skip
    return {"mode": sc.load.mode, "x": key, "points": pts, "knee": knee(pts)}


# ---------------------------------------------------------------------- the whole run
def machine_json() -> dict[str, Any]:
    """The machine, the package versions and the git revision, for the results file."""
    m = machine()
    m["platform"] = platform.platform()
    pk = {}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            pk[name] = metadata.version(name)
    m["packages"] = pk
    m["git"] = None
    here = Path(__file__).resolve().parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        rev = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        m["git"] = rev + ("-dirty" if dirty else "") if rev else None
    return m


def run_scenario(
    sc: Scenario,
    out: Path,
    *,
    file: str | None = None,
    say: Say = lambda _: None,
    tick: Callable[[str], Tick | None] = lambda _: None,
) -> dict[str, Any]:
    """Run ``sc`` and return its results (schema ``tandem-bench/1``); logs go to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for log in ("worker.log", "netem.log"):  # this run's logs only
        (out / log).unlink(missing_ok=True)
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        st = setup(sc, stack, out, say)
        levels, runs = run_levels(sc, st, out, say, tick)
        sweep = threshold_sweep(sc, st, runs[0], say)
    return {
        "schema": SCHEMA,
        "scenario": {
            "name": sc.name,
            "file": file,
            "description": sc.description,
            "task": sc.task.source,
            "kind": st.items.kind,
            "load_mode": sc.load.mode,
            "raw": sc.model_dump(mode="json", by_alias=True),
        },
        "machine": machine_json(),
        "started_at": started.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "duration_s": time.perf_counter() - t0,
        "levels": levels,
        "threshold_sweep": sweep,
        "rtt_sweep": rtt_sweep(levels),
        "load_sweep": load_sweep(sc, levels),
    }


def write_outputs(
    results: dict[str, Any],
    out: Path,
    json_out: Path | None = None,
    *,
    plots: bool = True,
    html: bool = True,
) -> list[Path]:
    """``out/results.json`` (and ``json_out``), then the PNG plots and ``report.html``; returns
    the files written. The JSON goes first: a failure drawing cannot lose the measurements."""
    text = json.dumps(json_safe(results), indent=1, allow_nan=False) + "\n"
    written = [out / "results.json"]
    written[0].write_text(text)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text)
        written.append(json_out)
    if plots:
        from tandem.bench.html_report import write_html
        from tandem.bench.plots import write_plots

        pngs = write_plots(results, out)
        written += list(pngs.values())
        if html:
            written.append(write_html(results, pngs, out / "report.html"))
    return written
