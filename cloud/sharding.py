"""Expert parallelism over processes: an MoE layer whose experts live on several workers.

:class:`ShardedExperts` does the dispatching side: it plans and permutes the tokens with Tandem's
kernels, sends each worker only the token groups of the experts it hosts (one ``experts``
request per shard, arrays as zero-copy frames, all shards at once), and combines the replies
with the gate weights. A worker becomes a shard with ``experts: {model: [ids]}`` in its config.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from tandem.kernels import combine, moe_align, permute
from tandem.runtime.client import CloudClient
from tandem.runtime.errors import BadRequest
from tandem.runtime.wire import Envelope, Kind


@dataclass(frozen=True)
class Shard:
    endpoint: str
    experts: list[int]


class ShardedExperts:
    """The experts half of an MoE layer, spread over worker processes."""

    def __init__(
        self,
        model: str,
        shards: list[Shard],
        n_experts: int,
        *,
        timeout_s: float = 10.0,
        block_size: int = 16,
    ) -> None:
        owners = sorted(e for s in shards for e in s.experts)
        if owners != list(range(n_experts)):
            raise ValueError(f"the shards must host each of the {n_experts} experts exactly once")
        self.model = model
        self.shards = shards
        self.n_experts = n_experts
        self.timeout_s = timeout_s
        self.block_size = block_size
        self._clients = [CloudClient(s.endpoint) for s in shards]
        self._pool = ThreadPoolExecutor(max_workers=len(shards), thread_name_prefix="tandem-shard")

    def forward(
        self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Same contract as :func:`tandem.runtime.moe.experts_forward`, experts remote."""
        plan = moe_align(expert_ids, self.n_experts, self.block_size)
        xp = permute(hidden, plan).numpy()
        yp = np.zeros_like(xp)
        starts = plan.expert_offsets[:-1].tolist()
        counts = plan.expert_counts.tolist()

        def ask(i: int) -> None:
            experts = [e for e in self.shards[i].experts if counts[e]]
            if not experts:
                return
            rows = np.concatenate([xp[starts[e] : starts[e] + counts[e]] for e in experts])
            env = Envelope(
                kind=Kind.EXPERTS,
                payload={
                    "model": self.model,
                    "experts": experts,
                    "counts": [counts[e] for e in experts],
                    "rows": rows,
                },
            )
            out = self._clients[i].request(env, self.timeout_s).payload["rows"]
            if out.shape != rows.shape:
                raise BadRequest(f"shard {self.shards[i].endpoint} answered {out.shape}")
            at = 0
            for e in experts:
                yp[starts[e] : starts[e] + counts[e]] = out[at : at + counts[e]]
                at += counts[e]

        for f in [self._pool.submit(ask, i) for i in range(len(self.shards))]:
            f.result()  # re-raises a shard's error
        return combine(torch.from_numpy(yp), plan, weights)

    def close(self) -> None:
        self._pool.shutdown()
        for c in self._clients:
            c.close()

    def __enter__(self) -> ShardedExperts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
