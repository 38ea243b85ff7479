"""The config file of Tandem on Ray Serve (``tandem cloud ray-serve --config ray.yaml``): which
models run as Ray Serve deployments, how each one scales, and the ingress that speaks Tandem's
wire protocol in front of them.

.. code-block:: yaml

    ray_address: null                # null: start a local Ray here; "auto", "HOST:6379": join one
    local_num_cpus: null             # a local Ray's CPUs (null: all of this machine's)
    models_dir: models               # holds manifest.json; the same path on every Ray node
    threads: 1                       # ONNX Runtime intra-op threads per replica
    deployments:
      - model: digits-cloud          # a model of the manifest: one deployment
        num_replicas: 2              # a fixed number of replicas, or:
      - model: digits-edge
        autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 2}
        max_ongoing_requests: 8      # per replica; more wait in the caller's queue
        max_queued_requests: 256     # that queue; over it: Overloaded (-1: unbounded)
        num_cpus: 0.5                # Ray CPUs reserved per replica
        batching: {max_batch_rows: 64, batch_wait_timeout_s: 0.0}
      - {model: digits-moe, experts: [0, 1, 2, 3]}   # expert shards of an MoE model:
      - {model: digits-moe, experts: [4, 5, 6, 7]}   #   one deployment each
    ingress:
      bind: tcp://127.0.0.1:5555
      max_inflight: 1024             # requests forwarded and not answered yet; over it: Overloaded
      max_inflight_bytes: 268435456
      max_tries: 3                   # sends of one request to replicas that died under it
      drain_timeout_s: 30
    limits: {max_rows: 1024, max_request_bytes: 16777216}   # as in the worker's config
    idempotency: {max_entries: 10000, max_bytes: 67108864, ttl_s: 60}
    socket: {sndhwm: 256, rcvhwm: 256, heartbeat_ivl_ms: 1000, heartbeat_timeout_ms: 3000}
    drain: {grace_ms: 200}
    curve: {secret_key: keys/worker.key_secret, allowed_clients: keys/clients}  # default: off
    insecure: false

``limits``, ``idempotency``, ``socket``, ``drain`` and ``curve`` mean what they mean in the
worker's config (:mod:`tandem.cloud.config`): a client cannot tell the ingress from a worker.
Paths are relative to this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tandem.cloud.config import (
    CurveSpec,
    DrainSpec,
    IdempotencySpec,
    LimitsSpec,
    SocketSpec,
    WorkerConfig,
)
from tandem.runtime.config import ConfigPath, StrictModel, load_config


class AutoscalingSpec(StrictModel):
    """Ray Serve's autoscaler for one deployment: it keeps about ``target_ongoing_requests``
    requests (running and queued) per replica, between ``min_replicas`` and ``max_replicas``
    replicas; ``upscale_delay_s`` / ``downscale_delay_s`` are how long the load must stay above
    or below the target before it adds or removes one (Serve's defaults: 30 s and 600 s)."""

    min_replicas: int = Field(default=1, ge=0, le=4096)
    max_replicas: int = Field(default=1, ge=1, le=4096)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)

    @model_validator(mode="after")
    def _min_at_most_max(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be at most max_replicas "
                f"({self.max_replicas})"
            )
        return self


class ReplicaBatchingSpec(StrictModel):
    """Ray Serve's ``@serve.batch`` in each replica: requests that arrive while the replica
    is busy form one backend call of at most ``max_batch_rows`` rows (a request with more rows
    runs alone); ``batch_wait_timeout_s`` > 0 holds a batch that long for more rows (0: run
    what is there, the worker's default)."""

    max_batch_rows: int = Field(default=64, ge=1, le=65536)
    batch_wait_timeout_s: float = Field(default=0.0, ge=0, le=10)


class DeploymentSpec(StrictModel):
    """One Ray Serve deployment (its own Serve application, named ``name``): the replicas of one
    model of the manifest, or of one expert shard of an MoE model (``experts``). A replica
    loads its model the way a worker does (digests checked, warmed up)."""

    model: str = Field(min_length=1, max_length=128)
    name: str | None = Field(default=None, min_length=1, max_length=128, pattern=r"^[\w.-]+$")
    experts: list[int] | None = Field(default=None, min_length=1)
    num_replicas: int | None = Field(default=None, ge=1, le=4096)
    autoscaling: AutoscalingSpec | None = None
    # Requests one replica runs or holds at once; the rest wait in the ingress's handle queue
    # (at most max_queued_requests, -1: no bound of Serve's own: the ingress's max_inflight).
    max_ongoing_requests: int = Field(default=8, ge=1, le=65536)
    max_queued_requests: int = Field(default=-1, ge=-1)
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    batching: ReplicaBatchingSpec = ReplicaBatchingSpec()

    @model_validator(mode="after")
    def _one_way_to_scale(self) -> DeploymentSpec:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("give num_replicas or autoscaling, not both")
        return self


