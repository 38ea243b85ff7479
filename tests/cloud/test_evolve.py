"""`tandem evolve` for classifiers, end to end on real parts: a weak edge MLP (trained on a few
hundred corrupted digits), a real EscalationLog (sqlite) holding the reference cloud CNN's real
outputs (ONNX Runtime), distillation in torch, int8 export, the model store."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from tandem.cli.common import app
from tandem.cloud.evolve import (
    classifier_metrics,
    judge,
    onnx_outputs,
    onnx_to_torch,
    rows_from_log,
    worse,
)
from tandem.edge.escalation_log import EscalationLog
from tandem.evolution import evolve_task, rollback_task
from tandem.reference.digits import load_workload
from tandem.reference.models import _mlp, build_reference_models, export_onnx, quantize_int8
from tandem.router.policy import CalibrationRecord
from tandem.runtime.calibration import expected_calibration_error, fit_temperature
from tandem.runtime.errors import ConfigError
from tandem.runtime.model_store import ModelStore

WEAK_ROWS = 400  # training rows of the weak edge (about 3% of the digits train split)
STREAM_ROWS = 3000  # train-split rows streamed past it; the unsure ones are logged
GATE = 0.9  # the stream's gate: rows whose edge max-prob is below it escalate


@pytest.fixture(scope="module")
def digits() -> dict:
    ref = build_reference_models()  # cached after the first build (~20 s)
    data = load_workload(0)
    return {"ref": ref, "data": data, "cloud": ref / "cloud-fp32.onnx"}


def weak_edge(folder: Path, data, *, rows: int = WEAK_ROWS, epochs: int = 60) -> Path:
    """A 64-32-10 MLP trained on the first ``rows`` training digits: fp32 and int8 ONNX."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = _mlp()
    x, y = torch.from_numpy(data.train.x[:rows]), torch.from_numpy(data.train.y[:rows])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for i in range(0, rows, 64):
            loss = torch.nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    folder.mkdir(parents=True, exist_ok=True)
    export_onnx(model.eval(), folder / "edge-fp32.onnx")
    quantize_int8(folder / "edge-fp32.onnx", folder / "edge-int8.onnx")
    np.savez(folder / "train.npz", x=data.train.x[:rows], y=data.train.y[:rows])
    return folder


def write_log(
    path: Path,
    edge: Path,
    cloud: Path,
    x: np.ndarray,
    *,
    store_inputs: bool = True,
    poison: bool = False,
    task: str = "digits",
    start: int = 0,
) -> int:
    """Stream ``x`` past the edge model; log the rows below :data:`GATE` with the cloud
    model's real outputs (``poison``: the outputs of other rows). Returns rows logged."""
    edge_out = onnx_outputs(edge, x)
    p = np.exp(edge_out - edge_out.max(1, keepdims=True))
    esc = (p / p.sum(1, keepdims=True)).max(1) < GATE
    xe, eo = x[esc], edge_out[esc]
    co = onnx_outputs(cloud, xe)
    if poison:
        co = co[np.random.default_rng(0).permutation(len(co))]
    with EscalationLog(path, store_inputs=store_inputs) as lg:
        lg.append_batch(
            ts_ms=int(time.time() * 1e3), task=task, tier="cloud",
            request_ids=[f"r{start + i}" for i in range(len(xe))],
            reasons=["low-confidence"] * len(xe), tags=[], inputs=xe, edge_outputs=eo,
            edge_labels=eo.argmax(1).tolist(), edge_confidences=[0.5] * len(xe),
            cloud_outputs=co, cloud_labels=co.argmax(1).tolist(), error=None,
            timings_ms={}, model_versions={"edge": "weak"},
        )  # fmt: skip
    return len(xe)


