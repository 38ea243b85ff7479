"""Labelled rows for ``tandem calibrate`` (:mod:`tandem.calibration`): what the edge and the
cloud answered on data with known answers, from one of three sources:

* an ``.npz`` with ``x`` (inputs) and ``y`` (labels), and ``cloud_logits`` when the cloud's
  answers are at hand (otherwise the task's cloud target is asked over the network);
* the escalation log (:class:`~tandem.edge.escalation_log.EscalationLog`): the cloud's answer
  is the label; only audited rows (reason ``audit...``, the policy's ``audit_rate``) are an
  unbiased sample of traffic, the others escalated because the edge was unsure;
* ``reference:digits``: the corrupted-digits calibration split (the test split for a
  holdout), the reference cloud model run here with ONNX Runtime.

The edge model is the task's, as the runtime serves it (the model store's current version
when ``local.store`` has one).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tandem.runtime.errors import ConfigError

Progress = Callable[[str], None]
MIN_AUDITED_ROWS = 200  # thresholds from fewer audited log rows are refused (intervals too wide)
REFERENCE_SETS = ("digits",)


@dataclass
class Rows:
    """Labelled rows of one task: whether the edge and the cloud were right, and what the
    gate needs to score each row. ``unbiased`` marks rows a threshold may be chosen on."""

    edge_correct: np.ndarray  # (N,) bool
    cloud_correct: np.ndarray  # (N,) bool
    unbiased: np.ndarray  # (N,) bool
    source: str
    sha256: str
    models: dict[str, str]
    logits: np.ndarray | None = None  # classification: the edge's (N, C) logits
    labels: np.ndarray | None = None  # classification: the truth (or the cloud's answer)
    logprobs: list[np.ndarray] | None = None  # generation: the edge's token log-probs per row
    logged_scores: np.ndarray | None = None  # generation: the gate score the edge logged
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.edge_correct)

    def subset(self, mask: np.ndarray) -> Rows:
        idx = np.flatnonzero(mask)
        return replace(
            self,
            edge_correct=self.edge_correct[idx],
            cloud_correct=self.cloud_correct[idx],
            unbiased=self.unbiased[idx],
            logits=None if self.logits is None else self.logits[idx],
            labels=None if self.labels is None else self.labels[idx],
            logprobs=None if self.logprobs is None else [self.logprobs[i] for i in idx],
            logged_scores=None if self.logged_scores is None else self.logged_scores[idx],
        )


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(
            np.ascontiguousarray(p).tobytes() if isinstance(p, np.ndarray) else str(p).encode()
        )
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    from tandem.runtime.manifest import sha256_file

    return sha256_file(path)


def _classified(logits: np.ndarray, labels: np.ndarray, cloud_pred: np.ndarray, **kw: Any) -> Rows:
    from tandem.kernels.confidence import confidence

    top1 = confidence(np.ascontiguousarray(logits)).top1
    n = len(labels)
    return Rows(
        edge_correct=top1 == labels,
        cloud_correct=np.asarray(cloud_pred) == labels,
        unbiased=kw.pop("unbiased", np.ones(n, bool)),
        logits=logits,
        labels=np.asarray(labels, np.int64),
        **kw,
    )


# ------------------------------------------------------------------------------- the models
def edge_model(tp: Any) -> Any:
    """The task's edge model as the runtime would serve it: the model store's current version
    when ``local.store`` has one, else ``local.path``."""
    from tandem.runtime.backends.onnx import OnnxBackend
    from tandem.runtime.model_store import ModelStore

    current = ModelStore(tp.local.store).current() if tp.local.store is not None else None
    if current is not None:  # named as the runtime names it, so the policy's record matches
        label = f"{current.version}:{str(current.meta.get('sha256', ''))[:12]}"
        return OnnxBackend(current.path, version=label, threads=0)
    return OnnxBackend(tp.local.path, version=tp.local.version, threads=0)


def _edge_logits(edge: Any, tp: Any, x: np.ndarray) -> np.ndarray:
    out = np.concatenate([edge.predict(x[i : i + 4096]) for i in range(0, len(x), 4096)])
    if tp.local.output == "probabilities":
        with np.errstate(divide="ignore"):
            out = np.log(out)
    return out


def _ask_cloud(tp: Any, x: np.ndarray, say: Progress) -> tuple[np.ndarray, str]:
    from tandem.runtime.client import CloudClient

    if tp.cloud is None:
        raise ConfigError("the task has no cloud target: give cloud_logits in the .npz")
    say(f"asking the cloud ({tp.cloud.model}) for {len(x)} rows")
    outs, version = [], "?"
    with CloudClient(tp.cloud.all_endpoints, curve=tp.cloud.curve_keys) as client:
        for i in range(0, len(x), tp.cloud.max_rows):
            reply = client.infer(tp.cloud.model, x[i : i + tp.cloud.max_rows], timeout_s=60.0)
            outs.append(reply["outputs"])
            version = f"{reply.get('model', tp.cloud.model)}@{reply.get('version', '?')}"
    return np.concatenate(outs), version


# ------------------------------------------------------------------------------- the sources
def rows_from_npz(path: Path, tp: Any, say: Progress) -> Rows:
    """``x`` (N, ...) inputs and ``y`` (N,) labels; ``cloud_logits`` (N, C) optional."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable .npz ({e})") from None
    missing = [k for k in ("x", "y") if k not in data.files]
    if missing:
        raise ConfigError(f"{path}: missing arrays {missing}; expected x (inputs), y (labels)")
    x, y = data["x"], data["y"].astype(np.int64)
    edge = edge_model(tp)
    say(f"running the edge model on {len(x)} rows of {path.name}")
    logits = _edge_logits(edge, tp, x)
    if "cloud_logits" in data.files:
        cloud, cloud_v = data["cloud_logits"], "from-file"
    else:
        cloud, cloud_v = _ask_cloud(tp, x, say)
    return _classified(
        logits,
        y,
        np.argmax(cloud, axis=1),
        source=str(path),
        sha256=_file_digest(path),
        models={"edge": edge.version, "cloud": cloud_v},
    )


