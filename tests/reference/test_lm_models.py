"""The reference language-model pair: a tiny-budget build writes loadable, verifiable models;
the default build (slow) leaves a real edge/cloud gap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tandem.reference import lm_task
from tandem.reference.lm_models import (
    DIFFICULTIES,
    build_llm_models,
    evaluate,
    generate_answers,
    load_lm,
)
from tandem.reference.lm_task import SortItem
from tandem.runtime.manifest import load_manifest, verify_entry
from tandem.runtime.tokenizer import EOS
from tests.conftest import require


@pytest.mark.slow  # the whole pipeline (train, evaluate, export four GGUFs): ~40 s idle, minutes loaded
@pytest.mark.timeout(900)
def test_a_tiny_build_writes_models_a_report_and_a_manifest(tmp_path: Path) -> None:
    require("gguf")
    lines: list[str] = []
    kw = {"edge_steps": 2, "cloud_steps": 2, "eval_n": 3}
    paths = build_llm_models(tmp_path, **kw, progress=lines.append)
    manifest = load_manifest(tmp_path)
    by_name = {e.name: e for e in manifest.models}
    assert set(by_name) == {
        f"sort-{role}{q}" for role in ("edge", "cloud") for q in ("", "-f16", "-q8_0")
    }
    for e in manifest.models:
        assert verify_entry(tmp_path, e) == (tmp_path / e.file).resolve()
    assert by_name["sort-cloud"].format == "transformers" and (tmp_path / "cloud").is_dir()
    assert by_name["sort-edge-q8_0"].format == "gguf"
    assert by_name["sort-edge-q8_0"].quantization == "q8_0"
    assert paths["edge-q8_0"] == tmp_path / "edge-q8_0.gguf"
    report = json.loads(paths["report"].read_text())
    assert set(report["models"]["cloud"]["accuracy"]) == {str(d) for d in DIFFICULTIES}
    assert report["models"]["cloud"]["train"]["steps"] == 2
    assert by_name["sort-edge"].metrics.keys() == {f"exact_match_len{d}" for d in DIFFICULTIES}
    assert any(
        line.startswith("training cloud (mixtral, 6.57M params) for 2 steps") for line in lines
    )

    cloud = load_lm(paths["cloud-hf"], experts="tandem")  # what the cloud serves
    assert cloud.config._experts_implementation == "tandem"
    assert set(evaluate(cloud, (4,), 2)) == {4}

    lines.clear()
    assert build_llm_models(tmp_path, **kw, progress=lines.append) == paths
    assert lines == [f"language models already built in {tmp_path}"]

    again = load_manifest(build_llm_models(tmp_path / "again", **kw)["dir"])  # a step budget:
    assert [e.sha256 for e in again.models] == [e.sha256 for e in manifest.models]  # same bytes


def llama_cpp_answer(llm, item: SortItem) -> str:
    """llama.cpp's greedy answer to ``item`` (text before EOS, at most difficulty + 1 tokens)."""
    import llama_cpp

    tok = lm_task.tokenizer()
    llm.reset()
    llm.eval(tok.encode(item.prompt))
    picked: list[int] = []
    for _ in range(item.difficulty + 1):
        row = np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)
        )
        token = int(row.argmax())
        if token == EOS:
            break
        picked.append(token)
        llm.eval([token])
    return tok.decode(picked)


# Share of held-out answers where llama.cpp (GGUF) and transformers give the same text, on the
# default build's edge model (measured, 50 items per difficulty: f16 0.997, q8_0 0.947; the
# cloud model: f16 1.000, q8_0 0.977).
MIN_SAME_ANSWER = {"f16": 0.95, "q8_0": 0.85}


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_default_build_leaves_an_edge_cloud_gap(tmp_path: Path) -> None:
    """Measured (see README): the edge is right on most 4-letter items and the cloud is right
    more often than the edge on the longest ones; llama.cpp answers like transformers."""
    llama_cpp = require("llama_cpp")
    paths = build_llm_models(tmp_path)
    report = json.loads(paths["report"].read_text())
    edge, cloud = report["models"]["edge"]["accuracy"], report["models"]["cloud"]["accuracy"]
    easiest, hardest = str(min(DIFFICULTIES)), str(max(DIFFICULTIES))
    assert edge[easiest] >= 0.5
    assert cloud[hardest] > edge[hardest]

    items = [it for d in DIFFICULTIES for it in lm_task.held_out(d, 20)]
    want = generate_answers(load_lm(paths["edge-hf"]), items)
    for qtype, floor in MIN_SAME_ANSWER.items():
        llm = llama_cpp.Llama(str(paths[f"edge-{qtype}"]), n_ctx=128, n_threads=2, verbose=False)
        got = [llama_cpp_answer(llm, it) for it in items]
        assert np.mean([a == b for a, b in zip(got, want, strict=True)]) >= floor, qtype
