"""A generation task on the edge: its policy compiled into a local model, a router, a cloud
client and, in mode speculative, the γ controller its answers share (:class:`GenerationTask`).
One answer is :class:`tandem.edge.answer.Answer`; what callers hold while it streams,
:mod:`tandem.edge.answer_streams`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem.router.drift import DriftAlarm, DriftMonitor
from tandem.router.drift import warm_up as warm_up_drift
from tandem.router.policy import EscalationMode, GenerateTaskPolicy
from tandem.router.routing import RoutingStats, TaskRouter, TokenGate
from tandem.runtime.backends import open_backend
from tandem.runtime.client import CloudClient
from tandem.runtime.errors import ConfigError
from tandem.runtime.generation import GenerationBackend, LocalGenerationBackend
from tandem.runtime.manifest import api_key_from_env
from tandem.runtime.speculative import GammaController

if TYPE_CHECKING:
    pass


log = logging.getLogger(__name__)


@dataclass
class GenerationTask:
    """A generation task's policy compiled into the objects that serve it."""

    name: str
    policy: GenerateTaskPolicy
    router: TaskRouter
    backend: GenerationBackend
    client: CloudClient | None
    n_vocab: int
    versions: dict[str, str]
    controller: GammaController | None = None  # mode speculative: γ, shared by the answers
    vocab: str | None = None  # mode speculative: the local model's vocabulary digest, once
    stats: RoutingStats = field(default_factory=RoutingStats)
    drift: DriftMonitor | None = None
    serving: str | None = None  # the model store's version name (or swap_model's) it serves
    # answers running on this task's model; a retired task closes it when the last one ends
    _answers: int = 0
    _retired: bool = False
    _closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def enter(self) -> bool:
        """An answer starts on this task's model; False (nothing taken) once a swap has
        retired it: the caller takes the task that replaced it."""
        with self._lock:
            if self._retired:
                return False
            self._answers += 1
            return True

    def leave(self) -> None:
        """An answer on this task's model ended (finished, failed or closed)."""
        with self._lock:
            self._answers -= 1
            close = self._retired and self._answers == 0
        if close:
            self.close_model()

    def retire(self) -> None:
        """This task was replaced (a hot swap): close its model now if no answer runs on it,
        else when the last one ends."""
        with self._lock:
            self._retired = True
            close = self._answers == 0
        if close:
            self.close_model()

    @property
    def closed(self) -> bool:
        return self._closed

    def close_model(self) -> None:
        """Close the local model (once; later calls do nothing)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.backend.close()
        except Exception:  # the new version serves on; a failed close only leaks
            log.exception("task %s: closing the model failed", self.name)

    @property
    def gate(self) -> TokenGate:
        assert isinstance(self.router.gate, TokenGate)
        return self.router.gate

    def observe(self, stage: str, score: float | None, shadow: bool | None) -> None:
        """Count one finished answer and feed the drift alarm with the gate's score where
        the routing decision was made (None: a rule decided, nothing to observe)."""
        escalates = score is not None and not self.gate.accepts(score)
        self.stats.record(stage, escalates if shadow is not None else None, shadow)
        if self.drift is not None and score is not None:
            self.drift.observe(score, escalates)


def check_same_vocabulary(old: GenerationTask, new: GenerationTask) -> None:
    """A swapped-in language model must read the same token ids as the one it replaces when
    the cloud checks drafts against them (mode ``speculative``), so it must have as many."""
    if new.n_vocab != old.n_vocab and old.policy.mode is EscalationMode.SPECULATIVE:
        raise ConfigError(
            f"task {old.name!r}: the new model has {new.n_vocab} tokens, the serving one "
            f"{old.n_vocab}; mode speculative needs the cloud's vocabulary"
        )


def controller_for(policy: Any) -> GammaController:
    """The controller a task's ``speculative`` settings ask for."""
    spec = policy.speculative
    return GammaController(
        gamma=None if spec.gamma == "auto" else spec.gamma,
        max_gamma=spec.max_gamma,
        prior_acceptance=spec.prior_acceptance,
        fallback=spec.fallback,
    )


def open_generation_task(
    name: str,
    tp: GenerateTaskPolicy,
    client: CloudClient | None,
    *,
    on_drift: Callable[[DriftAlarm], None] | None = None,
    seed: int | None = None,
    stats: RoutingStats | None = None,
    serving: str | None = None,
) -> GenerationTask:
    """Load a generation task's local model (through the backend registry) and warm it up.
    A local OpenAI-compatible server (``format: openai``) gets its API key from the
    environment variable ``api_key_env`` names (unset: no key, with a warning). ``on_drift``:
    the drift alarm's callback (with ``tp.drift``); ``seed``: the audit sampling's RNG;
    ``stats``: the counters to carry on (a hot swap's), ``serving``: the store version."""
    local = tp.local
    options: dict = {"version": local.version, "threads": local.threads}
    source = local.path
    if local.format == "openai":
        if tp.mode is EscalationMode.SPECULATIVE:
            raise ConfigError(
                f"tasks.{name}: mode 'speculative' drafts on the local model's logits; "
                "local.format 'openai' (a server) has none: use a gguf or transformers model"
            )
        key = api_key_from_env(local.api_key_env, where=f"tasks.{name}.local.api_key_env")
        options.update(model=local.model, api_key=key)
        source = local.url
    elif local.format == "gguf":
        options.update(n_ctx=local.n_ctx, parallel=local.parallel)
    else:
        options["max_streams"] = local.parallel
    if local.chat_template is not None:
        options["chat_template"] = _read_template(name, local.format, local.chat_template)
    backend = open_backend(local.format, source, **options)
    try:
        backend.warm_up()
        speculative = tp.mode is EscalationMode.SPECULATIVE
        drift = None
        if tp.drift is not None:
            drift = DriftMonitor(tp.drift, tp.calibration, task=name, on_alarm=on_drift)
            warm_up_drift()
        return GenerationTask(
            name=name,
            policy=tp,
            router=TaskRouter(tp, seed=seed),
            drift=drift,
            backend=backend,
            client=client,
            n_vocab=backend.n_vocab if isinstance(backend, LocalGenerationBackend) else 0,
            versions={"edge": backend.version},
            controller=controller_for(tp) if speculative else None,
            stats=stats if stats is not None else RoutingStats(),
            serving=serving,
        )
    except BaseException:  # the task is not registered: nobody else would close its model
        backend.close()
        raise


def _read_template(task: str, fmt: str, path: Path) -> str:
    key = f"tasks.{task}.local.chat_template"
    if fmt == "openai":
        raise ConfigError(f"{key}: a server renders chats with its own template; remove it")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"{key}: cannot read {path}: {getattr(e, 'strerror', None) or e}"
        ) from None
