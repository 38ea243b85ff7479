"""The cloud worker's config file (``tandem cloud serve --config worker.yaml``).

.. code-block:: yaml

    bind: tcp://127.0.0.1:5555       # "tcp://127.0.0.1:*" picks a free port
    models_dir: models               # holds manifest.json; relative to this file
    models: [digits-cloud]           # optional subset of the manifest (default: all)
    experts: {digits-moe: [0, 1, 2, 3]}  # optional: host only these experts of an MoE model
    threads: 0                       # ONNX Runtime intra-op threads (0 = all cores)
    batching: {max_batch: 64, max_wait_us: 500}
    limits: {max_message_bytes: 67108864}
    drain: {grace_ms: 200}
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from tandem.runtime.config import ConfigPath, StrictModel, load_config
from tandem.runtime.wire import WireLimits

_DEFAULT_LIMITS = WireLimits()


class BatchingSpec(StrictModel):
    """Requests for one model are batched until ``max_batch`` rows are waiting or the oldest
    has waited ``max_wait_us``; then they run as one ONNX Runtime call."""

    max_batch: int = Field(default=64, ge=1, le=65536)
    max_wait_us: int = Field(default=500, ge=0, le=10_000_000)


class LimitsSpec(StrictModel):
    max_message_bytes: int = Field(default=_DEFAULT_LIMITS.max_message_bytes, ge=1024)
    max_frames: int = Field(default=_DEFAULT_LIMITS.max_frames, ge=2)
    max_array_elements: int = Field(default=_DEFAULT_LIMITS.max_array_elements, ge=1)
    max_depth: int = Field(default=_DEFAULT_LIMITS.max_depth, ge=1)
    max_tags: int = Field(default=_DEFAULT_LIMITS.max_tags, ge=0)

    def wire_limits(self) -> WireLimits:
        return WireLimits(**self.model_dump())


class DrainSpec(StrictModel):
    """On SIGTERM/SIGINT: finish the queued work, then keep answering new requests with
    ``ShuttingDown`` for ``grace_ms`` so clients learn why, then exit 0."""

    grace_ms: int = Field(default=200, ge=0)


class WorkerConfig(StrictModel):
    bind: str = "tcp://127.0.0.1:5555"
    models_dir: ConfigPath | None = None  # None: no models (health and echo only)
    models: list[str] | None = None
    # Expert sharding: for an MoE model, the experts this worker hosts (default: all of them).
    experts: dict[str, list[int]] | None = None
    threads: int = Field(default=0, ge=0)
    batching: BatchingSpec = BatchingSpec()
    limits: LimitsSpec = LimitsSpec()
    drain: DrainSpec = DrainSpec()


def load_worker_config(path: str | Path) -> WorkerConfig:
    p = Path(path)
    return load_config(p, WorkerConfig, base_dir=p.parent)
