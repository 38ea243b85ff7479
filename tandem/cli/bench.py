"""``tandem bench``: run a scenario, list them, compare two results, emulate a link."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from tandem.bench.scenario import Scenario

from tandem.cli.common import (
    bench_app,
    console,
    err_console,
    fail,
)
from tandem.runtime.errors import TandemError


@bench_app.command("run")
def bench_run(
    scenario: Annotated[
        str, typer.Argument(help="A scenario YAML file, or a bundled one's name (see `scenarios`).")
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Results folder (default: the scenario's, or bench-results/NAME)."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the results JSON here.")
    ] = None,
    plots: Annotated[bool, typer.Option(help="Write PNG plots and the HTML report.")] = True,
    metrics: Annotated[
        bool,
        typer.Option(
            help="Also scrape the edge's and the started workers' /metrics after every level "
            "into OUT/metrics/ (the scenario's output.metrics)."
        ),
    ] = False,
) -> None:
    """Run a scenario: start what it needs, measure every level until stable, print the
    summary, write results.json, PNG plots and report.html."""
    from tandem.bench.scenario import find_scenario, load_scenario

    try:
        path = find_scenario(scenario)
        sc = load_scenario(path)
    except TandemError as e:
        raise fail(e) from None
    if metrics:
        sc = sc.model_copy(update={"output": sc.output.model_copy(update={"metrics": True})})
    _bench(sc, str(path), out, json_out, plots)


def _bench(sc: Scenario, file: str, out: Path | None, json_out: Path | None, plots: bool) -> None:
    import signal
    import sys

    from rich.markup import escape

    from tandem.bench.runner import run_scenario, write_outputs
    from tandem.bench.summary import print_summary

    if plots and sc.output.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise fail(
                TandemError(
                    "plots need matplotlib: pip install 'tandem-infer[bench]', or pass --no-plots"
                )
            ) from None

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds: the workers and relays this run started are stopped

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    out = out or sc.output.dir or Path("bench-results") / str(sc.name)
    say = lambda m: err_console.print(f"[dim]· {escape(m)}[/dim]", highlight=False)  # noqa: E731
    with err_console.status("starting") as status:

        def tick(label: str):
            def show(t: dict) -> None:
                p99 = "–" if t["p99_ms"] is None else f"{t['p99_ms']:.3g} ms"
                status.update(
                    f"{escape(label)} · {t['phase']} · {t['requests']} answers · "
                    f"{t['rate']:.0f}/s · p99 {p99}"
                )

            return show

        try:
            results = run_scenario(sc, out, file=file, say=say, tick=tick)
        except TandemError as e:
            raise fail(e) from None
    written = write_outputs(results, out, json_out, plots=plots and sc.output.plots,
                            html=sc.output.html)  # fmt: skip
    print_summary(results, console if sys.stdout.isatty() else Console(width=160))
    for p in written:
        console.print(f"wrote {p}", highlight=False, soft_wrap=True)


@bench_app.command("scenarios")
def bench_scenarios() -> None:
    """List the bundled scenarios (run one with `tandem bench run NAME`)."""
    from tandem.bench.scenario import bundled_scenarios, load_scenario

    for name, path in bundled_scenarios().items():
        sc = load_scenario(path)
        console.print(f"[bold]{name:14}[/bold] {sc.description}", highlight=False)
        console.print(f"{'':14} [dim]{path}[/dim]", highlight=False, soft_wrap=True)


@bench_app.command("compare")
def bench_compare(
    a: Annotated[Path, typer.Argument(help="Baseline results JSON.")],
    b: Annotated[Path, typer.Argument(help="New results JSON.")],
    noise_pct: Annotated[
        float, typer.Option(help="Smallest change flagged, whatever the windows' own spread.")
    ] = 10.0,
) -> None:
    """Compare two results files: every figure as a ratio B/A, flagged where the change is
    beyond run-to-run noise."""
    from tandem.bench.compare import compare, load_results, print_compare

    try:
        try:
            rows = compare(load_results(a), load_results(b), noise_pct=noise_pct)
        except (TypeError, AttributeError, KeyError, ValueError) as e:  # the right schema name,
            raise TandemError(  # but not what `tandem bench run` writes
                f"{a} or {b}: not a valid tandem-bench/1 results file ({type(e).__name__}: {e})"
            ) from None
    except TandemError as e:
        raise fail(e) from None
    print_compare(rows, console)


@bench_app.command(
    "netem",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench_netem(ctx: typer.Context) -> None:
    """A loopback relay that adds delay, jitter, a bandwidth limit and outages between clients
    and a worker (no privileges). `tandem bench netem --help` for its options."""
    from tandem.bench.netem import main as netem_main

    netem_main(ctx.args)
