"""`tandem evolve` for a generation task, on a tiny real Llama: log rows with generation JSON
in a real EscalationLog, fine-tuning in transformers, GGUF q8_0 export, exact match through
llama.cpp, publication into the model store with the transformers folder beside the GGUF."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tandem.cloud.evolve_lm import Pair, encode_pair, pairs_from_log, split_pairs
from tandem.edge.escalation_log import EscalationLog, EscalationRecord
from tandem.evolution import evolve_task
from tandem.reference import lm_task
from tandem.reference.lm_models import Recipe, make_model, save_lm
from tandem.runtime.errors import ConfigError
from tandem.runtime.model_store import ModelStore
from tests.conftest import require

TINY = Recipe("llama", hidden=32, layers=1, heads=2, intermediate=64)


def record(
    i: int, prompt: str | None, cloud: str | None, answer: str, cloud_lp: float = 0.0
) -> EscalationRecord:
    """A generation row as the edge logs it (edge/answer.py: log_record)."""
    return EscalationRecord(
        ts_ms=int(time.time() * 1e3), request_id=f"g{i}", task="sort", tier="cloud",
        reason="low-confidence", tags=[], input=np.frombuffer(b"x", np.uint8), input_digest="",
        edge_output=np.zeros(1, np.float32), edge_label=None, edge_confidence=0.1,
        cloud_output=np.full(1, cloud_lp, np.float32) if cloud else None, cloud_label=None,
        error=None if cloud else "DeadlineExceeded: late", timings_ms={}, model_versions={},
        generation={"prompt": prompt, "messages": None, "edge": "", "cloud": cloud,
                    "answer": answer, "escalated_at": 0},
    )  # fmt: skip


@pytest.fixture
def lm_task_dir(tmp_path: Path) -> Path:
    """A tiny untrained edge (transformers + GGUF q8_0), a log of 4-letter sorts answered
    right by the cloud, 3 private rows and 1 the cloud missed, and the policy."""
    require("gguf")
    from tandem.runtime.gguf import export_gguf

    tok = lm_task.tokenizer()
    save_lm(make_model(TINY, tok.n_vocab, seed=0), tok, tmp_path / "edge")
    export_gguf(tmp_path / "edge", tmp_path / "edge-q8_0.gguf", qtype="q8_0")
    items = lm_task.make_items(4, 120, seed=3)
    with EscalationLog(tmp_path / "esc.sqlite") as lg:
        for i, it in enumerate(items):
            lg.append(record(i, it.prompt, it.answer, it.answer))
        for i in range(3):
            lg.append(record(1000 + i, None, "abcd", "abcd"))  # store_inputs: false
        lg.append(record(2000, "sort:dcba=", None, "dcba"))  # degraded: no cloud answer
        lg.append(record(3000, "sort:cba=", "abc", "abc", cloud_lp=-3.0))  # the cloud unsure
    policy = {
        "escalation_log": {"path": "esc.sqlite"},
        "tasks": {"sort": {
            "kind": "generate", "local": {"path": "edge-q8_0.gguf", "store": "store"},
            "gate": {"metric": "token_min", "threshold": 0.5},
        }},
    }  # fmt: skip
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    return tmp_path


@pytest.mark.slow  # about 15 s on 2 cores: fine-tuning, GGUF export, llama.cpp decoding
def test_lm_evolve_distils_exports_and_publishes(lm_task_dir: Path) -> None:
    lines: list[str] = []
    out = evolve_task(
        lm_task_dir / "policy.yaml", "sort", base=lm_task_dir / "edge", steps=40,
        holdout_share=0.2, progress=lines.append,
    )  # fmt: skip
    r = out.report
    assert r["rows"]["skipped"]["no_input"] == 3 and r["rows"]["skipped"]["no_cloud_answer"] == 1
    assert r["rows"]["train_pairs"] + r["rows"]["holdout_pairs"] == 120
    assert r["distil"]["final_loss"] < r["distil"]["first_loss"]  # it learned something
    assert any(line.startswith("step 40/40") for line in lines)
    assert out.accepted and out.published == "v0001"
    mv = ModelStore(lm_task_dir / "store").current()
    assert mv is not None and mv.path.suffix == ".gguf"
    hf = mv.extra("hf")
    assert hf is not None and (hf / "config.json").is_file()
    # the next round starts from the store's transformers folder
    again = evolve_task(lm_task_dir / "policy.yaml", "sort", steps=2, dry_run=True)
    assert again.report["base"]["found"] == "store v0001 hf"


def test_lm_pairs_skip_and_count(lm_task_dir: Path) -> None:
    with EscalationLog(lm_task_dir / "esc.sqlite") as lg:
        got = pairs_from_log(lg.records("sort"), min_cloud_confidence=0.5)
        everything = pairs_from_log(lg.records("sort"))
    assert len(got.pairs) == 120 and len(everything.pairs) == 121
    assert got.skipped == {
        "no_input": 3, "no_cloud_answer": 1, "chat": 0, "not_generation": 0, "cloud_unsure": 1
    }  # fmt: skip
    train, hold = split_pairs(got.pairs, 0.25)
    assert len(hold) == 30 and not {p.request_id for p in train} & {p.request_id for p in hold}
    tok = lm_task.tokenizer()
    ids, start = encode_pair(tok, Pair("r", "sort:ba=", "ab"))
    assert tok.decode(ids[start:]) == "ab" and ids[-1] in tok.eos_tokens


def test_lm_evolve_needs_a_transformers_folder(lm_task_dir: Path) -> None:
    with pytest.raises(ConfigError, match="--base DIR"):
        evolve_task(lm_task_dir / "policy.yaml", "sort", steps=1)
