"""Rows a learned router trains and is judged on, for ``tandem router train``
(:mod:`tandem.cli.router_cmd` parses, calls :func:`task_examples` and
:func:`~tandem.router.learned_train.train_router`, prints): the escalation log (the cloud's
label is the truth), a labelled ``.npz`` (the edge model run here), or the reference digits
(calib split to train on, test split to judge on). These read the edge's log and the
reference models, which the router layer may not import, so they live at the top.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandem.calibration_rows import Progress
from tandem.router.learned_train import RouterExamples
from tandem.runtime.errors import ConfigError


def edge_outputs(
    edge_onnx: Path, x: np.ndarray, *, hidden_tensor: str | None = None, probabilities: bool = False
) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """The edge model's logits for ``x`` (the log of its outputs when it gives
    ``probabilities``), and with ``hidden_tensor`` (``auto``: the last dense layer's input)
    its hidden vectors too: ``(logits, hidden, tensor name)``."""
    from tandem.runtime.backends.onnx import OnnxBackend

    if hidden_tensor is None:
        out, hidden, name = OnnxBackend(edge_onnx, threads=0).predict(x), None, None
    else:
        import onnxruntime as ort

        from tandem.router.learned import expose_hidden

        with tempfile.TemporaryDirectory() as tmp:
            path, name, _ = expose_hidden(
                edge_onnx, None if hidden_tensor == "auto" else hidden_tensor, Path(tmp) / "e.onnx"
            )
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            inp = sess.get_inputs()[0].name
            out, hidden = sess.run(None, {inp: np.asarray(x, np.float32)})[:2]
    if probabilities:
        with np.errstate(divide="ignore"):
            out = np.log(out)
    return out, hidden, name


def examples_from_log(
    log_path: Path, task: str, *, edge_version: str = "latest"
) -> tuple[RouterExamples | None, dict[str, Any]]:
    """Rows of ``task`` from an escalation log where the cloud answered, as
    :class:`~tandem.router.learned_train.RouterExamples` (the cloud's label is the truth: the edge
    is right when the labels agree), and what was read: rows seen, used, skipped and why.
    ``edge_version``: ``latest`` keeps the rows of the newest row's edge model (logits of an
    older model say little about the current one), ``all`` keeps every row, anything else
    names a version."""
    from tandem.edge.escalation_log import EscalationLog

    if not log_path.is_file():
        raise ConfigError(f"{log_path}: escalation log not found")
    rows, skipped = [], Counter()
    log = EscalationLog(log_path, synchronous="normal")
    try:
        for r in log.records(task):
            if r.generation is not None:
                skipped["generation rows (token routers train from --data)"] += 1
            elif r.cloud_output is None and r.cloud_label is None:
                skipped["the cloud did not answer"] += 1
            elif r.cloud_output is not None and not np.isfinite(r.cloud_output).all():
                skipped["the cloud's output holds NaN/inf"] += 1
            else:
                rows.append(r)
    finally:
        log.close()
    versions = Counter(r.model_versions.get("edge", "?") for r in rows)
    if rows and edge_version != "all":
        want = (
            rows[-1].model_versions.get("edge", "?") if edge_version == "latest" else edge_version
        )
        kept = [r for r in rows if r.model_versions.get("edge", "?") == want]
        skipped[f"edge model other than {want}"] += len(rows) - len(kept)
        rows = kept
    shapes = Counter(np.shape(r.edge_output) for r in rows)
    if len(shapes) > 1:
        raise ConfigError(f"{log_path}: task {task!r} rows have edge outputs of shapes {shapes}")
    info = {
        "source": str(log_path),
        "rows": len(rows),
        "skipped": dict(skipped),
        "edge_versions": dict(versions),
        "reasons": dict(Counter(r.reason for r in rows)),
    }
    if not rows:
        return None, info
    logits = np.stack([np.asarray(r.edge_output, np.float32).reshape(-1) for r in rows])
    edge = np.array([r.edge_label if r.edge_label is not None else -1 for r in rows])
    edge = np.where(edge < 0, logits.argmax(1), edge)
    cloud = np.array(
        [
            r.cloud_label if r.cloud_label is not None else int(np.argmax(r.cloud_output))
            for r in rows
        ]
    )
    return RouterExamples(logits, edge == cloud, np.ones(len(rows), bool)), info


def examples_from_npz(
    path: Path, edge_onnx: Path, *, hidden_tensor: str | None = None, probabilities: bool = False
) -> tuple[RouterExamples, str | None]:
    """Rows from a ``.npz`` with ``x`` (inputs) and ``y`` (labels), and ``cloud_logits``
    when the cloud's answers are known (without them the cloud is taken to be right): the
    edge model is run on ``x`` here."""
    try:
        with np.load(path, allow_pickle=False) as z:
            x, y = z["x"], z["y"]
            cloud = z.get("cloud_logits", None)
    except KeyError as e:
        raise ConfigError(f"{path}: needs arrays 'x' and 'y' (missing {e})") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    if len(x) != len(y) or (cloud is not None and len(cloud) != len(y)):
        raise ConfigError(f"{path}: x, y and cloud_logits must have the same number of rows")
    logits, hidden, name = edge_outputs(
        edge_onnx, x, hidden_tensor=hidden_tensor, probabilities=probabilities
    )
    cloud_ok = np.ones(len(y), bool) if cloud is None else cloud.argmax(1) == y
    return RouterExamples(logits, logits.argmax(1) == y, cloud_ok, hidden), name


def reference_digits_examples(
    edge_onnx: Path, *, models_dir: Path | None = None, hidden_tensor: str | None = None
) -> tuple[RouterExamples, RouterExamples, str | None]:
    """(train, holdout, hidden tensor name) on the reference digits: the calibration split
    to train on, the test split to judge on, the reference cloud model run here."""
    from tandem.reference.digits import load_workload
    from tandem.reference.models import CLOUD, build_reference_models
    from tandem.runtime.backends.onnx import OnnxBackend
    from tandem.runtime.manifest import load_manifest

    models = build_reference_models(models_dir)
    manifest = load_manifest(models)
    data = load_workload(manifest.seed or 0)
    cloud = OnnxBackend(models / manifest.get(CLOUD).file, threads=0)
    out, name = [], None
    for split in (data.calib, data.test):
        logits, hidden, name = edge_outputs(edge_onnx, split.x, hidden_tensor=hidden_tensor)
        ok = cloud.predict(split.x).argmax(1) == split.y
        out.append(RouterExamples(logits, logits.argmax(1) == split.y, ok, hidden))
    return out[0], out[1], name


@dataclass
class TaskExamples:
    """The rows :func:`task_examples` gathered for a task: ``train`` and ``holdout``, the
    edge's hidden tensor read (None: none), the gate's temperature (the confidence gates are
    compared at it), the provenance to write into the router file, and, from the log, what
    was read (rows seen, used, skipped and why)."""

    train: RouterExamples
    holdout: RouterExamples
    hidden_tensor: str | None
    temperature: float
    provenance: dict[str, Any]
    log_info: dict[str, Any] | None = field(default=None)


def task_examples(
    policy: Path,
    task: str,
    *,
    log: Path | None = None,
    data: Path | None = None,
    reference: str | None = None,
    hidden: str | None = None,
    holdout_share: float = 0.3,
    seed: int = 0,
    edge_version: str = "latest",
    min_rows: int = 200,
    models_dir: Path | None = None,
    progress: Progress | None = None,
) -> TaskExamples:
    """The rows to train ``task``'s router on, from one source: ``reference`` (``digits``),
    ``data`` (a ``.npz``), or the escalation log (``log``, default the policy's), split into
    train and holdout (``holdout_share``, stratified on benefit) except for the reference,
    whose splits are fixed; ``progress`` hears what was read from the log. :class:`ConfigError`
    saying what to do when the options clash, the task is missing or generates text, or the
    log holds fewer than ``min_rows`` usable rows."""
    from tandem.router.policy import GateSpec, TaskPolicy, load_policy

    if sum(v is not None for v in (log, data, reference)) > 1:
        raise ConfigError("give at most one of --log, --data, --reference")
    pol = load_policy(policy)
    if task not in pol.tasks:
        raise ConfigError(f"{policy}: no task {task!r} (tasks: {', '.join(pol.tasks)})")
    t = pol.tasks[task]
    if not isinstance(t, TaskPolicy):
        raise ConfigError(
            f"task {task!r} is a generate task: train token routers from token statistics "
            "with tandem.router.learned.fit_router and export_router (kind generate)"
        )
    temperature = t.gate.temperature if isinstance(t.gate, GateSpec) else 1.0
    probabilities = t.local.output == "probabilities"
    name, info = None, None
    if reference is not None:
        if reference != "digits":
            raise ConfigError(f"--reference must be 'digits', got {reference!r}")
        tr, ho, name = reference_digits_examples(
            t.local.path, models_dir=models_dir, hidden_tensor=hidden
        )
        source = {"source": "reference digits: calib split (test split held out)"}
    elif data is not None:
        rows, name = examples_from_npz(
            data, t.local.path, hidden_tensor=hidden, probabilities=probabilities
        )
        tr, ho = rows.split(holdout_share, seed)
        source = {"source": str(data)}
    else:
        if hidden is not None:
            raise ConfigError("--hidden needs --data or --reference (the log has no hidden)")
        path = log or (pol.escalation_log.path if pol.escalation_log else None)
        if path is None:
            raise ConfigError(f"{policy} has no escalation_log: give --log, --data or --reference")
        got, info = examples_from_log(Path(path), task, edge_version=edge_version)
        n = 0 if got is None else len(got)
        if progress is not None:
            progress(f"{path}: {info}")
        if got is None or n < min_rows:
            raise ConfigError(
                f"{path}: {n} usable rows for task {task!r}, fewer than --min-rows "
                f"{min_rows}; run again when the log has grown"
            )
        tr, ho = got.split(holdout_share, seed)
        source = {"source": str(path), "edge_versions": json.dumps(info["edge_versions"])}
    provenance = {**source, "task": task, "policy": str(policy)}
    return TaskExamples(tr, ho, name, temperature, provenance, info)
