"""``tandem bench run``'s set-up: what a scenario sends (its items), to which policy, and the
cloud behind it — worker processes started on loopback, or running workers by address, each
checked before anything is measured — and the calls that drive an
:class:`~tandem.edge.EdgeRuntime` with one item and say how it answered."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandem.bench.ports import free_ports
from tandem.bench.scenario import Scenario
from tandem.bench.stats import GenSample, Outcome
from tandem.runtime.errors import ConfigError, TandemError

Say = Callable[[str], None]


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
    ops: list[str] = field(default_factory=list)  # ops HTTP URLs of the workers started here


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


def _start_worker(
    cfg: Any, stack: contextlib.ExitStack, log: Path, say: Say, ops: list[str] | None = None
) -> str:
    """Start a worker for the run; ``ops``: a list to append its ops HTTP URL to (the worker
    then serves /metrics on a free loopback port)."""
    from tandem.cloud.config import with_http
    from tandem.cloud.process import WorkerProcess

    if ops is not None:
        (port,) = free_ports()
        cfg = with_http(cfg, f"127.0.0.1:{port}")
        ops.append(f"http://127.0.0.1:{port}")
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
    sc: Scenario,
    stack: contextlib.ExitStack,
    out: Path,
    models: Path,
    model: str,
    say: Say,
    ops: list[str],
) -> list[str]:
    """A bundled task's cloud: a worker started here serving ``model`` (one thread), or the
    scenario's endpoints."""
    from tandem.cloud.config import WorkerConfig

    if sc.starts_workers:
        cfg = WorkerConfig(bind="tcp://127.0.0.1:*", models_dir=models, models=[model], threads=1)
        return [_start_worker(cfg, stack, out / "worker.log", say, _ops(sc, ops))]
    if not sc.cloud.targets:
        raise ConfigError(
            f"the {sc.task.source} task needs a cloud: set cloud.start or cloud.endpoint"
        )
    check_cloud(sc.cloud.targets, None)
    return list(sc.cloud.targets)


def _digits_setup(sc: Scenario, stack: contextlib.ExitStack, out: Path, say: Say) -> Setup:
    from tandem.reference.digits import load_workload
    from tandem.reference.models import CLOUD, EDGE, LABELS, build_reference_models
    from tandem.runtime.manifest import load_manifest

    models = build_reference_models(progress=say)
    manifest = load_manifest(models)
    data = load_workload(manifest.seed or 0)
    # the test split is ordered by corruption severity: a seeded shuffle, so any prefix (the
    # items a short level reaches, the sweep's items) is a fair sample
    order = np.random.default_rng(0).permutation(len(data.test))[: sc.task.limit]
    items = Items("classify", x=data.test.x[order], y=data.test.y[order])
    ops: list[str] = []
    endpoints = _reference_cloud(sc, stack, out, models, CLOUD, say, ops)
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
    policy = {"version": 1, "tasks": {"digits": task}}
    return Setup(items, policy, "digits", endpoints, None, CLOUD, ops)


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
    cloud_ok = cloud_top1(endpoints, None, model, x) == y
    return pick_threshold(routing_curve(c.max_prob, c.top1 == y, cloud_ok), 0.9)


def cloud_top1(
    endpoints: list[str], curve: tuple[Path, Path] | None, model: str, x: np.ndarray
) -> np.ndarray:
    """The cloud model's top class for every row of ``x`` (10 s a request of 256 rows)."""
    from tandem.reference.models import cloud_logits
    from tandem.runtime.client import CloudClient

    with CloudClient(endpoints, curve=curve) as client:
        return cloud_logits(client, model, x, chunk=256, timeout_s=10.0).argmax(axis=1)


def _sort_setup(sc: Scenario, stack: contextlib.ExitStack, out: Path, say: Say) -> Setup:
    from tandem.reference import lm_task
    from tandem.reference.lm_models import CLOUD, EDGE_GGUF, build_llm_models
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
    ops: list[str] = []
    endpoints = _reference_cloud(sc, stack, out, models, CLOUD, say, ops)
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
    return Setup(
        items, {"version": 1, "tasks": {"sort": task}}, "sort", endpoints, None, CLOUD, ops
    )


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
    ops: list[str] = []
    endpoints = sc.cloud.targets or (tp.cloud.all_endpoints if tp.cloud else [])
    curve = tp.cloud.curve_keys if tp.cloud else None
    if sc.cloud.client_key is not None and sc.cloud.server_key is not None:
        curve = (sc.cloud.client_key, sc.cloud.server_key)
    if sc.starts_workers:
        assert sc.cloud.worker is not None
        cfg = load_worker_config(sc.cloud.worker)
        endpoints = [_start_worker(cfg, stack, out / "worker.log", say, _ops(sc, ops))]
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
    return Setup(items, policy, name, endpoints, curve, model, ops)


def _ops(sc: Scenario, ops: list[str]) -> list[str] | None:
    return ops if sc.output.metrics else None


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
