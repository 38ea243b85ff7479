"""``tandem router train``: parses the options, gathers the rows
(:func:`tandem.router_data.task_examples`), trains and judges the router
(:func:`tandem.router.learned_train.train_router`), prints the comparison with the confidence
gates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tandem.cli.common import app, console, err_console, fail
from tandem.runtime.errors import ConfigError, TandemError

if TYPE_CHECKING:
    from tandem.router.learned_train import RouterReport

router_app = typer.Typer(
    help="Learned routers: train one from the escalation log, compare it with the gates.",
    no_args_is_help=True,
)
app.add_typer(router_app, name="router")


def print_report(report: RouterReport, out: Any = console) -> None:
    """The gates' table, the learned router's file and verdict, and the policy line to use it."""
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
        "(the threshold recovers 90% of the gap on the training rows; `tandem calibrate` "
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
    from tandem.router.learned_train import train_router
    from tandem.router_data import task_examples

    try:
        if model not in ("auto", "logistic", "mlp"):
            raise ConfigError(f"--model must be auto, logistic or mlp, got {model!r}")
        rows = task_examples(
            policy,
            task,
            log=log,
            data=data,
            reference=reference,
            hidden=hidden,
            holdout_share=holdout_share,
            seed=seed,
            edge_version=edge_version,
            min_rows=min_rows,
            models_dir=models_dir,
            progress=lambda m: err_console.print(f"[dim]· {m}[/dim]", highlight=False),
        )
        report = train_router(
            rows.train,
            rows.holdout,
            out,
            top_k=top_k,
            uses_logits=logits,
            hidden_tensor=rows.hidden_tensor,
            model=model,  # type: ignore[arg-type]
            seed=seed,
            temperature=rows.temperature,
            provenance=rows.provenance,
        )
    except TandemError as e:
        raise fail(e) from None
    except ValueError as e:
        raise fail(ConfigError(str(e))) from None
    print_report(report)
    if json_out:
        json_out.write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
        console.print(f"report written to {json_out}")
