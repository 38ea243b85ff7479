"""Hot-swapping edge models: a task serves its model store's current version and moves to a
new one while requests run (:class:`ModelSwapper`), for classification and generation tasks.

A swap builds a complete new task (load, check it against the serving one, warm up) off the
request path, then replaces the one reference in the runtime's task table. A request takes the
task object once at its start and uses it to the end, so requests in flight finish on the old
version, and no request mixes two. The old task is then *retired*: a generation task closes
its model once its last answer ends (:meth:`~tandem.edge.generate_task.GenerationTask.retire`);
a classification task's ONNX session is freed with the last request that holds it. A version
that fails to load or check is refused: logged, counted
(``stats()["tasks"][name]["swaps"]["refused"]``), never tried again, and the old version keeps
serving. Rollback is the store's (:meth:`~tandem.runtime.model_store.ModelStore.rollback`)
followed by a reload.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from pydantic import ValidationError

from tandem.router.policy import (
    CalibrationRecord,
    GenerateTaskPolicy,
    LearnedGateSpec,
    TaskPolicy,
)
from tandem.router.routing import RoutingStats
from tandem.runtime.errors import ConfigError
from tandem.runtime.model_store import ModelStore, ModelVersion

log = logging.getLogger(__name__)

AnyPolicy = TypeVar("AnyPolicy", TaskPolicy, GenerateTaskPolicy)


class SwappableTask(Protocol):
    name: str
    serving: str | None
    stats: RoutingStats
    versions: dict[str, str]


T = TypeVar("T", bound=SwappableTask)
BuildTask = Callable[[str, Any, str | None, RoutingStats], T]


class ModelSwapper(Generic[T]):
    """The model stores of a runtime's tasks of one kind, and the one place that replaces a
    task in ``tasks`` (the runtime's table). ``build(name, policy, serving, stats)`` opens a
    task (the runtime's clients, callbacks and seed); ``check(old, new)`` raises when the new
    one cannot take the old one's requests; ``retire(old)`` runs once it is replaced."""

    def __init__(
        self,
        tasks: dict[str, T],
        build: BuildTask,
        check: Callable[[T, T], None],
        retire: Callable[[T], None] = lambda _t: None,
    ) -> None:
        self.tasks = tasks
        self.build = build
        self.check = check
        self.retire = retire
        self.stores: dict[str, ModelStore] = {}
        self.policies: dict[str, Any] = {}  # each task's policy as the file says
        self._refused: dict[str, set[str]] = {}
        self._store_errors: dict[str, str] = {}  # task -> the store error last logged
        self._lock = threading.Lock()  # one swap at a time; requests never take it
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def open(self, name: str, tp: Any) -> T:
        """Open a task at start: the store's current version when ``local.store`` names a
        store that has one (unreadable: logged, ``local.path`` serves), else ``local.path``."""
        self.policies[name] = tp
        serving = None
        if tp.local.store is not None:
            store = self.stores[name] = ModelStore(tp.local.store)
            self._refused[name] = set()
            try:
                mv = store.current()
                if mv is not None:
                    tp, serving = policy_for_version(tp, mv), mv.version
            except ConfigError as e:
                log.error("task %s: model store refused, serving local.path: %s", name, e)
        return self.build(name, tp, serving, RoutingStats(len(getattr(tp, "tiers", ()))))

    def reload(self) -> dict[str, str]:
        """Swap each task whose store's current version changed; task -> what it serves."""
        for name, store in self.stores.items():
            self._reload(name, store)
        return {name: t.serving or t.versions["edge"] for name, t in self.tasks.items()}

    def _reload(self, name: str, store: ModelStore) -> None:
        try:
            want = store.current_name()  # one small read: cheap enough to poll
        except ConfigError as e:
            if self._store_errors.get(name) != str(e):  # once per error, not once per poll
                log.error("task %s: cannot read the model store: %s", name, e)
            self._store_errors[name] = str(e)
            return
        self._store_errors.pop(name, None)
        if want is None or want == self.tasks[name].serving or want in self._refused[name]:
            return
        with self._lock:
            old = self.tasks[name]
            if want == old.serving:
                return
            try:
                new = self.build(
                    name, policy_for_version(self.policies[name], store.get(want)), want, old.stats
                )
                self.check(old, new)
            except Exception as e:  # any failure to load: the old version keeps serving
                self._refused[name].add(want)
                old.stats.swaps_refused += 1
                log.error(
                    "task %s: model version %s refused, %s keeps serving: %s",
                    name,
                    want,
                    old.versions["edge"],
                    e,
                    extra={"task": name, "version": want},
                )
                return
            self._install(name, new)

    def swap(
        self, name: str, path: str | Path, gate: Mapping[str, Any] | None, version: str | None
    ) -> str:
        """Serve the model file at ``path`` for task ``name`` (see
        :meth:`tandem.edge.EdgeRuntime.swap_model`); raises, keeping the old model, when it
        does not load or fit."""
        with self._lock:
            old = self.tasks[name]
            try:
                tp = self.policies[name]
                local = tp.local.model_copy(update={"path": Path(path), "version": version})
                tp = with_gate(tp.model_copy(update={"local": local}), gate, where=str(path))
                new = self.build(name, tp, version, old.stats)
                self.check(old, new)
            except Exception:
                old.stats.swaps_refused += 1
                raise
            self._install(name, new)
            return new.versions["edge"]

    def _install(self, name: str, new: T) -> None:
        old = self.tasks[name]
        self.tasks[name] = new  # one reference: requests that took the old one finish on it
        new.stats.swaps += 1
        self.retire(old)
        log.info(
            "task %s: now serving %s (was %s)",
            name,
            new.versions["edge"],
            old.versions["edge"],
            extra={"task": name, "version": new.versions["edge"]},
        )

    def start(self) -> None:
        """Poll the stores of the tasks with ``local.watch_s`` on a daemon thread."""
        every = {
            n: tp.local.watch_s
            for n, tp in self.policies.items()
            if n in self.stores and tp.local.watch_s is not None
        }
        if every:
            self._watcher = threading.Thread(
                target=self._watch, args=(every,), name="tandem-model-watch", daemon=True
            )
            self._watcher.start()

    def _watch(self, every_s: dict[str, float]) -> None:
        due = dict.fromkeys(every_s, 0.0)
        while not self._stop.wait(min(every_s.values())):
            now = time.monotonic()
            for name, period in every_s.items():
                if now >= due[name]:
                    due[name] = now + period
                    try:
                        self._reload(name, self.stores[name])
                    except Exception:  # the watcher must outlive any one bad check
                        log.exception("task %s: model store check failed", name)

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=10)


def policy_for_version(tp: AnyPolicy, mv: ModelVersion) -> AnyPolicy:
    """``tp`` serving a model store version: its file, its version (``"v0003:<sha256[:12]>"``),
    its calibrated gate settings (:func:`with_gate`) and its calibration record (the drift
    alarm's baseline) — unless the policy's own ``calibration`` record names this version's
    model (``tandem calibrate --write`` on the version being served): then the policy's gate is
    the newer word and stays. Raises :class:`ConfigError` when the model file is not the one
    published (sha256) or the version's meta.json does not validate."""
    mv.verify()
    where = str(mv.path.parent / "meta.json")
    sha = str(mv.meta.get("sha256", ""))[:12]
    label = f"{mv.version}:{sha}"
    tp = tp.model_copy(
        update={"local": tp.local.model_copy(update={"path": mv.path, "version": label})}
    )
    if tp.calibration is not None and sha and sha in tp.calibration.models.get("edge", ""):
        return tp  # calibrated for exactly this model, after it was published
    tp = with_gate(tp, mv.gate, where=where)
    cal = mv.meta.get("calibration")
    if isinstance(cal, dict):
        try:
            tp = tp.model_copy(update={"calibration": CalibrationRecord.model_validate(cal)})
        except ValidationError as e:
            raise ConfigError(f"{where}: the version's calibration is not valid: {e}") from None
    return tp


def with_gate(tp: AnyPolicy, overrides: Mapping[str, Any] | None, *, where: str) -> AnyPolicy:
    """``tp`` with gate settings calibrated for a model (a confidence gate: ``threshold``,
    ``temperature``, ``metric``; a token gate: ``threshold``, ``metric``, ``quantile``; a
    learned gate only ``threshold``); other keys are ignored."""
    if not overrides:
        return tp
    spec_type = type(tp.gate)
    learned = isinstance(tp.gate, LearnedGateSpec)
    keys = {"threshold"} if learned else set(spec_type.model_fields) - {"type"}
    g = tp.gate.model_dump()
    g.update({k: v for k, v in overrides.items() if k in keys and v is not None})
    try:
        gate = spec_type.model_validate(g)
    except ValidationError as e:
        raise ConfigError(f"{where}: gate settings {dict(overrides)} are not valid: {e}") from None
    return tp.model_copy(update={"gate": gate})