def rows_from_reference(name: str, split: str, tp: Any, say: Progress) -> Rows:
    """The reference corrupted digits (``calib`` or ``test`` split), the cloud model run here
    with ONNX Runtime."""
    from tandem.reference.digits import load_workload
    from tandem.reference.models import CLOUD, build_reference_models
    from tandem.runtime.backends.onnx import OnnxBackend
    from tandem.runtime.manifest import load_manifest

    if name not in REFERENCE_SETS:
        raise ConfigError(f"--reference: unknown set {name!r}; expected one of {REFERENCE_SETS}")
    models = build_reference_models(progress=say)
    entry = load_manifest(models).get(CLOUD)
    data = getattr(load_workload(load_manifest(models).seed or 0), split)
    edge = edge_model(tp)
    say(f"running edge and cloud on the {split} split ({len(data)} images)")
    cloud = OnnxBackend(models / entry.file, threads=0).predict(data.x)
    return _classified(
        _edge_logits(edge, tp, data.x),
        data.y,
        cloud.argmax(axis=1),
        source=f"reference:{name}:{split}",
        sha256=_digest(data.x, data.y),
        models={"edge": edge.version, "cloud": f"{CLOUD}@{entry.version}"},
    )


def _is_audit(reason: str) -> bool:
    return reason.startswith("audit")


