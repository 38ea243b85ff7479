"""``tandem router train``: gathers the rows (escalation log, a labelled ``.npz``, or the
reference digits), calls :func:`tandem.router.learned.train_router`, prints the comparison
with the confidence gates. The row gathering is here because it reads the edge's log and the
reference models, which the router layer may not import; each is a plain function."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from tandem.cli.common import app, console, err_console, fail
from tandem.runtime.errors import ConfigError, TandemError

router_app = typer.Typer(
    help="Learned routers: train one from the escalation log, compare it with the gates.",
    no_args_is_help=True,
)
app.add_typer(router_app, name="router")


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
) -> tuple[Any, dict[str, Any]]:
    """Rows of ``task`` from an escalation log where the cloud answered, as
    :class:`~tandem.router.learned.RouterExamples` (the cloud's label is the truth: the edge
    is right when the labels agree), and what was read: rows seen, used, skipped and why.
    ``edge_version``: ``latest`` keeps the rows of the newest row's edge model (logits of an
    older model say little about the current one), ``all`` keeps every row, anything else
    names a version."""
    from tandem.edge.escalation_log import EscalationLog
    from tandem.router.learned import RouterExamples

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
) -> tuple[Any, str | None]:
    """Rows from a ``.npz`` with ``x`` (inputs) and ``y`` (labels), and ``cloud_logits``
    when the cloud's answers are known (without them the cloud is taken to be right): the
    edge model is run on ``x`` here."""
    from tandem.router.learned import RouterExamples

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
) -> tuple[Any, Any, str | None]:
    """(train, holdout, hidden tensor name) on the reference digits: the calibration split
    to train on, the test split to judge on, the reference cloud model run here."""
    from tandem.reference.digits import load_workload
    from tandem.reference.models import CLOUD, build_reference_models
    from tandem.router.learned import RouterExamples
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


def print_report(report: Any, out: Any = console) -> None:
    from rich.table import Table

    t = Table(title=f"held-out rows: {report.rows_holdout} (trained on {report.rows_train})")
    for col in ("router", f"CPT({report.target:.0%})", "AUROC (benefit)"):
        t.add_column(col, justify="left" if col == "router" else "right")
    for g in report.gates:
        t.add_row(g.name, f"{100 * g.cpt:.1f}%", f"{g.auroc:.3f}")
    out.print(t)
    out.print(f"learned: {report.model} ({report.version}), written to {report.path}")
    out.print(report.verdict())
    out.print(
        f"policy: gate: {{type: learned, model: {Path(report.path).name}, "
        f"threshold: {report.threshold:.4g}}}",
        soft_wrap=True,
    )
    out.print(
        "(the threshold recovers 90% of the gap on the held-out rows; `tandem calibrate` "
        "picks one to your target)",
        soft_wrap=True,
    )


@router_app.command("train")
def train(
    policy: Annotated[Path, typer.Argument(help="The policy file that names the task.")],
    task: Annotated[str, typer.Option(help="The task to route.")],
    out: Annotated[Path, typer.Option(help="Where to write the router (ONNX).")],
    log: Annotated[
        Path | None,
        typer.Option(help="An escalation log (default: the policy's escalation_log)."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="A .npz with x, y and optionally cloud_logits, instead of the log."),
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(help="'digits': train on the calib split, judge on the test split."),
    ] = None,
    model: Annotated[str, typer.Option(help="auto, logistic or mlp.")] = "auto",
    holdout_share: Annotated[
        float, typer.Option(help="Share of the rows held out to compare on (log, data).")
    ] = 0.3,
    seed: Annotated[int, typer.Option()] = 0,
    top_k: Annotated[int, typer.Option(help="Sorted probabilities the router reads.")] = 3,
    logits: Annotated[
        bool, typer.Option(help="Also read every class's log-probability, in class order.")
    ] = False,
    hidden: Annotated[
        str | None,
        typer.Option(
            help="Also read this hidden tensor of the edge model ('auto': the last "
            "dense layer's input); --data and --reference only."
        ),
    ] = None,
    edge_version: Annotated[
        str, typer.Option(help="Log rows of this edge version: latest, all, or a version.")
    ] = "latest",
    min_rows: Annotated[
        int, typer.Option(help="Refuse (exit 1) while the log holds fewer usable rows.")
    ] = 200,
    models_dir: Annotated[
        Path | None, typer.Option(help="Reference models (--reference; default: user cache).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report.")] = None,
) -> None:
    """Train a learned router (P(the edge's answer stands) from the edge model's outputs),
    export it to ONNX and compare it with the max_prob, margin and entropy gates on held-out
    rows. Re-run it as the escalation log grows: each run trains on everything logged."""
    from tandem.router.learned import train_router
    from tandem.router.policy import GateSpec, TaskPolicy, load_policy

    try:
        if sum(v is not None for v in (log, data, reference)) > 1:
            raise ConfigError("give at most one of --log, --data, --reference")
        if model not in ("auto", "logistic", "mlp"):
            raise ConfigError(f"--model must be auto, logistic or mlp, got {model!r}")
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
        name = None
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
                raise ConfigError(
                    f"{policy} has no escalation_log: give --log, --data or --reference"
                )
            rows, info = examples_from_log(Path(path), task, edge_version=edge_version)
            n = 0 if rows is None else len(rows)
            err_console.print(f"[dim]· {path}: {info}[/dim]", highlight=False)
            if n < min_rows:
                raise ConfigError(
                    f"{path}: {n} usable rows for task {task!r}, fewer than --min-rows "
                    f"{min_rows}; run again when the log has grown"
                )
            tr, ho = rows.split(holdout_share, seed)
            source = {"source": str(path), "edge_versions": json.dumps(info["edge_versions"])}
        report = train_router(
            tr,
            ho,
            out,
            top_k=top_k,
            uses_logits=logits,
            hidden_tensor=name,
            model=model,  # type: ignore[arg-type]
            seed=seed,
            temperature=temperature,
            provenance={**source, "task": task, "policy": str(policy)},
        )
    except TandemError as e:
        raise fail(e) from None
    except ValueError as e:
        raise fail(ConfigError(str(e))) from None
    print_report(report)
    if json_out:
        json_out.write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
        console.print(f"report written to {json_out}")
