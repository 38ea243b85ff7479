"""The ``tandem`` command — the top floor: it parses, calls one library function, prints.

It is the composition root, the only code that imports every side (edge, cloud, the bench
tool, the reference models), each lazily inside its command so that ``tandem --help`` and
``tandem cloud serve`` start fast. One module per command group: :mod:`.models` (models,
quantize), :mod:`.serve` (cloud, keys, generate, gateway), :mod:`.bench`; the rest is here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from tandem import __version__
from tandem.cli.common import app, console, err_console, fail, policy_app
from tandem.runtime.errors import TandemError


@app.command()
def version() -> None:
    """Print Tandem's version."""
    console.print(__version__)


@app.command()
def demo(
    models_dir: Annotated[
        Path | None, typer.Option(help="Where the reference models live (default: user cache).")
    ] = None,
    rebuild: Annotated[bool, typer.Option(help="Rebuild the models even if cached.")] = False,
    deadline_ms: Annotated[float, typer.Option(help="Per-request deadline.")] = 200.0,
    target_recovery: Annotated[
        float, typer.Option(help="Share of the edge→cloud gap the threshold must recover on calib.")
    ] = 0.9,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the report here.")
    ] = None,
    cloud_model: Annotated[
        str, typer.Option(help="Escalate to digits-cloud (dense CNN) or digits-moe (MoE experts).")
    ] = "digits-cloud",
) -> None:
    """Build the reference models if missing, start a cloud worker process, route the held-out
    corrupted digits through EdgeRuntime and print what routing bought."""
    from tandem.demo import print_report, run_demo

    try:
        report = run_demo(
            models_dir=models_dir,
            rebuild=rebuild,
            deadline_ms=deadline_ms,
            target_recovery=target_recovery,
            cloud_model=cloud_model,
            progress=lambda msg: err_console.print(f"[dim]· {msg}[/dim]", highlight=False),
        )
    except TandemError as e:
        raise fail(e) from None
    print_report(report, console)
    if json_out:
        json_out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        console.print(f"report written to {json_out}")


@policy_app.command("check")
def policy_check(files: Annotated[list[Path], typer.Argument(help="Policy YAML files.")]) -> None:
    """Validate policy files: prints OK, or every error with its key path and what was expected."""
    from tandem.router.policy import load_policy

    bad = 0
    for f in files:
        try:
            load_policy(f)
        except TandemError as e:
            bad += 1
            typer.echo(e.message, err=True)
        else:
            typer.echo(f"{f}: OK")
    raise typer.Exit(code=1 if bad else 0)


# the command groups register their commands (after version and demo: the order --help shows)
from tandem.cli import (  # noqa: E402, F401
    bench,
    calibrate,
    cloud_admin,
    evolve,
    models,
    policy_cmd,
    ray_cmd,
    router_cmd,
    serve,
)


def main() -> None:
    # torch's OpenMP threads spin while they wait; on a small shared machine that costs 4-12x
    # per training or decode step (FACTS). Set before torch is imported; the user's value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app()
