"""``tandem policy diff``: parses, calls :func:`tandem.policy_replay.diff_policies`, prints what
differs between two policy files and, with ``--log``, what the change does to logged traffic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from tandem.cli.common import console, fail, policy_app
from tandem.runtime.errors import TandemError


def _pct(v: float) -> str:
    return "n/a" if v != v else f"{100 * v:.1f}%"


def _ci(e: Any) -> str:
    return f"{_pct(e.expected)} [{_pct(e.low)}, {_pct(e.high)}]"


def _delta(e: Any, flips: int) -> str:
    """A change in points with its interval; with no flip, the bound the row count gives."""
    if flips == 0:
        return f"none: no flips (within ±{100 * e.high:.1f} pts at 95%)"
    pts = lambda v: "n/a" if v != v else f"{100 * v:+.1f}"  # noqa: E731
    return f"{pts(e.expected)} pts [{pts(e.low)}, {pts(e.high)}]"


def print_diff(d: Any, out: Any = console) -> None:
    """The report of :func:`tandem.policy_replay.diff_policies`, for a person."""

    def say(text: str) -> None:
        out.print(text, soft_wrap=True, highlight=False, markup=False)

    say(f"--- {d.old}")
    say(f"+++ {d.new}")
    if not d.changes:
        say("no difference")
    for c in d.changes:
        say(f"  {c}")
    for name, kind in d.tasks.items():
        if kind != "unchanged":
            say(f"task {name}: {kind}")
    for name, r in d.replays.items():
        say(f"replay of task {name} ({r.kind}) on {d.log}: {r.rows} logged rows")
        lg = r.logged
        if lg is None:
            say("  nothing replayed: no logged row could be scored by both edge models")
        else:
            say(
                f"  all logged rows (escalated when logged, not a sample of traffic): cloud "
                f"{lg.escalated[0]} -> {lg.escalated[1]}, edge {lg.rows - lg.escalated[0]} -> "
                f"{lg.rows - lg.escalated[1]}; flips: {lg.to_edge} cloud->edge, "
                f"{lg.to_cloud} edge->cloud"
            )
        a = r.audited
        if a is not None:
            say(
                f"  audited rows ({a.rows}, a sample of traffic): escalation rate "
                f"{_ci(a.escalation_rate[0])} -> {_ci(a.escalation_rate[1])}, "
                f"change {_delta(a.escalation_delta, a.to_edge + a.to_cloud)}; "
                f"flips {a.to_edge} cloud->edge, {a.to_cloud} edge->cloud"
            )
            if a.accuracy is not None:
                say(
                    f"  agreement with the cloud ({a.accuracy_rows} rows): "
                    f"{_ci(a.accuracy[0])} -> {_ci(a.accuracy[1])}, "
                    f"change {_delta(a.accuracy_delta, a.accuracy_flips)}"
                )
        if any(r.over_deadline):
            say(
                f"  logged cloud answers slower than deadline_ms: {r.over_deadline[0]} (old), "
                f"{r.over_deadline[1]} (new)"
            )
        if r.skipped:
            say(f"  {r.skipped} rows skipped: neither edge model could score them")
        for n in r.notes:
            say(f"  note: {n}")
    for n in d.notes:
        say(f"note: {n}")


@policy_app.command("diff")
def policy_diff(
    old: Annotated[Path, typer.Argument(help="The policy serving now.")],
    new: Annotated[Path, typer.Argument(help="The policy to compare with it.")],
    log: Annotated[
        Path | None,
        typer.Option(help="An escalation log: replay its requests under both policies."),
    ] = None,
    task: Annotated[str | None, typer.Option(help="Only this task.")] = None,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Also write the report as JSON here ('-': stdout)."),
    ] = None,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the intervals.")] = 1000,
) -> None:
    """Show what differs between two policy files (key paths, old -> new) and, with --log,
    how the logged requests would be routed under each: flips, escalation rate and agreement
    with the cloud with 95% intervals. Says what the log cannot replay."""
    from tandem.policy_replay import diff_policies

    try:
        d = diff_policies(old, new, log=log, task=task, n_boot=n_boot)
    except TandemError as e:
        raise fail(e) from None
    if json_out is not None and str(json_out) == "-":
        typer.echo(json.dumps(d.as_dict(), indent=2, default=str))
        return
    print_diff(d)
    if json_out is not None:
        json_out.write_text(json.dumps(d.as_dict(), indent=2, default=str) + "\n")
        console.print(f"report written to {json_out}", highlight=False)
