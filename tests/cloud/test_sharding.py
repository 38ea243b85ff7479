"""Experts split over two real worker processes give the single-process numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tandem.cloud.process import WorkerProcess
from tandem.cloud.sharding import Shard, ShardedExperts
from tandem.kernels import topk_gating
from tandem.reference.models import MOE
from tandem.runtime import errors
from tandem.runtime.client import CloudClient
from tandem.runtime.moe import MoEClassifier, experts_forward
from tandem.runtime.wire import Envelope, Kind

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shards(tiny_models: Path):
    from tandem.cloud.config import WorkerConfig

    def cfg(experts: list[int]) -> WorkerConfig:
        return WorkerConfig(
            bind="tcp://127.0.0.1:*",
            models_dir=tiny_models,
            models=[MOE],
            experts={MOE: experts},
            threads=1,
        )

    with WorkerProcess(cfg([0, 2, 4, 6])) as a, WorkerProcess(cfg([1, 3, 5, 7])) as b:
        yield [Shard(a.endpoint, [0, 2, 4, 6]), Shard(b.endpoint, [1, 3, 5, 7])]


@pytest.mark.parametrize("t", [1, 5, 300])
def test_sharded_experts_match_single_process(shards, tiny_models: Path, t) -> None:
    model = MoEClassifier.load(tiny_models / "moe.npz")
    torch.manual_seed(t)
    hidden = torch.randn(t, model.config["hidden"])
    with torch.no_grad():
        weights, ids = topk_gating(model.moe.gate(hidden), model.config["k"])
        local = experts_forward(hidden, ids, weights, model.moe.gate_up_proj, model.moe.down_proj)
    with ShardedExperts(MOE, shards, model.config["n_experts"]) as remote:
        got = remote.forward(hidden, ids, weights)
    torch.testing.assert_close(got, local, rtol=1e-5, atol=1e-5)


def test_a_shard_refuses_experts_it_does_not_host(shards) -> None:
    env = Envelope(
        kind=Kind.EXPERTS,
        payload={
            "model": MOE,
            "experts": [1],
            "counts": [1],
            "rows": np.zeros((1, 128), np.float32),
        },
    )
    with CloudClient(shards[0].endpoint) as c, pytest.raises(errors.BadRequest, match="hosts"):
        c.request(env, 5.0)
    with CloudClient(shards[0].endpoint) as c, pytest.raises(errors.BadRequest, match="only"):
        c.infer(MOE, np.zeros((1, 64), np.float32), timeout_s=5.0)


def test_shards_must_cover_every_expert_once() -> None:
    with pytest.raises(ValueError, match="exactly once"):
        ShardedExperts(MOE, [Shard("tcp://127.0.0.1:1", [0, 1])], 4)