@pytest.fixture(scope="module")
def scenario(digits: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once: the weak edge, its training rows, the held-out set (digits calib, with the
    cloud's outputs) and three logs of the same stream: honest, poisoned, private."""
    data, folder = digits["data"], tmp_path_factory.mktemp("scenario")
    weak_edge(folder, data)
    stream = data.train.x[WEAK_ROWS : WEAK_ROWS + STREAM_ROWS]
    edge = folder / "edge-int8.onnx"
    write_log(folder / "esc.sqlite", edge, digits["cloud"], stream)
    write_log(folder / "esc-poison.sqlite", edge, digits["cloud"], stream, poison=True)
    write_log(folder / "esc-private.sqlite", edge, digits["cloud"], stream, store_inputs=False)
    np.savez(
        folder / "holdout.npz", x=data.calib.x, y=data.calib.y,
        cloud=onnx_outputs(digits["cloud"], data.calib.x),
    )  # fmt: skip
    return folder


def setup_task(tmp: Path, scenario: Path, *, store: bool = True, log: str = "esc") -> Path:
    """A policy for the weak edge with a model store (in ``tmp``) and one of the logs."""
    for f in ("edge-fp32.onnx", "edge-int8.onnx", "train.npz", "holdout.npz"):
        shutil.copyfile(scenario / f, tmp / f)
    shutil.copyfile(scenario / f"{log}.sqlite", tmp / "esc.sqlite")
    local = {"path": "edge-int8.onnx", **({"store": "store"} if store else {})}
    policy = {
        "escalation_log": {"path": "esc.sqlite"},
        "tasks": {"digits": {"local": local, "gate": {"metric": "max_prob", "threshold": GATE}}},
    }
    (tmp / "policy.yaml").write_text(yaml.safe_dump(policy))
    return tmp / "policy.yaml"


def evolve(policy: Path, **kw):
    kw.setdefault("train_data", policy.parent / "train.npz")
    kw.setdefault("holdout", str(policy.parent / "holdout.npz"))
    kw.setdefault("base", policy.parent / "edge-fp32.onnx")
    return evolve_task(policy, "digits", **kw)


def test_evolve_improves_a_weak_edge_and_publishes(
    tmp_path: Path, digits: dict, scenario: Path
) -> None:
    policy = setup_task(tmp_path, scenario)
    lines: list[str] = []
    out = evolve(policy, epochs=15, progress=lines.append)
    r = out.report
    before, after = r["holdout"]["before"], r["holdout"]["after"]
    assert out.accepted and out.published == "v0001"
    assert after["accuracy"] > before["accuracy"] + 0.05  # the weak edge starts near 0.6
    assert any(line.startswith("epoch 15/15") for line in lines)
    # the published file is the one measured, with its fp32 sibling and a gate
    mv = ModelStore(tmp_path / "store").current()
    assert mv is not None and mv.version == "v0001"
    y = digits["data"].calib.y
    got = classifier_metrics(onnx_outputs(mv.path, digits["data"].calib.x), y)
    assert got.accuracy == pytest.approx(after["accuracy"])
    assert mv.extra("fp32.onnx") is not None
    assert 0.0 <= mv.gate["threshold"] <= 1.0 and mv.gate["temperature"] > 0
    # the new model needs the cloud less for the same recovery of the gap
    routing = r["routing"]
    assert routing["objective"] == "recovery=0.8"
    esc = {k: routing[k]["escalation_rate"]["expected"] for k in ("before", "after")}
    assert esc["after"] < esc["before"]
    with EscalationLog(tmp_path / "esc.sqlite") as lg:
        logged = len(lg)
    assert r["rows"]["used"] + sum(r["rows"]["left_out"].values()) == logged > 300
    assert mv.meta["report"]["provenance"]["rows"] == r["rows"]["used"]
    assert len(mv.meta["report"]["provenance"]["log_rows_sha256"]) == 64
    # the next round starts from the store's fp32 sibling, not --base
    CalibrationRecord.model_validate(mv.meta["calibration"])  # what the drift alarm reads
    again = evolve(policy, base=None, epochs=2, dry_run=True, target="max-escalation=0.3")
    assert again.report["base"]["found"] == "store v0001 fp32.onnx"
    assert again.report["routing"]["after"]["escalation_rate"]["expected"] <= 0.3
    assert ModelStore(tmp_path / "store").versions() == ["v0001"]  # dry run


def test_poisoned_log_is_rejected_and_nothing_published(tmp_path: Path, scenario: Path) -> None:
    policy = setup_task(tmp_path, scenario, log="esc-poison")
    res = CliRunner().invoke(
        app,
        ["evolve", str(policy), "--task", "digits", "--train-data", str(tmp_path / "train.npz"),
         "--holdout", str(tmp_path / "holdout.npz"), "--base", str(tmp_path / "edge-fp32.onnx"),
         "--min-cloud-confidence", "0", "--replay-share", "0", "--epochs", "10", "--json",
         str(tmp_path / "r.json")],
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "rejected" in res.output and "nothing published" in res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verdict"]["accepted"] is False
    assert report["holdout"]["after"]["accuracy"] < report["holdout"]["before"]["accuracy"]
    assert ModelStore(tmp_path / "store").versions() == []


def test_a_tolerance_that_cannot_be_met_rejects(tmp_path: Path, scenario: Path) -> None:
    policy = setup_task(tmp_path, scenario)
    out = evolve(policy, tolerance=-100.0, epochs=3)  # must gain 100 points: impossible
    assert not out.accepted and out.published is None
    assert "accuracy" in out.report["verdict"]["reasons"][0]
    assert ModelStore(tmp_path / "store").current() is None


def test_rollback_restores_the_previous_version(tmp_path: Path, scenario: Path) -> None:
    policy = setup_task(tmp_path, scenario)
    assert evolve(policy, epochs=2).published == "v0001"
    assert evolve(policy, base=None, epochs=2).published == "v0002"
    res = CliRunner().invoke(app, ["evolve", str(policy), "--task", "digits", "--rollback"])
    assert res.exit_code == 0, res.output
    assert "v0001" in res.output
    store = ModelStore(tmp_path / "store")
    assert store.current_name() == "v0001"
    with pytest.raises(ConfigError, match="no earlier version"):
        rollback_task(policy, "digits")


def test_rows_without_inputs_or_cloud_answers_are_skipped_and_counted(
    tmp_path: Path, digits: dict, scenario: Path
) -> None:
    data = digits["data"]
    edge, log = scenario / "edge-int8.onnx", tmp_path / "esc.sqlite"
    hidden = write_log(log, edge, digits["cloud"], data.train.x[500:900], store_inputs=False)
    kept = write_log(log, edge, digits["cloud"], data.train.x[900:1300], start=10_000)
    with EscalationLog(log) as lg:
        lg.append_batch(
            ts_ms=0, task="digits", tier="edge-degraded", request_ids=["lost"],
            reasons=["low-confidence"], tags=[], inputs=data.train.x[:1],
            edge_outputs=np.zeros((1, 10), np.float32), edge_labels=[0],
            edge_confidences=[0.1], cloud_outputs=None, cloud_labels=None,
            error="DeadlineExceeded", timings_ms={}, model_versions={},
        )  # fmt: skip
        rows = rows_from_log(lg.records("digits"))
    assert hidden > 0 and kept > 0
    assert rows.skipped == {"no_input": hidden, "no_cloud_answer": 1, "not_finite": 0}
    assert len(rows) == kept and rows.x.shape == (kept, 64) and rows.cloud.shape == (kept, 10)


def test_only_private_rows_leave_nothing_to_distil(tmp_path: Path, scenario: Path) -> None:
    policy = setup_task(tmp_path, scenario, log="esc-private")
    with pytest.raises(ConfigError, match="nothing to distil"):
        evolve(policy)


def test_unsupported_graph_is_refused_naming_op_and_file(
    tmp_path: Path, digits: dict, scenario: Path
) -> None:
    with pytest.raises(ConfigError, match=r"cloud-fp32\.onnx.*op Constant"):
        onnx_to_torch(digits["cloud"])
    policy = setup_task(tmp_path, scenario)
    with pytest.raises(ConfigError, match=r"op DynamicQuantizeLinear"):
        evolve(policy, base=tmp_path / "edge-int8.onnx")
    # an int8 edge with no fp32 graph anywhere: told to give --base
    (tmp_path / "edge-fp32.onnx").unlink()
    with pytest.raises(ConfigError, match="--base"):
        evolve(policy, base=None)


def test_a_store_is_required(tmp_path: Path, scenario: Path) -> None:
    policy = setup_task(tmp_path, scenario, store=False)
    with pytest.raises(ConfigError, match=r"tasks\.digits\.local\.store"):
        evolve(policy)


def test_onnx_to_torch_matches_onnx_runtime(digits: dict) -> None:
    mlp = onnx_to_torch(digits["ref"] / "edge-fp32.onnx")
    x = digits["data"].test.x[:256]
    with torch.no_grad():
        got = mlp.model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, onnx_outputs(digits["ref"] / "edge-fp32.onnx", x), atol=1e-5)
    assert (mlp.input_name, mlp.output_name, mlp.in_features) == ("x", "logits", 64)


def test_calibration_helpers() -> None:
    # ECE: two answers at max-prob 0.9, one right -> |0.5 - 0.9|
    probs = np.array([[0.9, 0.1], [0.9, 0.1]])
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.4)
    # temperature scaling recovers the temperature logits were sharpened by
    rng = np.random.default_rng(0)
    true = rng.normal(size=(4000, 5)) * 2
    y = np.array([rng.choice(5, p=np.exp(r) / np.exp(r).sum()) for r in true])
    assert fit_temperature(true * 3, y) == pytest.approx(3.0, rel=0.1)
    a = classifier_metrics(true, y)
    right = true.argmax(1) == y
    same = {"before_right": right, "after_right": right}
    assert not judge(a, dataclasses.replace(a, ece=a.ece + 0.05), **same).accepted
    assert judge(a, a, **same).accepted
    lost = right.copy()
    lost[np.flatnonzero(right)[:80]] = False  # 2 points lost on 4000 rows: beyond chance
    assert not judge(a, a, before_right=right, after_right=lost).accepted


def test_a_drop_within_chance_does_not_reject() -> None:
    before = np.zeros(70, bool)
    before[:4] = True
    after = np.zeros(70, bool)
    after[2:4] = True  # 4 -> 2 right of 70: 2.9 points lower, p 0.25
    assert worse(before, after, 0.005) is None
    before = np.ones(400, bool)
    after = before.copy()
    after[:20] = False  # 20 lost, none won: 5 points, p 1e-6
    why = worse(before, after, 0.005)
    assert why is not None and "20 held-out rows lost" in why
    assert worse(before, after, 0.06) is None  # within the stated tolerance
