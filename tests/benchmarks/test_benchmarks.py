"""The benchmarks of issue 6 run end to end with tiny arguments and write what they claim.
Slow (each starts worker processes); the figures themselves are not asserted here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# slow; a cold cache builds the reference models first (over the default 120 s on 2 cores)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _run(module: str, tmp_path: Path, *args: str) -> dict:
    """Run ``benchmarks.<module>`` with ``args``; its results."""
    import importlib

    out = tmp_path / f"{module.rpartition('.')[2]}.json"
    importlib.import_module(f"benchmarks.{module}").main([*args, "--json", str(out)])
    return json.loads(out.read_text())["results"]


def test_soak_loses_and_duplicates_nothing_across_kills(tmp_path: Path) -> None:
    r = _run(
        "serving.soak",
        tmp_path,
        "--minutes",
        "0.25",
        "--kill-every",
        "4",
        "--down",
        "1",
        "--window",
        "5",
        "--rate",
        "100",
    )
    s = r["summary"]
    assert s["kills"] >= 2 and s["requests"] > 500
    assert s["lost"] == 0 and s["duplicated"] == 0
    assert s["by_kind"].get("cloud", 0) / s["requests"] > 0.9


def test_batching_benchmark_reports_both_configurations(tmp_path: Path) -> None:
    r = _run("serving.batching", tmp_path, "--seconds", "0.3", "--repeats", "1", "--depths", "1,8")
    for model in ("digits-cloud", "digits-moe"):
        loads = r[model]["loads"]
        assert len(loads["batching"]) == len(loads["max_batch 1"]) == 2
        assert all(x["errors"] == 0 and x["rows_per_s"] > 0 for x in loads["batching"])
        assert r[model]["idle"]["compute_us"] > 0


def test_escalation_log_benchmark_compares_with_and_without(tmp_path: Path) -> None:
    r = _run("serving.escalation_log", tmp_path, "--n", "200")
    assert r["writer"]["written"] >= 200 and r["writer"]["failed_rows"] == 0
    assert r["log_timing_us"]["p50"] > 0


def test_own_models_compares_every_backend_with_generate(tmp_path: Path) -> None:
    args = ("--prompts", "3", "--tokens", "4", "--chats", "2", "--threads", "1")
    r = _run("llm.own_models", tmp_path, *args)
    assert set(r["agreement"]) == {"fast", "transformers", "gguf-f32", "gguf-q8_0"}
    assert all(0.0 <= v <= 1.0 for v in r["agreement"].values())
    chat = r["chat_prompt_tokens"]
    assert len(set(chat.values())) == 1 and chat["apply_chat_template"] > 10
    assert r["tok_s"]["fast"] > 0 and 0.0 <= r["draft_agreement"] <= 1.0
    assert set(r["speculative"]) == {"4", "auto"}
