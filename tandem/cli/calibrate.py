"""``tandem calibrate``: parses, calls :func:`tandem.calibration.calibrate_task`, prints the
report and the policy diff, and writes the policy only when asked (``--write``, ``--out``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from tandem.cli.common import app, console, err_console, fail
from tandem.runtime.errors import ConfigError, TandemError


def print_report(report: Any, out: Any = console) -> None:
    """The report of :func:`tandem.calibration.calibrate_task`, for a person."""

    def say(text: str) -> None:  # one line per print, never wrapped
        out.print(text, soft_wrap=True, highlight=False)

    c = report.choice
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    say(
        f"task {report.task} ({report.kind}), {report.source}: {report.rows} rows, "
        f"threshold chosen on {report.threshold_rows}"
        + (f" ({report.audited_rows} audited)" if report.audited_rows is not None else "")
    )
    what = "token score" if report.kind == "generate" else "edge model"
    t = report.temperature or report.score_temperature
    say(
        f"ECE of the {what}: {report.ece_before:.4f} before, {report.ece_after:.4f} after"
        + (f" (temperature {t:.4g})" if t else "")
    )
    say(
        f"objective {report.objective}: threshold {report.threshold:g}"
        + ("" if c.met else "  [not met on this data]")
    )
    e, a = c.escalation_rate, c.accuracy
    say(f"  expected escalation rate {pct(e.expected)} (95% CI {pct(e.low)}-{pct(e.high)})")
    say(
        f"  expected routed accuracy {pct(a.expected)} (95% CI {pct(a.low)}-{pct(a.high)}); "
        f"edge {pct(c.on_data.edge_accuracy)}, cloud {pct(c.on_data.cloud_accuracy)}"
    )
    if c.on_data.cost is not None:
        say(f"  expected cost per request {c.on_data.cost:.6g}")
    if report.holdout:
        h = report.holdout
        pe, pa = h["predicted_escalation_rate"], h["predicted_accuracy"]
        say(
            f"holdout {h['source']} ({h['rows']} rows): escalation {pct(h['escalation_rate'])} "
            f"(predicted {pct(pe['low'])}-{pct(pe['high'])}), accuracy {pct(h['accuracy'])} "
            f"(predicted {pct(pa['low'])}-{pct(pa['high'])}), objective "
            + ("met" if h["objective_met"] else "NOT met")
        )
        if "ece_before" in h:
            say(f"  holdout ECE {h['ece_before']:.4f} before, {h['ece_after']:.4f} after")
    if report.comparison:
        cmp = report.comparison
        for name, g in cmp["gates"].items():
            say(
                f"  {name:<10} escalation {pct(g['escalation_rate'])}, accuracy "
                f"{pct(g['accuracy'])}, CPT(80%) {pct(g['cpt80'])}"
            )
        say(
            f"  active and shadow decide alike on {pct(cmp['active_shadow_agreement'])} of "
            f"{cmp['rows']} rows"
        )
    for n in report.notes:
        say(f"note: {n}")


@app.command()
def calibrate(
    policy: Annotated[Path, typer.Argument(help="The policy file to calibrate.")],
    task: Annotated[str, typer.Option(help="The task whose gate is calibrated.")],
    data: Annotated[
        Path | None, typer.Option(help="Labelled .npz: x, y, optional cloud_logits.")
    ] = None,
    log: Annotated[
        Path | None, typer.Option(help="The escalation log (cloud answers as labels).")
    ] = None,
    reference: Annotated[
        str | None, typer.Option(help="A built-in set: digits (its calib split).")
    ] = None,
    objective: Annotated[
        str,
        typer.Option(
            help="max-escalation=R | accuracy-within=POINTS | recovery=F | cost:cloud=..,error=.."
        ),
    ] = "recovery=0.9",
    holdout: Annotated[
        str | None,
        typer.Option(help="Held-out data to check the threshold on: .npz, .sqlite or 'reference'."),
    ] = None,
    temperature: Annotated[bool, typer.Option(help="Fit a temperature (confidence gates).")] = True,
    allow_biased: Annotated[
        bool, typer.Option(help="Choose thresholds on escalated log rows too.")
    ] = False,
    compare: Annotated[
        bool, typer.Option(help="Compare the active gate with the shadow gate.")
    ] = False,
    write: Annotated[
        bool, typer.Option(help="Replace the policy file (keeps POLICY.bak).")
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Write the calibrated policy here instead.")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the reliability diagram (PNG).")] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the report (JSON).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 1000,
) -> None:
    """Calibrate a task's gate (temperature and threshold) to a stated target; prints ECE, the
    threshold, the expected escalation rate and accuracy with 95% CIs, and the policy diff.
    Writes nothing unless --write or --out."""
    sources = [
        s
        for s in (data and str(data), log and str(log), reference and f"reference:{reference}")
        if s
    ]
    if len(sources) != 1:
        raise fail(ConfigError("give exactly one of --data, --log, --reference"))
    if holdout == "reference":  # the built-in digits' test split, whatever the source
        holdout = f"reference:{reference or 'digits'}"
    if holdout is not None and not holdout.startswith("reference") and not Path(holdout).exists():
        raise fail(ConfigError(f"--holdout: {holdout} does not exist"))  # before any work
    from tandem.calibration import calibrate_task

    try:
        report = calibrate_task(
            policy,
            task,
            sources[0],
            objective=objective,
            holdout=holdout,
            fit_temperature=temperature,
            allow_biased=allow_biased,
            compare=compare,
            plot=plot,
            seed=seed,
            n_boot=n_boot,
            progress=lambda m: err_console.print(f"[dim]· {m}[/dim]", highlight=False),
        )
    except TandemError as e:
        raise fail(e) from None
    print_report(report)
    diff = report.edit.diff(out)
    typer.echo(diff if diff else "the policy already says this (no change)")
    if plot:
        typer.echo(f"reliability diagram written to {plot}")
    if json_out:
        json_out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        typer.echo(f"report written to {json_out}")
    if write or out:
        dest = report.edit.write(out)
        typer.echo(f"policy written to {dest}" + ("" if out else f" (previous: {dest}.bak)"))
    else:
        typer.echo("nothing written: pass --write to apply, or --out PATH")