class IngressSpec(StrictModel):
    """The ZeroMQ ROUTER socket in front of the deployments. ``max_inflight`` and
    ``max_inflight_bytes`` bound the requests forwarded to replicas and not answered yet (one
    more is answered ``Overloaded`` with a retry-after hint). A request whose replica dies
    under it is sent again, to another replica, inside its deadline, at most ``max_tries``
    times in all. On SIGTERM the ingress waits up to ``drain_timeout_s`` for what is in
    flight."""

    bind: str = "tcp://127.0.0.1:5555"
    max_inflight: int = Field(default=1024, ge=1, le=1 << 20)
    max_inflight_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    max_tries: int = Field(default=3, ge=1, le=16)
    drain_timeout_s: float = Field(default=30.0, ge=0)


class RayServeConfig(StrictModel):
    ray_address: str | None = None
    local_num_cpus: float | None = Field(default=None, gt=0)
    models_dir: ConfigPath
    threads: int = Field(default=1, ge=0)
    deployments: list[DeploymentSpec] = Field(min_length=1)
    ingress: IngressSpec = IngressSpec()
    limits: LimitsSpec = LimitsSpec()
    idempotency: IdempotencySpec = IdempotencySpec()
    socket: SocketSpec = SocketSpec()
    drain: DrainSpec = DrainSpec()
    curve: CurveSpec | None = None
    insecure: bool = False
    # Where Serve runs its HTTP proxies; Tandem's ingress needs none.
    proxy_location: Literal["Disabled", "HeadOnly", "EveryNode"] = "Disabled"

    @model_validator(mode="after")
    def _deployments_are_consistent(self) -> RayServeConfig:
        names: set[str] = set()
        by_model: dict[str, list[DeploymentSpec]] = {}
        for d in self.deployments:
            by_model.setdefault(d.model, []).append(d)
        for model, ds in by_model.items():
            whole = [d for d in ds if d.experts is None]
            if whole and len(ds) > 1:
                raise ValueError(
                    f"model {model!r} has {len(ds)} deployments: several are only allowed as "
                    "expert shards (each with its own experts list)"
                )
            hosted = [e for d in ds for e in d.experts or []]
            if len(hosted) != len(set(hosted)) or any(e < 0 for e in hosted):
                raise ValueError(
                    f"model {model!r}: expert shards must host distinct expert ids >= 0, "
                    f"got {sorted(hosted)}"
                )
        for i in range(len(self.deployments)):
            name = deployment_name(self, i)
            if name in names:
                raise ValueError(f"deployment name {name!r} is used twice")
            names.add(name)
        return self

    def worker_config(self, spec: DeploymentSpec) -> WorkerConfig:
        """What a replica of ``spec`` loads: the worker's loading, for one model (or shard)."""
        experts = {spec.model: spec.experts} if spec.experts is not None else None
        return WorkerConfig(
            models_dir=self.models_dir, models=[spec.model], experts=experts, threads=self.threads
        )

    def security_config(self) -> WorkerConfig:
        """The ingress's socket as a worker's, for the same security check."""
        return WorkerConfig(
            bind=self.ingress.bind, curve=self.curve, insecure=self.insecure, limits=self.limits
        )


def deployment_name(config: RayServeConfig, index: int) -> str:
    """The Serve application and deployment name of ``config.deployments[index]``: its
    ``name``, or the model's name (its ``-shardN`` for the Nth expert shard of a model)."""
    d = config.deployments[index]
    if d.name is not None:
        return d.name
    if d.experts is None:
        return d.model
    shard = sum(1 for e in config.deployments[:index] if e.model == d.model)
    return f"{d.model}-shard{shard}"


def load_ray_config(path: str | Path) -> RayServeConfig:
    p = Path(path)
    return load_config(p, RayServeConfig, base_dir=p.parent)
