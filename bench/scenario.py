"""``tandem bench`` scenario files: YAML, validated like policies, trusted afterwards.

.. code-block:: yaml

    version: 1
    description: digits cascade over an LTE link
    task:
      source: digits          # digits | sort (bundled) | npy | jsonl (your own inputs)
      limit: 2000             # use at most this many items (cycled under load)
    policy:                   # optional: the bundled tasks get a reference policy
      path: policy.yaml       # your policy (relative to this file)
      task: digits            # which of its tasks to drive (default: the only one)
      threshold: 0.8          # override the gate threshold (default: the policy's / calibrated)
    cloud:
      start: true             # start workers on loopback (bundled tasks; or `worker: cfg.yaml`)
    network:
      profile: lte            # lan | wifi | lte | congested | offline | {delay_ms: ..., ...}
      outages: [[3, 5]]       # link down from 3 s to 5 s after each level starts
      sweep: [lan, wifi, lte] # one measurement per profile (latency vs RTT)
    load:
      mode: closed            # closed: `concurrency` clients; open: Poisson arrivals at `rate`
      concurrency: [1, 2, 4]  # a list is a sweep (throughput vs p99)
      window_s: 2             # measurement windows; stop when 3 agree within stability_pct
    sweep:
      threshold: {steps: 41}  # accuracy vs escalation vs p95 over gate thresholds
      target: {accuracy: 0.95}

Relative paths are resolved against the scenario file's folder. Unknown keys are errors, and
every error names the file, the key and what was expected.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, StrictInt, model_validator

from tandem.router.policy import Endpoint, Probability
from tandem.runtime.config import ConfigPath, StrictModel, load_config, validate_config
from tandem.runtime.errors import ConfigError

PROFILE_NAMES = ("lan", "wifi", "lte", "congested", "offline")


def _profile_name(v: str) -> str:
    if v not in PROFILE_NAMES:
        raise ValueError(f"expected one of {', '.join(PROFILE_NAMES)} or a mapping")
    return v


ProfileName = Annotated[str, AfterValidator(_profile_name)]


class TaskSpec(StrictModel):
    """What to send. ``digits``: the held-out corrupted digits (labels known); ``sort``: the
    held-out sorting prompts (answers known); ``npy``: ``inputs`` (N, ...) rows and optionally
    ``labels`` (N,) class indices; ``jsonl``: one JSON object a line, ``{"prompt": str,
    "answer": str?}`` for a generation task or ``{"input": [...], "label": int?}`` for a
    classifier."""

    source: Literal["digits", "sort", "npy", "jsonl"]
    inputs: ConfigPath | None = None  # npy
    labels: ConfigPath | None = None  # npy
    path: ConfigPath | None = None  # jsonl
    limit: int = Field(default=2000, ge=1, le=10_000_000)
    max_tokens: int | None = Field(default=None, ge=1, le=1 << 16)  # generation tasks

    @model_validator(mode="after")
    def _files(self) -> TaskSpec:
        if self.source == "npy" and self.inputs is None:
            raise ValueError("source 'npy' needs 'inputs' (an .npy file of input rows)")
        if self.source == "jsonl" and self.path is None:
            raise ValueError("source 'jsonl' needs 'path' (a .jsonl file)")
        if self.source != "npy" and (self.inputs or self.labels):
            raise ValueError("'inputs' and 'labels' are for source 'npy'")
        if self.source != "jsonl" and self.path is not None:
            raise ValueError("'path' is for source 'jsonl'")
        return self

    @property
    def bundled(self) -> bool:
        return self.source in ("digits", "sort")


class PolicyRef(StrictModel):
    path: ConfigPath | None = None  # default (bundled tasks only): the reference policy
    task: str | None = None
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    deadline_ms: int | None = Field(default=None, ge=1, le=3_600_000)


class CloudSpec(StrictModel):
    """Where escalations go. ``start``: start a worker process on loopback — the reference
    cloud model for a bundled task, or the worker config file ``worker`` (as for ``tandem cloud
    serve``). Otherwise the policy's own endpoints, or ``endpoint``/``endpoints`` here (running
    workers; ``server_key``/``client_key`` for CurveZMQ, as in a policy)."""

    start: bool | None = None  # default: true for bundled tasks without a policy file
    worker: ConfigPath | None = None
    endpoint: Endpoint | None = None
    endpoints: list[Endpoint] | None = Field(default=None, min_length=1, max_length=64)
    server_key: ConfigPath | None = None
    client_key: ConfigPath | None = None

    @model_validator(mode="after")
    def _consistent(self) -> CloudSpec:
        if self.endpoint is not None and self.endpoints is not None:
            raise ValueError("give 'endpoint' or 'endpoints', not both")
        if self.start and (self.endpoint or self.endpoints):
            raise ValueError("'start' starts workers here; it cannot go with 'endpoint(s)'")
        if self.worker is not None and self.start is False:
            raise ValueError("'worker' is a config for a worker to start; 'start' is false")
        if (self.server_key is None) != (self.client_key is None):
            raise ValueError("give both 'server_key' and 'client_key' (CurveZMQ), or neither")
        return self

    @property
    def targets(self) -> list[str] | None:
        if self.endpoint is not None:
            return [self.endpoint]
        return list(self.endpoints) if self.endpoints else None


class LinkSpec(StrictModel):
    """A user-defined link: one-way ``delay_ms`` ± ``jitter_ms`` (uniform, never reordering),
    ``bandwidth_mbit`` each way (None: unlimited), or ``down`` for no link at all."""

    name: str = Field(default="custom", min_length=1, max_length=40)
    delay_ms: float = Field(default=0.0, ge=0.0, le=60_000.0)
    jitter_ms: float = Field(default=0.0, ge=0.0, le=60_000.0)
    bandwidth_mbit: float | None = Field(default=None, gt=0.0, le=1e6)
    down: bool = False


Profile = ProfileName | LinkSpec


class NetworkSpec(StrictModel):
    """The emulated link between the edge and the cloud (a relay process on loopback).
    ``profile: none`` (the default) sends straight to the workers. ``outages``: ``[t1, t2]``
    pairs, seconds from each level's start, when the link is down. ``sweep``: profiles to
    measure in turn (each a level)."""

    profile: Profile | Literal["none"] = "none"
    outages: list[tuple[float, float]] = Field(default_factory=list, max_length=64)
    sweep: list[Profile] | None = Field(default=None, min_length=1, max_length=16)
    seed: int = 0

    @model_validator(mode="after")
    def _outages(self) -> NetworkSpec:
        for t1, t2 in self.outages:
            if not 0 <= t1 < t2:
                raise ValueError(f"outage [{t1}, {t2}]: expected 0 <= start < end (seconds)")
        if self.sweep is not None and self.profile != "none":
            raise ValueError("give 'profile' (one link) or 'sweep' (several), not both")
        if self.outages and self.sweep is None and self.profile == "none":
            raise ValueError("'outages' cut the emulated link: give a 'profile' too")
        names = [p if isinstance(p, str) else p.name for p in self.sweep or []]
        if len(set(names)) != len(names):
            raise ValueError("'sweep' lists a link twice (give user-defined links a 'name')")
        return self

    @property
    def profiles(self) -> list[Profile | None]:
        """The links to measure, in order (None: no relay)."""
        if self.sweep is not None:
            return list(self.sweep)
        return [None if self.profile == "none" else self.profile]


def _rates(v: float | list[float]) -> list[float]:
    vals = v if isinstance(v, list) else [v]
    if not vals or any(not (math.isfinite(x) and 1e-3 <= x <= 1e6) for x in vals):
        raise ValueError("expected a rate in 0.001 .. 1e6 per second, or a list of them")
    if len(set(vals)) != len(vals):
        raise ValueError("a rate is listed twice")
    return vals


class LoadSpec(StrictModel):
    """How hard to push. ``closed``: ``concurrency`` clients, each sending its next request
    when its answer arrives. ``open``: Poisson arrivals at ``rate`` per second, latency counted
    from each request's *intended* send time (so queueing in the tool is not hidden), at most
    ``max_in_flight`` at once. A list is a sweep. Each level warms up for ``warmup_s``, then
    measures ``window_s`` windows (longer, up to 5×, until each holds ``min_window_answers``:
    a p99 needs samples) until the last ``stable_windows`` agree on throughput and
    p99 within ``stability_pct`` percent (perf_analyzer's rule), at least ``min_windows`` and
    at most ``max_windows``; at most ``max_requests`` requests a level."""

    mode: Literal["closed", "open"] = "closed"
    concurrency: Annotated[StrictInt | list[StrictInt], Field(union_mode="left_to_right")] = 1
    rate: float | list[float] | None = None
    max_in_flight: int = Field(default=64, ge=1, le=1024)
    warmup_s: float = Field(default=1.0, ge=0.0, le=600.0)
    window_s: float = Field(default=2.0, gt=0.0, le=600.0)
    min_window_answers: int = Field(default=100, ge=1, le=1_000_000)
    min_windows: int = Field(default=3, ge=1, le=1000)
    max_windows: int = Field(default=10, ge=1, le=100)
    stable_windows: int = Field(default=3, ge=2, le=100)
    stability_pct: float = Field(default=10.0, gt=0.0, le=100.0)
    max_requests: int = Field(default=1_000_000, ge=1, le=100_000_000)
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> LoadSpec:
        c = self.concurrency if isinstance(self.concurrency, list) else [self.concurrency]
        if not c or any(not 1 <= x <= 1024 for x in c):
            raise ValueError("'concurrency': expected an integer 1..1024 or a list of them")
        if len(set(c)) != len(c):
            raise ValueError("'concurrency' lists a value twice")
        if self.mode == "open":
            if self.rate is None:
                raise ValueError("mode 'open' needs 'rate' (requests per second, or a list)")
            _rates(self.rate)
        elif self.rate is not None:
            raise ValueError("'rate' is for mode 'open'; mode 'closed' uses 'concurrency'")
        if self.max_windows < max(self.min_windows, self.stable_windows):
            raise ValueError("'max_windows' must be at least 'min_windows' and 'stable_windows'")
        return self

    @property
    def points(self) -> list[float]:
        """The load levels: concurrencies (closed) or rates (open)."""
        if self.mode == "open":
            assert self.rate is not None
            return _rates(self.rate)
        return [float(x) for x in (self.concurrency if isinstance(self.concurrency, list)
                                   else [self.concurrency])]  # fmt: skip


class ThresholdRange(StrictModel):
    start: float = Field(default=0.0, ge=0.0, le=1.0, alias="from")
    stop: float = Field(default=1.0, ge=0.0, le=1.0, alias="to")
    steps: int = Field(default=41, ge=2, le=1001)


class TargetSpec(StrictModel):
    accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    escalation_rate: float | None = Field(default=None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _one(self) -> TargetSpec:
        if (self.accuracy is None) == (self.escalation_rate is None):
            raise ValueError("give one of 'accuracy' (at least) or 'escalation_rate' (at most)")
        return self


class SweepSpec(StrictModel):
    """``threshold``: replay every item's edge and cloud outcome at each gate threshold (a
    list, or an evenly spaced range) — accuracy, escalation rate and p95 per threshold, the
    Pareto front, and the threshold that meets ``target``. ``items``: how many items."""

    threshold: Annotated[list[Probability], Field(min_length=1, max_length=1001)] | (
        ThresholdRange | None
    ) = None
    target: TargetSpec | None = None
    items: int = Field(default=1000, ge=10, le=1_000_000)


class OutputSpec(StrictModel):
    dir: ConfigPath | None = None  # default: bench-results/<name>
    plots: bool = True
    html: bool = True
    # Scrape the edge runtime's and the started workers' /metrics at the end of every level
    # into DIR/metrics/ (the workers this run starts get an ops HTTP port; the runtime, an
    # exporter on a free loopback port)
    metrics: bool = False


class Scenario(StrictModel):
    version: Literal[1] = 1
    name: str | None = Field(default=None, min_length=1, max_length=80, pattern=r"^[\w.-]+$")
    description: str = Field(default="", max_length=4000)
    task: TaskSpec
    policy: PolicyRef = PolicyRef()
    cloud: CloudSpec = CloudSpec()
    network: NetworkSpec = NetworkSpec()
    load: LoadSpec = LoadSpec()
    sweep: SweepSpec = SweepSpec()
    output: OutputSpec = OutputSpec()

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        if not self.task.bundled and self.policy.path is None:
            raise ValueError("your own inputs need your policy: give 'policy.path'")
        if self.task.bundled and (self.policy.path or self.policy.task or self.cloud.worker):
            raise ValueError(
                f"the bundled '{self.task.source}' task brings its reference policy and worker: "
                "'policy.path', 'policy.task' and 'cloud.worker' are for your own inputs"
            )
        if self.cloud.worker is not None and self.cloud.targets:
            raise ValueError("'cloud.worker' starts a worker; it cannot go with 'endpoint(s)'")
        if self.cloud.start and not self.task.bundled and self.cloud.worker is None:
            raise ValueError("'cloud.start' with your own policy needs 'cloud.worker'")
        curve = self.cloud.server_key is not None
        if curve and any(p is not None for p in self.network.profiles):
            raise ValueError(
                "the network emulator relays plain ZeroMQ and cannot pass CurveZMQ: "
                "drop 'network' or the keys"
            )
        return self

    @property
    def starts_workers(self) -> bool:
        if self.cloud.start is not None:
            return self.cloud.start
        return self.cloud.worker is not None or (self.task.bundled and not self.cloud.targets)


def load_scenario(path: str | Path) -> Scenario:
    """Load and validate a scenario; raises :class:`~tandem.runtime.errors.ConfigError` naming
    every bad key."""
    p = Path(path)
    s = load_config(p, Scenario, base_dir=p.parent)
    return s if s.name else s.model_copy(update={"name": p.stem})


def scenario_from_dict(
    data: dict[str, Any], *, base_dir: str | Path = ".", source: str = "<scenario>"
) -> Scenario:
    s = validate_config(data, Scenario, source=source, base_dir=Path(base_dir))
    return s if s.name else s.model_copy(update={"name": "scenario"})


def bundled_scenarios() -> dict[str, Path]:
    """The example scenarios shipped with Tandem, by name."""
    folder = Path(__file__).resolve().parent / "scenarios"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def find_scenario(name_or_path: str) -> Path:
    """A scenario file: the path as given, or a bundled scenario's name."""
    p = Path(name_or_path)
    if p.exists():
        return p
    found = bundled_scenarios()
    if name_or_path in found:
        return found[name_or_path]
    raise ConfigError(
        f"{name_or_path}: no such file, and no bundled scenario of that name "
        f"(bundled: {', '.join(found) or 'none'})"
    )