def rows_from_log(path: Path, task: str, tp: Any, say: Progress) -> Rows:
    """Rows of ``task`` the cloud answered; the cloud's answer is the label. Rows with stored
    inputs are run through the current edge model again; rows without are used only when the
    edge version that logged them is the current one. ``unbiased`` = audited rows."""
    from tandem.edge.escalation_log import EscalationLog

    if not path.is_file():
        raise ConfigError(f"--log: {path} does not exist")
    log = EscalationLog(path)
    try:
        recs = [r for r in log.records(task) if r.tier == "cloud"]
    finally:
        log.close()
    say(f"read {len(recs)} cloud-answered rows of task {task!r} from {path.name}")
    if getattr(tp, "kind", "classify") == "generate":
        return _generation_rows(recs, path)
    recs = [r for r in recs if r.cloud_label is not None]
    edge = edge_model(tp)
    keep, inputs, logged = [], [], []
    skipped = bad = 0
    shape = next((r.input.shape for r in recs if r.input is not None and r.input.size), None)
    for r in recs:
        if r.input is not None and r.input.size:
            if r.input.shape != shape or not np.isfinite(r.input).all():
                bad += 1  # a row another model's shape, or NaN/inf: no sample of this model
                continue
            keep.append(r)
            inputs.append(r.input)
        elif r.model_versions.get("edge") == edge.version:
            keep.append(r)
            logged.append(len(keep) - 1)
        else:
            skipped += 1
    if not keep:
        raise ConfigError(
            f"{path}: no usable row of task {task!r} (cloud-answered, with inputs "
            "or logged by the current edge version)"
        )
    c = len(np.asarray(keep[0].edge_output).reshape(-1))
    logits = np.empty((len(keep), c), np.float64)
    have_input = np.array([r.input is not None and r.input.size > 0 for r in keep])
    if inputs:
        say(f"running the edge model ({edge.version}) on {len(inputs)} logged inputs")
        logits[have_input] = _edge_logits(edge, tp, np.stack(inputs))
    for i in logged:
        logits[i] = np.asarray(keep[i].edge_output, np.float64).reshape(-1)
    labels = np.array([r.cloud_label for r in keep], np.int64)
    clouds = Counter(r.model_versions.get("cloud", "?") for r in keep)
    rows = _classified(
        logits,
        labels,
        labels,
        unbiased=np.array([_is_audit(r.reason) for r in keep]),
        source=str(path),
        sha256=_digest(*(f"{r.request_id}:{r.cloud_label}" for r in keep)),
        models={"edge": edge.version, "cloud": clouds.most_common(1)[0][0]},
    )
    if skipped:
        rows.notes.append(
            f"{skipped} rows skipped: no input stored, logged by another edge version"
        )
    if bad:
        rows.notes.append(f"{bad} rows skipped: an input with NaN/inf or not shaped {shape}")
    return rows


def _norm(text: str | None) -> str:
    return " ".join((text or "").split())


def _generation_rows(recs: list[Any], path: Path) -> Rows:
    """Generation rows: edge_correct := the edge's text equals the cloud's (whitespace
    normalised); the cloud is the reference, so cloud_correct is always true."""
    recs = [r for r in recs if r.generation and r.generation.get("cloud") is not None]
    if not recs:
        raise ConfigError(f"{path}: no generation row with both the edge's and the cloud's text")
    edge_ok = np.array(
        [_norm(r.generation.get("edge")) == _norm(r.generation["cloud"]) for r in recs]
    )
    return Rows(
        edge_correct=edge_ok,
        cloud_correct=np.ones(len(recs), bool),
        unbiased=np.array([_is_audit(r.reason) for r in recs]),
        source=str(path),
        sha256=_digest(*(r.request_id for r in recs)),
        models={
            k: Counter(r.model_versions.get(k, "?") for r in recs).most_common(1)[0][0]
            for k in ("edge", "cloud")
        },
        logprobs=[np.asarray(r.edge_output, np.float64).reshape(-1) for r in recs],
        logged_scores=np.array(
            [np.nan if r.edge_confidence is None else r.edge_confidence for r in recs]
        ),
    )


def load_rows(source: str, task: str, tp: Any, say: Progress, *, holdout: bool = False) -> Rows:
    """``reference:NAME`` (the calib split, or test for a holdout), a ``.npz``, or an escalation
    log (``.sqlite``/``.db``)."""
    if source.startswith("reference:") or source in REFERENCE_SETS:
        return rows_from_reference(
            source.removeprefix("reference:"), "test" if holdout else "calib", tp, say
        )
    path = Path(source)
    if path.suffix == ".npz":
        if getattr(tp, "kind", "classify") == "generate":
            raise ConfigError(f"{path}: a generation task calibrates from the escalation log")
        return rows_from_npz(path, tp, say)
    if path.suffix in (".sqlite", ".db", ".sqlite3"):
        return rows_from_log(path, task, tp, say)
    raise ConfigError(f"{source}: expected a .npz, an escalation log (.sqlite) or reference:digits")
