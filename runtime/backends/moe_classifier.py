"""The backend for :class:`~tandem.runtime.moe.MoEClassifier` files (format ``tandem-moe``):
whole-model requests, and expert shards (``run_experts``)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tandem.kernels import all_finite
from tandem.runtime.errors import BackendError, BadRequest
from tandem.runtime.manifest import TensorSpec, sha256_file
from tandem.runtime.moe import MoEClassifier, run_segments


class MoEBackend:
    """Serves a :class:`MoEClassifier` file: ``predict`` for whole-model requests, and
    ``run_experts`` for expert shards (rows already grouped by expert)."""

    def __init__(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        version: str | None = None,
        threads: int = 0,
        experts: list[int] | None = None,
    ) -> None:
        """``experts``: host only these experts (an expert shard); the other experts' weights
        are dropped, and only ``run_experts`` for hosted experts is served."""
        self.path = Path(path)
        self.model = MoEClassifier.load(self.path)
        n_experts = self.model.config["n_experts"]
        self.hosted = sorted(set(experts)) if experts is not None else list(range(n_experts))
        if not self.hosted or any(not 0 <= e < n_experts for e in self.hosted):
            raise BackendError(f"experts to host must be ids in [0, {n_experts}), got {experts}")
        self._local = {e: i for i, e in enumerate(self.hosted)}
        with torch.no_grad():
            self._gate_up = self.model.moe.gate_up_proj[self.hosted].clone()
            self._down = self.model.moe.down_proj[self.hosted].clone()
        if len(self.hosted) < n_experts:  # a shard: free the rest
            self.model.moe.gate_up_proj = nn.Parameter(torch.empty(0))
            self.model.moe.down_proj = nn.Parameter(torch.empty(0))
        self.name = name or self.path.stem
        self.version = version or sha256_file(self.path)[:12]
        cfg = self.model.config
        self.input_spec = TensorSpec(name="x", dtype="float32", shape=[None, cfg["in_features"]])
        self.output_spec = TensorSpec(
            name="logits", dtype="float32", shape=[None, cfg["n_classes"]]
        )
        if threads:
            torch.set_num_threads(threads)

    def check_batch(self, batch: np.ndarray) -> np.ndarray:
        want = self.input_spec.shape[1]
        if batch.ndim != 2 or batch.shape[1] != want:
            raise BadRequest(
                f"model {self.name!r} takes input shaped (N, {want}), got {batch.shape}"
            )
        if batch.dtype.kind not in "fiu":
            raise BadRequest(f"model {self.name!r} takes float32, got {batch.dtype}")
        batch = np.asarray(batch, dtype=np.float32)
        if not all_finite(batch):
            raise BadRequest(f"model {self.name!r}: input holds NaN or inf")
        return batch

    def warm_up(self) -> None:
        if self.is_shard:
            self.run_experts([self.hosted[0]], [1], np.zeros((1, self.hidden), np.float32))
        else:
            self.predict(np.zeros((2, self.input_spec.shape[1]), np.float32))

    @property
    def is_shard(self) -> bool:
        return len(self.hosted) < self.n_experts

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.run(self.check_batch(batch))

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.is_shard:
            raise BadRequest(f"this worker hosts experts {self.hosted} of {self.name!r} only")
        x = torch.from_numpy(np.array(batch, dtype=np.float32))  # writable (wire arrays are not)
        with torch.no_grad():
            return self.model(x).numpy()

    # ---------------------------------------------------------------- expert shards
    @property
    def n_experts(self) -> int:
        return self.model.config["n_experts"]

    @property
    def hidden(self) -> int:
        return self.model.config["hidden"]

    def run_experts(self, experts: list[int], counts: list[int], rows: np.ndarray) -> np.ndarray:
        """``rows`` (sum(counts), hidden) hold ``counts[i]`` rows for ``experts[i]``, in order;
        returns each row passed through its expert, same order."""
        if len(experts) != len(counts) or any(e not in self._local for e in experts):
            raise BadRequest(f"this worker hosts experts {self.hosted}; one count per expert")
        if any(c < 0 for c in counts):
            raise BadRequest("counts must be non-negative")
        if rows.ndim != 2 or rows.shape != (sum(counts), self.hidden):
            raise BadRequest(f"rows must be ({sum(counts)}, {self.hidden}), got {rows.shape}")
        xp = torch.from_numpy(np.array(rows, dtype=np.float32))  # wire arrays are read-only
        yp = torch.empty_like(xp)
        starts = [0, *itertools.accumulate(counts)][:-1]
        segments = [
            (self._local[e], s, c) for e, s, c in zip(experts, starts, counts, strict=True) if c
        ]
        with torch.no_grad():
            run_segments(xp, yp, segments, self._gate_up, self._down)
        return yp.numpy()
