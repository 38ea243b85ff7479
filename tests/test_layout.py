"""The repository's layout must not shadow installed packages: Python started in the root puts
the root first on sys.path, where the folder ``kernels/`` (``tandem.kernels``) could hide Hugging
Face's ``kernels`` package, which transformers' MoE code imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_in_root(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_top_level_kernels_is_not_tandems_from_the_root() -> None:
    r = _run_in_root(
        "import sys, kernels, tandem.kernels; "
        "print(kernels.__file__); print(tandem.kernels.__file__); "
        "assert kernels is not tandem.kernels; assert 'topk_gating' not in vars(kernels)"
    )
    if r.returncode and "No module named 'kernels'" in r.stderr:
        pytest.fail("Hugging Face's kernels package is not installed: transformers needs it")
    assert r.returncode == 0, r.stderr
    hf, ours = r.stdout.split()
    assert Path(hf).resolve().parent != (ROOT / "kernels").resolve(), hf
    assert Path(ours).resolve().parent == (ROOT / "kernels").resolve(), ours


def test_transformers_moe_code_imports_from_the_root() -> None:
    pytest.importorskip("transformers")
    r = _run_in_root(
        "import transformers.models.mixtral.modeling_mixtral, tandem.runtime.moe; "
        "from tandem.kernels import topk_gating; print('ok')"
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
