"""Shared fixtures: tiny real ONNX models on disk and real worker processes on loopback."""

from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET when its modules are imported (transformers imports triton
# too), so it is set here, before any test module: without a GPU, Triton kernels run on CPU
# tensors in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from tandem.cloud.config import WorkerConfig
from tandem.cloud.process import WorkerProcess
from tandem.reference.models import (
    CLOUD,
    EDGE,
    LABELS,
    MOE,
    _cnn,
    _mlp,
    _moe,
    export_onnx,
    manifest_entry,
    quantize_int8,
)
from tandem.runtime.manifest import Manifest, write_manifest


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A CLI command run in-process (typer's CliRunner) configures the root logger for a
    process of its own (``tandem.cli.common.setup_logging``): put it back after each test, so
    no later test logs through a handler on a stream the runner has closed."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained int8 MLP (``digits-edge``), CNN (``digits-cloud``) and MoE classifier
    (``digits-moe``) with a manifest:
    the reference architectures, exported the reference way, in a second instead of twenty."""
    import torch

    out = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    export_onnx(_mlp(), out / "edge-fp32.onnx")
    quantize_int8(out / "edge-fp32.onnx", out / "edge-int8.onnx")
    export_onnx(_cnn().eval(), out / "cloud-fp32.onnx")
    _moe().save(out / "moe.npz")
    entries = [
        manifest_entry(
            out, EDGE, "edge-int8.onnx", version_prefix="t", quantization="int8-dynamic"
        ),
        manifest_entry(out, CLOUD, "cloud-fp32.onnx", version_prefix="t"),
        manifest_entry(out, MOE, "moe.npz", version_prefix="t", fmt="tandem-moe"),
    ]
    write_manifest(out, Manifest(models=entries, seed=0))
    return out


def worker_config(models_dir: Path, **overrides) -> WorkerConfig:
    """ONNX models only unless ``models`` says otherwise (the MoE backend imports torch)."""
    base = {
        "bind": "tcp://127.0.0.1:*",
        "models_dir": str(models_dir),
        "models": [EDGE, CLOUD],
        "threads": 1,
    }
    return WorkerConfig.model_validate({**base, **overrides})


@pytest.fixture(scope="module")
def worker(tiny_models: Path) -> Iterator[WorkerProcess]:
    """A real worker process serving the tiny models on a free loopback port."""
    with WorkerProcess(worker_config(tiny_models, models=[EDGE, CLOUD, MOE])) as w:
        yield w


def write_policy(
    path: Path,
    models_dir: Path,
    endpoint: str | None,
    *,
    threshold: float = 0.5,
    deadline_ms: int = 2000,
    log: bool = True,
    **task_overrides,
) -> Path:
    """A policy file for the tiny models (``threshold=1.0`` escalates everything)."""
    task = {
        "local": {"path": str(models_dir / "edge-int8.onnx"), "labels": LABELS},
        "gate": {"metric": "max_prob", "threshold": threshold},
        "rules": [{"tag": "private", "route": "local"}]
        + ([{"tag": "critical", "route": "cloud"}] if endpoint else []),
        "deadline_ms": deadline_ms,
        **task_overrides,
    }
    if endpoint:
        task["cloud"] = {"endpoint": endpoint, "model": CLOUD}
    policy = {"version": 1, "tasks": {"digits": task}}
    if log:
        policy["escalation_log"] = {"path": "escalations.sqlite", "synchronous": "normal"}
    path.write_text(yaml.safe_dump(policy))
    return path


@pytest.fixture
def digits_x() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(0, 1, size=(16, 64)).astype(np.float32)


@pytest.fixture
def make_policy(tmp_path: Path, tiny_models: Path):
    """``make_policy(endpoint, **kw)`` writes a policy for the tiny models into tmp_path."""

    def make(endpoint: str | None, name: str = "policy.yaml", **kw) -> Path:
        return write_policy(tmp_path / name, tiny_models, endpoint, **kw)

    return make


@pytest.fixture
def make_worker_config(tiny_models: Path):
    return lambda **overrides: worker_config(tiny_models, **overrides)


@pytest.fixture
def assert_same_plan():
    """Compare two MoE dispatch plans field by field (Numba, Triton, reference)."""

    def check(got, want) -> None:
        for field in (
            "sorted_token_ids",
            "block_expert_ids",
            "expert_counts",
            "expert_offsets",
            "slot_positions",
        ):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
        assert got.num_tokens_post_padded == want.num_tokens_post_padded

    return check


def require(module_name: str):
    """Import ``module_name`` for a test: skip the test if it is not installed, except where the
    ``CI`` environment variable is set, where a missing package fails it (CI must not go green by
    skipping what it was meant to check)."""
    import importlib

    if not os.environ.get("CI"):
        return pytest.importorskip(module_name)
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        pytest.fail(f"{module_name} is not installed ({e}); CI is set, so this is a failure")
